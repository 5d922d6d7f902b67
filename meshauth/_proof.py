"""Signing what was answered: response tokens bound to the status and the body (DESIGN sections 2 and 5).

Every response to a request that carried a valid ``Meshauth-Nonce`` gets a
``Meshauth-Response`` token, whatever its status: the app's answers, and the
middleware's own ``401``/``403``/``404``/``503``. The token binds the nonce,
the status and, whenever the whole body is known before the headers must go
out, ``body_sha256`` of the bytes as sent. The middleware buffers up to
``sign_body_limit`` bytes (1 MiB by default) to learn the body; a larger or
streamed body is sent as it comes, with a token that does not bind it (the
client then refuses it unless it allowed unbound bodies).

The digest covers the bytes the middleware sends: a compression middleware
must sit *inside* meshauth's (closer to the app), not outside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import MeshAuthError
from ._identity import ServiceIdentity
from ._jws import b64url_decode, loads_object
from ._names import SERVICE_NAME

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

__all__ = [
    "DEFAULT_SIGN_BODY_LIMIT",
    "NO_CALLER",
    "RESPONSE_HEADER",
    "RESPONSE_HEADER_BYTES",
    "AsgiProof",
    "WsgiProof",
    "bearer_text",
    "unverified_caller",
]

DEFAULT_SIGN_BODY_LIMIT: Final = 1 << 20
RESPONSE_HEADER: Final = "Meshauth-Response"
RESPONSE_HEADER_BYTES: Final = RESPONSE_HEADER.lower().encode("ascii")  # ASGI header names
NO_CALLER: Final = "-"
"""The audience of a response token to a request whose caller is unknown (only on a ``401``)."""
_MAX_PAYLOAD: Final = 8192

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


def bearer_text(authorization: bytes | str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` value as text, or None (no checks: see :func:`unverified_caller`)."""
    if authorization is None:
        return None
    value = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def unverified_caller(token: str | None) -> str:
    """The request token's ``iss`` as claimed, for a refused request's response token; ``"-"`` if unreadable.

    Only the addressee of the answer comes from here, never a decision: the
    caller checks that the answer is addressed to itself (or ``"-"`` on a 401).
    """
    if not token or token.count(".") != 2:
        return NO_CALLER
    payload = token.split(".")[1]
    if len(payload) > _MAX_PAYLOAD:
        return NO_CALLER
    try:
        # The strict parser (depth-limited): a refused token is still hostile input.
        claims = loads_object(b64url_decode(payload), "payload")
    except (MeshAuthError, ValueError):
        return NO_CALLER
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) and SERVICE_NAME.fullmatch(issuer) else NO_CALLER


class AsgiProof:
    """Wraps an ASGI ``send`` so that the response carries a response token bound to what was sent.

    ``http.response.start`` is held back until the body is known: the whole
    body (up to ``limit`` bytes) is then sent in one message after the start
    with a bound token; past the limit, the held start goes out with an
    unbound token and the body streams on. A websocket accept carries an
    unbound token with status 101.
    """

    __slots__ = ("_caller", "_chunks", "_head", "_identity", "_limit", "_nonce", "_send", "_size", "_start")

    def __init__(
        self, send: Send, identity: ServiceIdentity, caller: str, nonce: str, limit: int, *, head: bool = False
    ) -> None:
        self._send = send
        self._head = head  # servers send no body on HEAD: the empty body is what is bound
        self._identity = identity
        self._caller = caller
        self._nonce = nonce
        self._limit = limit
        self._start: Message | None = None
        self._chunks: list[bytes] = []
        self._size = 0

    def _token(self, status: int, body: bytes | None) -> bytes:
        token = self._identity.mint_response(self._caller, self._nonce, status=status, body=body)
        return token.encode("ascii")

    def _with_token(self, start: Message, body: bytes | None) -> Message:
        headers = [*start.get("headers", ()), (RESPONSE_HEADER_BYTES, self._token(int(start["status"]), body))]
        return {**start, "headers": headers}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("http.response.start", "websocket.http.response.start"):
            self._start = message
            return
        if kind == "websocket.accept":
            headers = [*message.get("headers", ()), (RESPONSE_HEADER_BYTES, self._token(101, None))]
            await self._send({**message, "headers": headers})
            return
        if self._start is None or kind not in ("http.response.body", "websocket.http.response.body"):
            await self._send(message)
            return
        body = message.get("body", b"")
        self._chunks.append(body)
        self._size += len(body)
        if not message.get("more_body", False):
            whole = b"".join(self._chunks)
            start, self._start, self._chunks = self._start, None, []
            await self._send(self._with_token(start, b"" if self._head else whole))
            await self._send({"type": kind, "body": whole, "more_body": False})
        elif self._size > self._limit:
            # Too large to hold: the headers go out now, the body is not bound.
            start, chunks, self._start, self._chunks = self._start, self._chunks, None, []
            await self._send(self._with_token(start, None))
            for chunk in chunks:
                await self._send({"type": kind, "body": chunk, "more_body": True})


class WsgiProof:
    """Signs a WSGI response for one request: the body is bound when it fits in ``limit`` bytes.

    For ``HEAD`` no body is sent, and the empty body is what the token binds.
    """

    __slots__ = ("_caller", "_head", "_identity", "_limit", "_nonce")

    def __init__(self, identity: ServiceIdentity, caller: str, nonce: str, limit: int, *, head: bool = False) -> None:
        self._identity = identity
        self._caller = caller
        self._nonce = nonce
        self._limit = limit
        self._head = head

    def run(
        self, app_result: Callable[[StartResponse], Iterable[bytes]], start_response: StartResponse
    ) -> Iterable[bytes]:
        """Run the app (``app_result(start_response)``) and answer with its signed response."""
        captured: list[tuple[str, list[tuple[str, str]]]] = []
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            captured[:] = [(status, list(headers))]
            return written.append  # PEP 3333's legacy write(): buffered like the rest of the body

        result = app_result(capture)
        chunks = iter(result)
        size = sum(len(chunk) for chunk in written)
        try:
            for chunk in chunks:
                written.append(chunk)
                size += len(chunk)
                if size > self._limit:
                    self._start(start_response, captured, None)
                    return _Streamed(result, chunks, written)
        except BaseException:
            _close(result)
            raise
        _close(result)
        whole = b"" if self._head else b"".join(written)
        self._start(start_response, captured, whole)
        return [whole]

    def _start(
        self, start_response: StartResponse, captured: list[tuple[str, list[tuple[str, str]]]], body: bytes | None
    ) -> None:
        if not captured:
            raise RuntimeError("the WSGI app returned without calling start_response")
        status, headers = captured[0]
        code = int(status.split(" ", 1)[0])
        token = self._identity.mint_response(self._caller, self._nonce, status=code, body=body)
        start_response(status, [*headers, (RESPONSE_HEADER, token)])


class _Streamed:
    """The buffered chunks, then the rest of the app's iterable; ``close()`` reaches the app's."""

    def __init__(self, result: Iterable[bytes], rest: Iterator[bytes], buffered: list[bytes]) -> None:
        self._result = result
        self._rest = rest
        self._buffered = buffered

    def __iter__(self) -> Iterator[bytes]:
        yield from self._buffered
        yield from self._rest

    def close(self) -> None:
        _close(self._result)


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
