"""The keys view: every key of the registry (a file, a JWKS URL or Redis) with its owner, age and expiry."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import ConfigurationError, MeshAuthError
from .._jwks_endpoint import JWKSEndpoint
from .._keys import KeyRecord
from .._registry import JWKSFile, KeySet

__all__ = ["RegistryView", "open_registry"]

REFRESH_EVERY = 30.0  # seconds between fetches of a URL registry by the console


class RegistryView:
    """A registry (file or JWKS URL) read for display, never for verification."""

    def __init__(
        self,
        source: str,
        load: Callable[[], KeySet | None],
        *,
        expiry_warning: float,
        clock: Callable[[], float] = time.time,
        problems: Callable[[], list[str]] = list,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self._load = load
        self._problems = problems
        self.expiry_warning = expiry_warning
        self.clock = clock
        self.close = close

    def keys(self, callers: Mapping[str, int]) -> dict[str, Any]:
        """The key rows, the services seen calling with no key, and the registry's state."""
        error = None
        try:
            keyset = self._load()
        except MeshAuthError as exc:
            keyset, error = None, str(exc)
        records: list[KeyRecord] = sorted(keyset or (), key=lambda record: (record.owner, record.kid))
        now = self.clock()
        owners = {record.owner for record in records}
        return {
            "source": self.source,
            "error": error if keyset is None else None,
            "expiry_warning": self.expiry_warning,
            "keys": [self._row(record, now) for record in records],
            "problems": (list(keyset.problems) if keyset is not None else []) + self._problems(),
            "without_key": [
                {"service": name, "decisions": count} for name, count in sorted(callers.items()) if name not in owners
            ],
        }

    def _row(self, record: KeyRecord, now: float) -> dict[str, Any]:
        issued = record.jwk.get("iat", record.not_before)
        if not isinstance(issued, int | float) or isinstance(issued, bool):
            issued = None
        expires_in = None if record.expires is None else record.expires - now
        if record.expires is not None and now > record.expires:
            status = "expired"
        elif record.not_before is not None and now < record.not_before:
            status = "not yet valid"
        elif expires_in is not None and expires_in < self.expiry_warning:
            status = "expires soon"
        else:
            status = "valid"
        return {
            "kid": record.kid,
            "owner": record.owner,
            "alg": record.alg,
            "not_before": record.not_before,
            "expires": record.expires,
            "age": None if issued is None else now - issued,
            "expires_in": expires_in,
            "status": status,
        }


def open_registry(
    source: str,
    *,
    expiry_warning: float,
    namespace: str = "meshauth",
    wait: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> RegistryView:
    """A view of the registry at ``source``: a JWKS file, an http(s) URL, or ``redis://`` (``namespace``).

    A Redis registry is waited for at most ``wait`` seconds, then ``KeysUnavailable`` is raised.
    """
    if source.startswith(("redis://", "rediss://", "unix://")):
        return _redis_registry(source, namespace, wait, expiry_warning=expiry_warning, clock=clock)
    if source.startswith(("https://", "http://")):
        endpoint = JWKSEndpoint(source, clock=clock)
        lock = threading.Lock()
        fetched = [-REFRESH_EVERY]

        def fetch() -> KeySet | None:
            with lock:
                if time.monotonic() - fetched[0] >= REFRESH_EVERY or endpoint.keyset is None:
                    fetched[0] = time.monotonic()
                    endpoint.refresh()
            if endpoint.keyset is None:
                raise ConfigurationError(f"{source}: the registry could not be fetched", reason="keys_unavailable")
            return endpoint.keyset

        return RegistryView(source, fetch, expiry_warning=expiry_warning, clock=clock)
    watched = JWKSFile(source)
    return RegistryView(source, lambda: watched.keyset, expiry_warning=expiry_warning, clock=clock)


def _redis_registry(
    source: str, namespace: str, wait: float, *, expiry_warning: float, clock: Callable[[], float]
) -> RegistryView:
    """The Redis registry (``meshauth.redis.RedisKeys``, following its changes); needs the ``redis`` extra."""
    try:
        redis = importlib.import_module("meshauth.redis")
    except ImportError as exc:  # the message names the extra to install
        raise ConfigurationError(str(exc), reason="missing_extra", expected="pip install 'meshauth[redis]'") from None
    keys = redis.RedisKeys(source, namespace, startup_timeout=wait, clock=clock)
    where = f"{keys.where} namespace {namespace}"
    return RegistryView(
        where,
        lambda: keys.keyset,
        expiry_warning=expiry_warning,
        clock=clock,
        problems=lambda: list(keys.problems),
        close=keys.close,
    )
