"""OpenID Connect discovery: an identity provider's key set found from its issuer name.

:class:`DiscoveredKeys` reads ``<issuer>/.well-known/openid-configuration``,
checks that the document's ``issuer`` is exactly the configured one, and
serves the keys at its ``jwks_uri`` through a :class:`~meshauth.JWKSEndpoint`
(https, no redirects, size limits, the IdP key parser). Both documents are
cached: the discovery document for its ``Cache-Control: max-age`` (clamped to
``[min_max_age, max_max_age]``, ``default_max_age`` when unstated), the key
set by the endpoint's own rules. A failed rediscovery keeps the ``jwks_uri``
in service; with none yet, lookups raise :class:`~meshauth.KeysUnavailable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx

from ._exceptions import ConfigurationError, KeysUnavailable
from ._idp_keys import IdPKeyParser
from ._jwks_cache import Backoff, Flow, drive_async, drive_sync, fetch_flow
from ._jwks_endpoint import JWKSEndpoint
from ._jwks_http import FetchFailed, Getter, Reply, check_reply, check_url, display_url, max_age
from ._jws import strict_json_loads
from ._keys import KeyRecord
from ._keyset import KeySet

__all__ = ["DISCOVERY_PATH", "DiscoveredKeys", "discovery_url"]

logger = logging.getLogger("meshauth")

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
_MAX_DOCUMENT_BYTES: Final = 1 << 20
_HEADERS: Final = {"Accept": "application/json", "Accept-Encoding": "gzip", "User-Agent": "meshauth/0.1.0"}


def discovery_url(issuer: str) -> str:
    """Where an issuer's discovery document is (OpenID Connect Discovery 1.0, section 4)."""
    return issuer.rstrip("/") + DISCOVERY_PATH


@dataclasses.dataclass(frozen=True, slots=True)
class _Discovered:
    jwks_uri: str
    max_age: float | None


def _invalid(detail: str) -> FetchFailed:
    return FetchFailed("invalid_discovery", detail, retryable=False, status=200)


