"""Several key sources behind one: fallbacks and multiple registries."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from ._exceptions import KeysUnavailable, MeshAuthError
from ._keys import KeyRecord
from ._registry import KeySource

__all__ = ["CompositeKeys"]

logger = logging.getLogger("meshauth")


class CompositeKeys:
    """A key source that asks several sources in order.

    >>> import meshauth
    >>> from meshauth.testing import MemoryKeys
    >>> key = meshauth.SigningKey.generate()
    >>> primary, fallback = MemoryKeys(), MemoryKeys([key.record("orders")])
    >>> keys = CompositeKeys(primary, fallback)
    >>> keys.get_key(key.kid).owner
    'orders'

    The first source that knows the ``kid`` answers. A source that raises
    :class:`~meshauth.KeysUnavailable` (or fails unexpectedly) is skipped.
    When none knows the ``kid``, the answer is "unknown key" (``None``) as
    long as at least one source could be read; only when every source is
    unavailable does the composite raise ``KeysUnavailable``.

    Typical uses: an endpoint with a local file as fallback
    (``CompositeKeys(JWKSEndpoint(url), JWKSFile(path))``), or the registries
    of two meshes during a migration. A ``kid`` is a key thumbprint, so two
    registries holding the same ``kid`` hold the same key; if they disagree on
    its owner, the earlier source wins.
    """

    def __init__(self, *sources: KeySource) -> None:
        if not sources:
            raise ValueError("CompositeKeys needs at least one source")
        self.sources: tuple[KeySource, ...] = sources

    def get_key(self, kid: str) -> KeyRecord | None:
        """The first record for ``kid``; ``KeysUnavailable`` only if every source is down."""
        failures: list[str] = []
        for source in self.sources:
            try:
                record = source.get_key(kid)
            except Exception as exc:
                failures.append(_outage(source, exc))
                continue
            if record is not None:
                return record
        if len(failures) == len(self.sources):
            raise KeysUnavailable("every key source is unavailable: " + "; ".join(failures))
        return None

    async def aget_key(self, kid: str) -> KeyRecord | None:
        """Async :meth:`get_key`."""
        failures: list[str] = []
        for source in self.sources:
            try:
                record = await source.aget_key(kid)
            except Exception as exc:
                failures.append(_outage(source, exc))
                continue
            if record is not None:
                return record
        if len(failures) == len(self.sources):
            raise KeysUnavailable("every key source is unavailable: " + "; ".join(failures))
        return None

    def to_jwks(self) -> dict[str, Any]:
        """The merged document of the readable sources (earlier sources win on a shared ``kid``)."""
        keys: list[dict[str, Any]] = []
        seen: set[Any] = set()
        failures: list[str] = []
        for source in self.sources:
            render = getattr(source, "to_jwks", None)
            if render is None:
                continue
            try:
                document = render()
            except Exception as exc:
                failures.append(_outage(source, exc))
                continue
            for jwk in document.get("keys", []):
                if jwk.get("kid") not in seen:
                    seen.add(jwk.get("kid"))
                    keys.append(dict(jwk))
        if failures and len(failures) == len(self.sources):
            raise KeysUnavailable("every key source is unavailable: " + "; ".join(failures))
        return {"keys": keys}

    def status(self) -> dict[str, Any]:
        """Readiness of each source; the composite is ready when any source is."""
        parts: list[dict[str, Any]] = []
        for source in self.sources:
            report = getattr(source, "status", None)
            if report is None:
                parts.append({"source": type(source).__name__, "ready": True})
                continue
            try:
                parts.append(dict(report()))
            except Exception as exc:
                parts.append({"source": type(source).__name__, "ready": False, "last_error": type(exc).__name__})
        return {
            "source": "composite",
            "ready": any(part.get("ready") for part in parts),
            "keys": sum(int(part.get("keys") or 0) for part in parts),
            "last_error": next((part.get("last_error") for part in parts if part.get("last_error")), None),
            "sources": parts,
        }

    def close(self) -> None:
        """Close the sources that can be closed."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    async def aclose(self) -> None:
        """Async :meth:`close` (uses ``aclose`` where a source has one)."""
        for source in self.sources:
            close = getattr(source, "aclose", None)
            if close is not None and inspect.iscoroutinefunction(close):
                await close()
                continue
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __repr__(self) -> str:
        return f"CompositeKeys({', '.join(type(source).__name__ for source in self.sources)})"


def _outage(source: object, exc: Exception) -> str:
    """Describe a source that could not answer, so the next one may; any other meshauth error propagates."""
    if isinstance(exc, MeshAuthError) and not isinstance(exc, KeysUnavailable):
        raise exc  # a bad key or configuration in that source: not an outage to route around
    name = getattr(source, "source", None) or type(source).__name__
    detail = exc.detail if isinstance(exc, MeshAuthError) else type(exc).__name__
    if not isinstance(exc, MeshAuthError):
        logger.warning("meshauth: key source %s failed unexpectedly (%s); trying the next", name, type(exc).__name__)
    return f"{name}: {detail}"
