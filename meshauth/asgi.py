"""ASGI middleware: authenticate every inbound request before the app sees it.

Pure ASGI (no Starlette or FastAPI import): wrap any ASGI app, or register it
with ``app.add_middleware(MeshAuthMiddleware, verifier=...)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span

from ._exceptions import DuplicateAuthorization, MissingCredentials
from ._identity import ServiceIdentity
from ._middleware import (
    PRINCIPAL_KEY,
    ErrorHook,
    RequestGuard,
    asgi_method,
    asgi_raw_path,
    asgi_traceparent,
)
from ._policy import Decision, Policy
from ._principal import Principal
from ._proof import DEFAULT_SIGN_BODY_LIMIT, RESPONSE_HEADER_BYTES, AsgiProof, bearer_text, unverified_caller
from ._telemetry import AUDIT_LOGGER
from ._verify import Verifier

__all__ = ["PRINCIPAL_KEY", "MeshAuthMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_AUTHENTICATED: Final = frozenset({"http", "websocket"})
_WS_POLICY_VIOLATION: Final = 1008


class MeshAuthMiddleware:
    """Authenticates (and optionally authorizes) every HTTP and websocket request.

    >>> from meshauth.testing import Mesh
    >>> async def app(scope, receive, send):
    ...     principal = scope["meshauth.principal"]
    ...     await send({"type": "http.response.start", "status": 200, "headers": []})
    ...     await send({"type": "http.response.body", "body": principal.caller.encode()})
    >>> mesh = Mesh(["orders", "payments"])
    >>> app = MeshAuthMiddleware(app, mesh.verifier("payments"), exclude=["/healthz"])

    For each ``http`` or ``websocket`` scope whose ``path`` is not excluded:

    - credentials must be exactly one ``Authorization: Bearer <token68>``
      header; the token is checked with ``await verifier.averify(token)``.
      No credentials: ``401`` with ``WWW-Authenticate: Bearer realm="<audience>"``;
      anything wrong with the header or the token: ``401`` with
      ``error="invalid_token", error_description="<reason>"``; an unreadable
      registry: ``503`` with ``Retry-After``;
    - with ``policy``, :meth:`Policy.decide` runs on the raw path (``raw_path``,
      else ``path`` re-encoded) in a ``meshauth.authorize`` span; a denial is a
      ``403`` (with ``error="insufficient_scope"`` when only scopes were missing);
    - the :class:`~meshauth.Principal` is published as
      ``scope["meshauth.principal"]`` and the app is called. The app is never
      called for a refused request.

    Bodies are ``{"error": ..., "reason": ...}`` JSON and never echo the token;
    ``on_error(exc)`` may return ``(status, headers, body)`` to replace one.
    One ``meshauth.audit`` record (event ``request``) is written per request.

    With ``identity``, a request that carried a valid ``Meshauth-Nonce``
    gets a ``Meshauth-Response`` token on every response (the app's, whatever
    its status, and a policy ``403``), never on a ``401``/``503``; an invalid
    nonce is a ``400``. A refused websocket is closed before ``accept`` with
    code 1008, or answered with the HTTP reply when the server offers the
    ``websocket.http.response`` extension. Other scopes (``lifespan``) pass
    through untouched. Header names are matched in lower case, as ASGI
    servers deliver them.
    """

    __slots__ = (
        "_exclude",
        "_guard",
        "_identity",
        "_policy",
        "_sign_body_limit",
        "_verifier",
        "_websocket_max_age",
        "app",
    )

    def __init__(
        self,
        app: ASGIApp,
        verifier: Verifier,
        *,
        policy: Policy | None = None,
        exclude: Iterable[str] = (),
        identity: ServiceIdentity | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        on_error: ErrorHook | None = None,
        retry_after: int = 5,
        websocket_max_age: float | None = None,
        sign_body_limit: int = DEFAULT_SIGN_BODY_LIMIT,
    ) -> None:
        self.app = app
        self._sign_body_limit = sign_body_limit
        if websocket_max_age is not None and not websocket_max_age > 0:
            raise ValueError(f"websocket_max_age must be a positive number of seconds, found {websocket_max_age!r}")
        self._websocket_max_age = websocket_max_age
        self._guard = RequestGuard(
            verifier,
            policy=policy,
            exclude=exclude,
            identity=identity,
            tracer_provider=tracer_provider,
            on_error=on_error,
            retry_after=retry_after,
        )
        self._verifier = verifier
        self._policy = policy
        self._identity = identity
        self._exclude = self._guard.has_exclusions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type not in _AUTHENTICATED or (self._exclude and self._guard.excluded(scope["path"])):
            await self.app(scope, receive, send)
            return

        headers = _Credentials.read(scope["headers"])
        authorization = headers.authorization
        guard = self._guard
        principal: Principal | None = None
        nonce: str | None = None
        try:
            path = guard.asgi_path(scope)
            # Read first, so that every answer to this request, refusals included, is signed;
            # a bad nonce is reported once the caller is known (for the audit record).
            signing = self._identity is not None
            nonce, bad_nonce = guard.read_nonce(headers.nonce if signing else None, headers.nonce_repeated)
            if authorization is None:
                raise MissingCredentials("the request has no bearer credentials")
            if headers.authorization_repeated:
                raise DuplicateAuthorization("more than one Authorization header", expected=1)
            token = guard.bearer(authorization)
            txn_token = guard.txn_token(headers.txn_token, repeated=headers.txn_token_repeated)
            principal = await self._verifier.averify(token, txn_token, audit=False)
            if bad_nonce is not None:
                raise bad_nonce
        except Exception as exc:
            await self._refuse(scope, receive, send, exc, principal=principal, nonce=nonce, authorization=authorization)
            return

        decision: Decision | None = None
        span: Span | None = None
        policy = self._policy
        if policy is not None:
            decision, denied, span = guard.authorize(policy, principal, asgi_method(scope), path)
            if denied is not None:
                await self._refuse(scope, receive, send, denied, principal=principal, span=span, nonce=nonce)
                return

        # A copy, as the ASGI spec asks of middleware: the server's scope stays as it was.
        scope = {**scope, PRINCIPAL_KEY: principal}
        if AUDIT_LOGGER.isEnabledFor(logging.INFO):
            guard.audit_accepted(
                principal,
                decision,
                span,
                method=asgi_method(scope),
                path=path,
                client=_client(scope),
                traceparent=asgi_traceparent(scope),
            )
        if nonce is not None:
            assert self._identity is not None
            head = scope.get("method") == "HEAD"
            proof = AsgiProof(send, self._identity, principal.caller, nonce, self._sign_body_limit, head=head)
            send = proof.send
        if scope_type == "websocket" and self._websocket_max_age is not None:
            receive, send = _closing_at(self._socket_deadline(principal, self._websocket_max_age), receive, send)
        await self.app(scope, receive, send)

    def _socket_deadline(self, principal: Principal, max_age: float) -> float:
        """When a websocket opened with ``principal``'s token closes, on the ``time.monotonic`` clock."""
        # The token's expiry is on the verifier's clock; the socket's timer runs on the monotonic one.
        return time.monotonic() + min(principal.expires_at - self._verifier.clock(), max_age)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exc: Exception,
        *,
        principal: Principal | None,
        span: Span | None = None,
        nonce: str | None = None,
        authorization: bytes | None = None,
    ) -> None:
        guard = self._guard
        reply = guard.reply(exc)
        guard.audit_refused(
            exc,
            reply,
            principal=principal,
            span=span,
            method=asgi_method(scope),
            path=asgi_raw_path(scope),
            client=_client(scope),
            traceparent=asgi_traceparent(scope),
        )
        headers = reply.asgi_headers()
        if nonce is not None and self._identity is not None:
            # Refusals are signed too: the caller can tell the callee's 401/403/503 from a forged one.
            caller = principal.caller if principal is not None else unverified_caller(bearer_text(authorization))
            token = self._identity.mint_response(caller, nonce, status=reply.status, body=reply.body)
            headers.append((RESPONSE_HEADER_BYTES, token.encode("ascii")))
        if scope["type"] == "websocket":
            message = await receive()
            if message.get("type") != "websocket.connect":
                return  # the client already left
            if "websocket.http.response" in (scope.get("extensions") or {}):
                await send({"type": "websocket.http.response.start", "status": reply.status, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": reply.body})
            else:
                reason = getattr(exc, "reason", "internal_error")
                await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION, "reason": reason})
            return
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