def judge_discovery(reply: Reply, *, issuer: str, allow_http: bool) -> _Discovered:
    """The ``jwks_uri`` of a discovery answer; :class:`FetchFailed` naming what is wrong."""
    check_reply(reply, ("application/json",))
    try:
        document = strict_json_loads(reply.body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _invalid("the discovery document is not JSON") from None
    if not isinstance(document, Mapping):
        raise _invalid("the discovery document is not a JSON object")
    found = document.get("issuer")
    if found != issuer:
        shown = repr(found[:128]) if isinstance(found, str) else type(found).__name__
        raise FetchFailed(
            "issuer_mismatch",
            f"the discovery document names issuer {shown}, not the configured {issuer!r}",
            retryable=False,
            status=200,
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise _invalid("the discovery document has no 'jwks_uri' string")
    try:
        check_url(jwks_uri, allow_http=allow_http, what="jwks_uri")
    except ConfigurationError as exc:
        raise _invalid(exc.detail) from None
    return _Discovered(jwks_uri, max_age(reply.headers))


class DiscoveredKeys:
    """An identity provider's keys, located by OpenID Connect discovery (a key source).

    >>> keys = DiscoveredKeys("https://login.example.com", algorithms=("RS256",))
    >>> keys.url
    'https://login.example.com/.well-known/openid-configuration'

    ``algorithms`` are the issuer's (for the key parser); the other options
    are :class:`~meshauth.JWKSEndpoint`'s and apply to both fetches.
    ``min_max_age``/``max_max_age``/``default_max_age`` bound how long the
    discovery document is trusted (default one hour when it says nothing).
    Nothing from a token is ever fetched: only the configured issuer's
    documents.
    """

    def __init__(
        self,
        issuer: str,
        *,
        algorithms: tuple[str, ...] | None = None,
        allow_http: bool = False,
        cooldown: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        retries: int = 3,
        retry_wait: Callable[[int], float] | None = None,
        min_max_age: float = 60.0,
        max_max_age: float = 86400.0,
        default_max_age: float = 3600.0,
        endpoint_options: Mapping[str, Any] | None = None,
    ) -> None:
        parsed = check_url(discovery_url(issuer), allow_http=allow_http, what="issuer's discovery URL")
        self.issuer = issuer
        self.url = str(parsed)
        self.source = display_url(parsed)
        self.parser = IdPKeyParser(issuer) if algorithms is None else IdPKeyParser(issuer, algorithms)
        self.cooldown = cooldown
        self._bounds = (min_max_age, max_max_age, default_max_age)
        self._allow_http = allow_http
        self._monotonic = monotonic
        self._retries = retries
        self._retry_wait: Callable[[int], float] = retry_wait if retry_wait is not None else Backoff()
        self._http = Getter(
            parsed, timeout=timeout, max_bytes=_MAX_DOCUMENT_BYTES, client=client, async_client=async_client
        )
        self._endpoint_options: dict[str, Any] = {
            "allow_http": allow_http,
            "cooldown": cooldown,
            "timeout": timeout,
            "clock": clock,
            "monotonic": monotonic,
            "client": client,
            "async_client": async_client,
            "retries": retries,
            "retry_wait": retry_wait,
            **(endpoint_options or {}),
        }
        self.endpoint: JWKSEndpoint | None = None
        self.last_error: str | None = None
        self._refresh_at = float("-inf")
        self._retry_at = float("-inf")
        self._lock = threading.Lock()
        self._alocks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    # -- the key source protocol ------------------------------------------------------------

    def get_key(self, kid: str) -> KeyRecord | None:
        return self._resolve().get_key(kid)

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return await (await self._aresolve()).aget_key(kid)

    # -- discovery ------------------------------------------------------------------------------

    def _current(self) -> JWKSEndpoint | None:
        """The endpoint to use without discovering now, or ``None`` when discovery is due."""
        now = self._monotonic()
        if self.endpoint is not None and (now < self._refresh_at or now < self._retry_at):
            return self.endpoint
        if now < self._retry_at:
            raise self._unavailable()
        return None

    def _resolve(self) -> JWKSEndpoint:
        endpoint = self._current()
        if endpoint is not None:
            return endpoint
        with self._lock:
            endpoint = self._current()
            if endpoint is not None:
                return endpoint
            return self._apply(drive_sync(self._flow(), self._http.get, time.sleep))

    async def _aresolve(self) -> JWKSEndpoint:
        endpoint = self._current()
        if endpoint is not None:
            return endpoint
        lock = self._alocks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            endpoint = self._current()
            if endpoint is not None:
                return endpoint
            return self._apply(await drive_async(self._flow(), self._http.aget))

    def _flow(self) -> Flow[_Discovered | FetchFailed]:
        def judge(reply: Reply) -> _Discovered:
            return judge_discovery(reply, issuer=self.issuer, allow_http=self._allow_http)

        return fetch_flow(dict(_HEADERS), self._retries, self._retry_wait, judge)

    def _apply(self, outcome: _Discovered | FetchFailed) -> JWKSEndpoint:
        now = self._monotonic()
        if isinstance(outcome, FetchFailed):
            message = f"{outcome.reason}: {outcome.detail}"
            if message != self.last_error:
                logger.warning("meshauth discovery %s: failed: %s", self.source, message)
            self.last_error = message
            self._retry_at = now + max(self.cooldown, 1.0)
            if self.endpoint is None:
                raise self._unavailable()
            return self.endpoint  # the jwks_uri found before stays in service
        if self.endpoint is None or self.endpoint.url != str(httpx.URL(outcome.jwks_uri)):
            if self.endpoint is not None:
                logger.info("meshauth discovery %s: jwks_uri is now %s", self.source, outcome.jwks_uri)
            self.endpoint = JWKSEndpoint(outcome.jwks_uri, parser=self.parser, **self._endpoint_options)
        low, high, default = self._bounds
        lifetime = default if outcome.max_age is None else outcome.max_age
        self._refresh_at = now + min(max(lifetime, low), high)
        self._retry_at = float("-inf")
        self.last_error = None
        return self.endpoint

    def _unavailable(self) -> KeysUnavailable:
        return KeysUnavailable(f"{self.source}: OpenID Connect discovery failed: {self.last_error}")

    # -- management -------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Discover (when due) and fetch the key set now; whether both succeeded."""
        try:
            return self._resolve().refresh()
        except KeysUnavailable:
            return False

    async def arefresh(self) -> bool:
        """Async :meth:`refresh`."""
        try:
            return await (await self._aresolve()).arefresh()
        except KeysUnavailable:
            return False

    def warm(self) -> None:
        """Discover and fetch now; :class:`~meshauth.KeysUnavailable` naming the problem if either fails."""
        self._resolve().warm()

    @property
    def keyset(self) -> KeySet | None:
        """The key set in service, without fetching (``None`` before the first fetch)."""
        return self.endpoint.keyset if self.endpoint is not None else None

    def status(self) -> dict[str, Any]:
        """Readiness: the key set's status, with the discovery URL, ``jwks_uri`` and discovery error."""
        endpoint = self.endpoint
        info: dict[str, Any] = endpoint.status() if endpoint is not None else {"ready": False, "keys": 0}
        info.update(
            source=self.source,
            jwks_uri=endpoint.source if endpoint is not None else None,
            discovery_error=self.last_error,
        )
        info.setdefault("last_error", self.last_error)
        return info

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    async def aclose(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.aclose()

    def __repr__(self) -> str:
        return f"DiscoveredKeys({self.issuer!r})"
