"""Serving the key registry: a pure ASGI app for ``/.well-known/jwks.json``.

The app republishes whatever a key source holds (``StaticKeys``, ``JWKSFile``,
``MemoryKeys``, another ``JWKSEndpoint``...) with the headers
:class:`~meshauth.JWKSEndpoint` relies on: ``Content-Type:
application/jwk-set+json``, ``Cache-Control: public, max-age=N`` and a strong
``ETag``, answering ``If-None-Match`` with ``304``. The body is serialized
again only when the source's key set changes.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final, Protocol

from ._exceptions import MeshAuthError
from ._keys import _PRIVATE_MEMBERS

__all__ = ["JWKSApp", "jwks_app"]

logger = logging.getLogger("meshauth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JWKS_MEDIA_TYPE: Final = "application/jwk-set+json"
DEFAULT_PATH: Final = "/.well-known/jwks.json"


class PublishableKeys(Protocol):
    """Anything that can render its registry document."""

    def to_jwks(self) -> Mapping[str, Any]: ...


class _Published:
    """One serialized document and its validators."""

    __slots__ = ("body", "etag", "keys", "version")

    def __init__(self, version: object, body: bytes, keys: int) -> None:
        self.version = version
        self.body = body
        self.keys = keys
        digest = hashlib.sha256(body).digest()
        self.etag = '"' + base64.urlsafe_b64encode(digest[:18]).decode("ascii") + '"'


def _serialize(document: Mapping[str, Any]) -> tuple[bytes, int]:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise ValueError("the source did not render a JWKS document")
    for jwk in keys:
        # Last line of defence: never publish a secret, whatever the source holds.
        if not isinstance(jwk, Mapping) or _PRIVATE_MEMBERS.intersection(jwk):
            raise ValueError("the source rendered a key with private members")
    body = json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode("ascii")
    return body, len(keys)


def _etag_matches(header: str, etag: str) -> bool:
    """RFC 9110 weak comparison, as ``If-None-Match`` requires."""
    if header.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(candidate.strip().removeprefix("W/") == opaque for candidate in header.split(","))


class JWKSApp:
    """A pure ASGI app publishing a key source as a JWKS.

    >>> import meshauth
    >>> key = meshauth.SigningKey.generate()
    >>> app = jwks_app(meshauth.StaticKeys([key.record("orders")]), max_age=300)
    >>> app.path
    '/.well-known/jwks.json'

    Serve it with any ASGI server (``uvicorn module:app``) or mount it in a
    framework. Routes:

    * ``GET``/``HEAD`` ``path`` (default ``/.well-known/jwks.json``): the
      document, ``200`` or ``304``; ``503`` when the source cannot be read;
    * ``GET``/``HEAD`` ``health_path`` (default ``/healthz``): ``200``
      ``{"status": "ok", "keys": N}`` or ``503``;
    * other methods: ``405``; other paths: ``404``; lifespan events are
      acknowledged.
    """

    def __init__(
        self,
        source: PublishableKeys,
        *,
        max_age: int = 300,
        path: str = DEFAULT_PATH,
        health_path: str | None = "/healthz",
    ) -> None:
        if type(max_age) is not int or max_age < 0:
            raise ValueError("max_age must be a non-negative integer")
        self.source = source
        self.max_age = max_age
        self.path = path
        self.health_path = health_path
        self._cache_control = f"public, max-age={max_age}".encode("ascii")
        self._published: _Published | None = None
        self._lock = threading.Lock()
        render = getattr(source, "ato_jwks", None)
        self._arender: Callable[[], Awaitable[Mapping[str, Any]]] | None = (
            render if render is not None and inspect.iscoroutinefunction(render) else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return  # websockets and other protocols are not served here
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path == self.path:
            route = self._document
        elif self.health_path is not None and path == self.health_path:
            route = self._health
        else:
            await _respond(send, 404, {"error": "not_found"})
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, {"error": "method_not_allowed"}, extra=[(b"allow", b"GET, HEAD")])
            return
        await route(scope, send, head=method == "HEAD")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _current(self) -> _Published:
        """The serialized document, re-rendered only when the source's key set changed."""
        # JWKSFile, StaticKeys and JWKSEndpoint expose the key set in service;
        # its identity changes exactly when the document does.
        version = getattr(self.source, "keyset", None)
        published = self._published
        if version is not None and published is not None and published.version is version:
            return published
        document = await self._arender() if self._arender is not None else self.source.to_jwks()
        body, count = _serialize(document)
        if published is not None and published.body == body:
            published = _Published(version, published.body, count) if version is not None else published
        else:
            published = _Published(version, body, count)
        with self._lock:
            self._published = published
        return published

    async def _document(self, scope: Scope, send: Send, *, head: bool) -> None:
        try:
            published = await self._current()
        except MeshAuthError as exc:
            logger.warning("meshauth jwks_app: the key source cannot be read: %s", exc.reason)
            await _respond(send, 503, {"error": "keys_unavailable", "reason": exc.reason}, head=head)
            return
        except Exception:
            logger.exception("meshauth jwks_app: the key source failed")
            await _respond(send, 500, {"error": "internal_error"}, head=head)
            return
        headers = [(b"etag", published.etag.encode("ascii")), (b"cache-control", self._cache_control)]
        if_none_match = _header(scope, b"if-none-match")
        if if_none_match is not None and _etag_matches(if_none_match, published.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers += [
            (b"content-type", JWKS_MEDIA_TYPE.encode("ascii")),
            (b"content-length", str(len(published.body)).encode("ascii")),
            (b"x-content-type-options", b"nosniff"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else published.body})

    async def _health(self, scope: Scope, send: Send, *, head: bool) -> None:
        try:
            published = await self._current()
        except Exception as exc:
            reason = exc.reason if isinstance(exc, MeshAuthError) else "internal_error"
            await _respond(send, 503, {"status": "unavailable", "reason": reason}, head=head)
            return
        await _respond(send, 200, {"status": "ok", "keys": published.keys}, head=head)


def _header(scope: Scope, name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
    if not values:
        return None
    return b",".join(values).decode("latin-1")


async def _respond(
    send: Send,
    status: int,
    payload: Mapping[str, Any],
    *,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
    ]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def jwks_app(
    source: PublishableKeys,
    *,
    max_age: int = 300,
    path: str = DEFAULT_PATH,
    health_path: str | None = "/healthz",
) -> JWKSApp:
    """An ASGI app serving ``source`` at ``path`` (see :class:`JWKSApp`)."""
    return JWKSApp(source, max_age=max_age, path=path, health_path=health_path)