@dataclasses.dataclass(slots=True)
class _Credentials:
    """The request headers meshauth reads, each with whether it came more than once."""

    authorization: bytes | None = None
    authorization_repeated: bool = False
    nonce: bytes | None = None
    nonce_repeated: bool = False
    txn_token: bytes | None = None
    txn_token_repeated: bool = False

    @classmethod
    def read(cls, headers: Iterable[tuple[bytes, bytes]]) -> _Credentials:
        """One pass over the headers (ASGI servers give their names in lower case)."""
        found = cls()
        for name, value in headers:
            if name == b"authorization":
                found.authorization_repeated = found.authorization is not None
                found.authorization = found.authorization or value
            elif name == b"meshauth-nonce":
                found.nonce_repeated = found.nonce is not None
                found.nonce = found.nonce or value
            elif name == b"txn-token":
                found.txn_token_repeated = found.txn_token is not None
                found.txn_token = found.txn_token or value
        return found


def _closing_at(deadline: float, receive: Receive, send: Send) -> tuple[Receive, Send]:
    """Wrap a websocket's channels so that the socket is closed (1008) at ``deadline`` (``time.monotonic``).

    The close happens on the app's next ``receive`` (which then reports a
    disconnect) or ``send`` after the deadline, and while the app waits in
    ``receive``, when the deadline passes.
    """
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION, "reason": "credentials expired"})

    async def receive_until() -> Message:
        remaining = deadline - time.monotonic()
        if not closed and remaining > 0:
            try:
                return await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                pass
        await close()
        return {"type": "websocket.disconnect", "code": _WS_POLICY_VIOLATION}

    async def send_until(message: Message) -> None:
        if time.monotonic() >= deadline:
            await close()
            return  # the socket is closed: what the app sends now goes nowhere
        await send(message)

    return receive_until, send_until


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    if client:
        return str(client[0])
    return None
