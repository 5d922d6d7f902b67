"""The gateway itself: an ASGI reverse proxy that turns user tokens into delegated service tokens.

Per request, in this order:

1. ``/healthz`` and ``/readyz`` are answered directly (no audit record);
2. the raw path is normalized as :class:`meshauth.Policy` does (an encoded
   slash, a NUL or a climb above the root is a ``400``); the longest
   matching route prefix wins, segment-aware; no route is a ``404``;
3. credentials: exactly one ``Authorization: Bearer`` header (``401``);
4. the token: an end user's IdP token (:class:`UserTokenVerifier`) or, on a
   route with ``accept_service_tokens``, a meshauth service token addressed
   to the gateway (:class:`meshauth.Verifier`); ``401`` with the reason, or
   ``503`` when a key set cannot be read;
5. the route policy in a ``meshauth.authorize`` span: the method (``405``
   with ``Allow``), then issuers, callers, subjects, groups, scopes (``403``);
6. a fresh delegated token (``sub`` = user, ``act`` = gateway, ``aud`` =
   the route's service), then the call upstream with the bodies streamed both
   ways; a timeout is a ``504``, any other upstream failure a ``502``.

Each step returns a value (``_exchange``: the route, the verified token, the
admission, the result); exactly one ``gateway.request`` audit record is built
from them, with the trace id, whatever the outcome (``_exchange.AuditRecord``).
Refusals are meshauth errors whose class carries the status (``_refusals``);
routes, key sources and the upstream headers live in their own modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

import httpx
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import audit as audit_log
from .._discovery import DiscoveredKeys
from .._exceptions import (
    AccessDenied,
    BadPath,
    ConfigurationError,
    DuplicateAuthorization,
    MeshAuthError,
    MissingCredentials,
)
from .._identity import ServiceIdentity
from .._idp_tokens import UserTokenVerifier
from .._jwks_endpoint import JWKSEndpoint
from .._keys import SigningKey
from .._middleware import (
    asgi_raw_path,
    credentials_error,
    default_reply,
    txn_token_value,
)
from .._paths import canonical_path
from .._policy import Decision, Policy
from .._registry import KeySource
from .._telemetry import AUDIT_LOGGER, Telemetry, mark_rejected
from .._txn import MAX_TXN_LIFETIME
from .._verify import Verifier
from ._config import GatewayConfig, load_config
from ._exchange import Admission, AuditRecord, Request, Result, SentTracker, Verified
from ._idp import is_service_token
from ._refusals import MethodNotAllowed, NoRoute, UpstreamTimeout, UpstreamUnreachable, outcome_of
from ._routes import Route, compile_route, forward_path
from ._sources import open_issuer_keys, open_registry, publish_own_keys, source_ready
from ._tracing import inject, is_sdk_span, start_trace
from ._upstream import (
    HOP_BY_HOP,
    ClientGone,
    ForwardingHeaders,
    connection_tokens,
    request_body,
    upstream_transport,
    via_httpx,
    watch_disconnect,
)
from ._upstream_client import UpstreamResponse, UpstreamTransport

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("meshauth.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_DROPPED_RESPONSE_PREFIXES: Final = (b"meshauth-", b"x-meshauth-")
HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"

_BEARER: Final = b"bearer "
_INTERNAL: Final = "internal_error"
# The gateway's reason codes for the policy field that refused a request.
_REFUSED: Final[dict[str | None, str]] = {
    "callers": "caller_not_allowed",
    "issuers": "issuer_not_allowed",
    "subjects": "subject_not_allowed",
    "groups": "group_required",
}


class Gateway:
    """The gateway as an ASGI application (see the module docstring for the steps).

    Build it with :func:`create_app`. It handles the ``lifespan`` protocol:
    start-up opens the upstream connection pool, installs the audit log handler
    and fetches URL key sets; shut-down undoes all three. Without a server
    sending lifespan events (``httpx.ASGITransport`` in tests), the first
    request starts it and ``await gateway.aclose()`` (or ``async with
    gateway:``) stops it.

    Example (in a test, with the upstream app in process)::

        upstream = httpx.ASGITransport(orders_app)
        async with create_app("gateway.toml", upstream_transport=upstream) as gateway:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway),
                                         base_url="http://gateway") as client:
                response = await client.get("/orders/1", headers={"Authorization": f"Bearer {alice}"})
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        upstream_transport: httpx.AsyncBaseTransport | None = None,
        registry: KeySource | None = None,
        issuer_keys: Mapping[str, KeySource] | None = None,
        clock: Callable[[], float] = time.time,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        configure_audit: bool = True,
    ) -> None:
        self.config = config
        source = config.source
        self.identity = _own_identity(config, clock, tracer_provider)
        self._owns_registry = registry is None
        self.registry = (
            registry
            if registry is not None
            else open_registry(config.registry, source=source, namespace=config.registry_namespace)
        )
        self.service_verifier = Verifier(
            config.service,
            self.registry,
            clock=clock,
            max_token_bytes=config.max_token_bytes,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        if issuer_keys is None:
            issuer_keys = {
                issuer.issuer: open_issuer_keys(issuer, source=source, where=f"issuers[{index}].jwks")
                for index, issuer in enumerate(config.issuers)
            }
        self.issuer_keys = dict(issuer_keys)
        self.user_verifier = UserTokenVerifier(
            config.issuers,
            self.issuer_keys,
            clock=clock,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.clock = clock
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self.realm = config.service
        # The bearer header's limit: the largest token any verifier here accepts.
        self.max_token_bytes = max(config.max_token_bytes, self.user_verifier.max_token_bytes)
        self._routes = sorted(
            (compile_route(route, config.timeout) for route in config.routes), key=lambda r: len(r.prefix), reverse=True
        )
        self._forwarding = ForwardingHeaders(config.trusted_proxies, config.max_forwarded_hops)
        self._transport = upstream_transport
        self._owns_transport = upstream_transport is None
        self._configure_audit = configure_audit
        self._audit_handler: logging.Handler | None = None
        self._audit_level = logging.NOTSET
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._date: tuple[int, bytes] = (0, b"")
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def startup(self) -> None:
        """Open the upstream client, install the audit handler, fetch URL key sets."""
        if self._started:
            return
        if self._transport is None:
            self._transport = upstream_transport()
        if self._configure_audit and self._audit_handler is None:
            self._audit_level = AUDIT_LOGGER.level
            # Each record is written after its response: those of one pass of the loop leave in one write.
            self._audit_handler = audit_log.configure(self.config.audit_log, batch=True)
        self._started = True
        # URL key sets are fetched now, so that /readyz turns ready before the
        # first request; a failure is logged by the source and retried later.
        fetches: list[Awaitable[Any]] = [
            source.arefresh()
            for source in self.issuer_keys.values()
            if isinstance(source, JWKSEndpoint | DiscoveredKeys)
        ]
        refresh_registry = getattr(self.registry, "arefresh", None)
        if refresh_registry is not None:
            fetches.append(refresh_registry())
        if fetches:
            for outcome in await asyncio.gather(*fetches, return_exceptions=True):
                if isinstance(outcome, Exception):
                    logger.warning("gateway: initial key fetch failed: %s", type(outcome).__name__)

    async def aclose(self) -> None:
        """Close what :meth:`startup` opened (the upstream client, the audit handler, fetches)."""
        self._started = False
        for source in self.issuer_keys.values():
            if isinstance(source, JWKSEndpoint | DiscoveredKeys):
                await source.aclose()
        if self._owns_registry:
            await _close(self.registry)
        await _close(self.identity)  # a published in-memory key is deleted from the registry
        if self._owns_transport and self._transport is not None:
            await self._transport.aclose()
            self._transport = None
        if self._audit_handler is not None:
            AUDIT_LOGGER.removeHandler(self._audit_handler)
            AUDIT_LOGGER.setLevel(self._audit_level)
            self._audit_handler.close()
            self._audit_handler = None

    async def __aenter__(self) -> Gateway:
        await self.startup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _ensure_started(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            await self.startup()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every key source is usable, and a small status document."""
        registry_ready = source_ready(self.registry)
        issuers = {name: source_ready(source) for name, source in self.issuer_keys.items()}
        ready = registry_ready and all(issuers.values())
        return ready, {"status": "ready" if ready else "not_ready", "registry": registry_ready, "issuers": issuers}

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            # Not proxied: refuse before accepting (policy violation).
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = asgi_raw_path(scope)
        query_at = raw_path.find("?")
        if query_at >= 0:
            raw_path = raw_path[:query_at]
        if raw_path in (HEALTH_PATH, READY_PATH):
            # Anonymous clients learn only whether the gateway is ready, never its issuers or sources.
            ready, _document = self.readiness()
            status = 200 if ready or raw_path == HEALTH_PATH else 503
            await self._send_json(send, status, {"ready": ready})
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        peer = scope.get("client")
        client = peer[0] if peer else None
        if client and self._forwarding.trusted and self._forwarding.is_trusted(client):
            client = self._forwarding.original_client(headers, client)
        request = Request(scope["method"], raw_path, client, start_trace(headers))
        await self._exchange(request, scope, receive, SentTracker(send))

    async def _exchange(self, request: Request, scope: Scope, receive: Receive, send: SentTracker) -> None:
        """Route, verify, authorize, delegate, forward; the audit record is built from what each returned."""
        route: Route | None = None
        verified: Verified | None = None
        decision: Decision | None = None
        admission: Admission | None = None
        error: MeshAuthError | None = None
        try:
            if not self._started:
                await self._ensure_started()
            route, path = self._route(request.path)
            token = self._bearer(scope["headers"])
            attached = otel_context.attach(request.trace.context)  # verify and mint spans join the request's trace
            try:
                verified = await self._verify_token(route, token, scope["headers"])
                decision = self._authorize(route, request.method, path, verified, client=request.client)
                admission = self._admit(route, verified, token, request.client)
            finally:
                otel_context.detach(attached)
            result = await self._forward(request, scope, route, path, admission, receive, send)
        except MeshAuthError as exc:
            error = exc
            result = await self._reject(send, exc)
        except ClientGone as gone:
            result = Result(gone.status, gone.outcome, gone.reason)
        except Exception as exc:
            # A defect: answer 500 if still possible, log the type only (an
            # exception message could quote request data).
            logger.error("gateway: unexpected %s on %s", type(exc).__name__, request.method)
            result = Result(500, "error", _INTERNAL, type(exc).__name__)
            if not send.started:
                await self._send_json(send, 500, {"error": "server_error", "reason": _INTERNAL})
        if AUDIT_LOGGER.isEnabledFor(logging.INFO):
            AuditRecord.of(
                request,
                result,
                route=route.prefix if route is not None else None,
                audience=route.config.service if route is not None else None,
                verified=verified,
                admission=admission,
                error=error,
                decision=decision,
                policy=_policy_for(route, verified) if route is not None and verified is not None else None,
            ).write()

    # -- steps ---------------------------------------------------------------------

    def _route(self, raw_path: str) -> tuple[Route, str]:
        """The route for the canonical form of ``raw_path``, and that form; ``BadPath`` or ``NoRoute`` otherwise."""
        path = canonical_path(raw_path)
        lowered = path.lower()
        for route in self._routes:
            prefix = route.prefix
            if prefix in ("/", path) or path.startswith(prefix + "/"):
                return route, path
            folded = prefix.lower()
            if lowered == folded or lowered.startswith(folded + "/"):
                # Upstreams that ignore case (IIS) would route this to the prefix's service.
                raise BadPath(f"path matches the route {prefix!r} only when case is ignored")
        raise NoRoute("no route matches the path")

    def _bearer(self, headers: list[tuple[bytes, bytes]]) -> str:
        value: bytes | None = None
        for name, header_value in headers:
            if name.lower() == b"authorization":
                if value is not None:
                    raise DuplicateAuthorization("more than one Authorization header", expected=1)
                value = header_value
        if value is None:
            raise MissingCredentials("no bearer credentials")
        limit = self.max_token_bytes + len(_BEARER)
        if len(value) <= limit and value[: len(_BEARER)].lower() == _BEARER:
            token = value[len(_BEARER) :]
            if token and token.isascii() and b" " not in token:
                return token.decode("ascii")
        raise credentials_error(value, limit)

    async def _verify_token(self, route: Route, token: str, headers: list[tuple[bytes, bytes]]) -> Verified:
        """An end user's IdP token, or a service token (and its Txn-Token) on a route that accepts them."""
        if route.config.accept_service_tokens and is_service_token(token):
            txn_token = _txn_header(headers, self.service_verifier.max_token_bytes)
            return Verified(service=await self.service_verifier.averify(token, txn_token, audit=False))
        return Verified(user=await self.user_verifier.averify(token))

    def _admit(self, route: Route, verified: Verified, token: str, client: str | None) -> Admission:
        """The Txn-Token for the request and the gateway's service token for the route, bound to it.

        A user's request gets a new Txn-Token (one per request); a service's
        Txn-Token is forwarded unchanged, never re-issued.
        """
        now = self.clock()
        user, service = verified.user, verified.service
        audience = route.config.service
        if user is not None:
            ttl = max(1, min(self.identity.ttl, MAX_TXN_LIFETIME, int(user.expires_at - now)))
            transaction = secrets.token_urlsafe(16)  # 128 random bits, for the audit record too
            txn_token = self.identity.issue_txn_token(
                user.subject,
                scope=sorted(user.scopes),
                context={"groups": sorted(user.groups), "idp": user.issuer},
                request_context={"req_ip": client} if client else None,
                ttl=ttl,
                trust_domain=self.service_verifier.trust_domain,
                txn=transaction,
            )
            delegated = self.identity.mint(audience, scope=sorted(user.scopes) or None, ttl=ttl, txn_token=txn_token)
            user_token = token if route.config.forward_user_token else None
            return Admission(delegated, user_token, txn_token, transaction, self.identity.name)
        assert service is not None
        ttl = max(1, min(self.identity.ttl, int(service.expires_at - now)))
        delegated = self.identity.mint(audience, scope=service.scope or None, ttl=ttl, txn_token=service.txn_token)
        return Admission(delegated, None, service.txn_token, service.transaction, service.txn_issuer)

    def _authorize(
        self, route: Route, method: str, path: str, verified: Verified, *, client: str | None = None
    ) -> Decision | None:
        """The route's method, the gateway's delegation rules, then the route's policy (``meshauth.Policy``).

        Returns the policy's decision; raises ``AccessDenied`` (or ``MethodNotAllowed``) instead of refusing.
        """
        span = self.telemetry.tracer.start_span("meshauth.authorize")
        user, service, subject = verified.user, verified.service, verified.subject
        error: AccessDenied | None = None
        decision: Decision | None = None
        if route.methods is not None and method not in route.methods:
            detail = f"method {method[:16]} is not allowed on {route.prefix}"
            error = MethodNotAllowed(detail, allow=route.allow.decode("ascii"))
        elif subject == self.config.service:
            # A delegated token for the gateway's own name would read as a plain call by the gateway itself.
            error = AccessDenied("the subject is the gateway's own service name", reason="delegation_not_allowed")
        else:
            policy = _policy_for(route, verified)
            principal = user if user is not None else service
            # A service token is only verified on a route that takes them, so both are set.
            assert policy is not None
            assert principal is not None
            decision = policy.decide(principal, method, path)
            if not decision.allowed:
                error = AccessDenied(decision.detail, reason=_REFUSED.get(decision.refused_by, decision.reason))
        if span.is_recording():
            span.set_attribute("meshauth.audience", route.config.service)
            span.set_attribute("meshauth.subject", subject)
            # For a user, the caller as the gateway sees it: the client address (past trusted proxies).
            caller = service.caller if service is not None else client
            if caller:
                span.set_attribute("meshauth.caller", caller)
            if error is None:
                span.set_attribute("meshauth.outcome", "accepted")
                span.set_attribute("meshauth.reason", "allowed")
        if error is not None:
            mark_rejected(span, error, error.reason, outcome="denied")
        span.end()
        if error is not None:
            raise error
        return decision

    # -- forwarding ------------------------------------------------------------------

    async def _forward(  # noqa: PLR0917 - the request's values, each from its own step
        self,
        request: Request,
        scope: Scope,
        route: Route,
        path: str,
        admission: Admission,
        receive: Receive,
        send: SentTracker,
    ) -> Result:
        """Call the upstream and relay its answer; ``UpstreamUnreachable`` before any byte was sent back."""
        method: str = scope["method"]
        target = route.base_path + forward_path(path, route)
        query: bytes = scope.get("query_string", b"")
        if query:
            target += b"?" + query
        span = self.telemetry.tracer.start_span(method, context=request.trace.context, kind=SpanKind.CLIENT)
        span_id = format(span.get_span_context().span_id, "016x") if is_sdk_span(span, request.trace) else None
        trace_headers = inject(span, request.trace)
        headers, has_body = self._forwarding.request_headers(
            scope, admission.delegated, admission.user_token, trace_headers, admission.txn_token
        )
        if span.is_recording():
            span.set_attribute("http.request.method", method)
            span.set_attribute("server.address", route.base.host)
            if route.base.port is not None:
                span.set_attribute("server.port", route.base.port)
            span.set_attribute("meshauth.audience", route.config.service)
        transport = self._transport
        assert transport is not None
        try:
            # The transport, not an httpx.AsyncClient: a client would keep a
            # cookie jar shared by all users, add its own default headers and
            # cost three times as much per request. Redirects are the client's
            # business and pass through unfollowed.
            body = request_body(receive) if has_body else None
            try:
                if isinstance(transport, UpstreamTransport):
                    headers.insert(0, (b"host", route.authority))
                    response = await transport.exchange(
                        method.encode("ascii"), route.origin, target, headers, body=body, timeouts=route.timeout
                    )
                else:
                    url = self._url(route, target)
                    response = await via_httpx(transport, method, url, headers, body=body, timeouts=route.timeout)
            except httpx.TimeoutException as exc:
                raise self._upstream_failed(span, exc, UpstreamTimeout) from None
            except httpx.HTTPError as exc:
                raise self._upstream_failed(span, exc, UpstreamUnreachable) from None
            if span.is_recording():
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 400:  # an error for a CLIENT span (HTTP semantic conventions)
                    span.set_status(Status(StatusCode.ERROR, f"upstream answered {response.status}"))
            try:
                result = await self._relay(response, receive, send)
            finally:
                await response.aclose()
        finally:
            span.end()
        return dataclasses.replace(result, span_id=span_id) if span_id is not None else result

    def _url(self, route: Route, target: bytes) -> httpx.URL:
        # Building an httpx.URL parses and validates it, a good part of the
        # per-request cost: the URLs of hot paths are kept (bounded).
        key = (route.prefix, target)
        url = self._urls.get(key)
        if url is None:
            url = route.base.copy_with(raw_path=target)
            if len(target) <= 512:
                if len(self._urls) >= 1024:
                    self._urls.clear()
                self._urls[key] = url
        return url

    def _upstream_failed(
        self, span: trace.Span, exc: Exception, kind: type[UpstreamUnreachable]
    ) -> UpstreamUnreachable:
        if span.is_recording():
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {type(exc).__name__}"))
        return kind(f"upstream call failed: {type(exc).__name__}")

    async def _relay(self, response: UpstreamResponse, receive: Receive, send: SentTracker) -> Result:
        """Stream the upstream's answer back; how it ended (a failure after the status line is only recorded)."""
        named = connection_tokens(
            [value.decode("latin-1") for name, value in response.headers if name == b"connection"]
        )
        headers = [
            (name, value)
            for name, value in response.headers
            # An upstream's Meshauth-* headers answer a nonce the gateway never sent for the client.
            if name not in HOP_BY_HOP and name not in named and not name.startswith(_DROPPED_RESPONSE_PREFIXES)
        ]
        status = response.status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # A response without Content-Length may stream for a long time (SSE,
        # long polling): watch for the client leaving so that the upstream
        # stream is dropped too. Sized responses end by themselves, and so does one already whole.
        gone: asyncio.Event | None = None
        watcher = None
        if response.length < 0 and not response.complete:
            gone = asyncio.Event()
            watcher = asyncio.ensure_future(watch_disconnect(receive, gone))
        try:
            # The last piece, when known to be the last as it arrives, is sent as the
            # last message: it leaves with the head in one write when the body is one piece.
            ended = False
            async for chunk in response.chunks():
                if gone is not None and gone.is_set():
                    return Result(status, "error", "client_disconnected")
                ended = response.complete
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return Result(status, "accepted", "ok")
        except httpx.TimeoutException as exc:
            # Too late for a 504: the status line is sent. Ending without the
            # final body message makes the server drop the connection, so the
            # client cannot take a truncated body for a complete one.
            return Result(status, "error", "upstream_timeout", type(exc).__name__)
        except httpx.HTTPError as exc:
            return Result(status, "error", "upstream_stream_error", type(exc).__name__)
        finally:
            if watcher is not None:
                watcher.cancel()

    # -- replies and audit --------------------------------------------------------------

    async def _reject(self, send: SentTracker, exc: MeshAuthError) -> Result:
        """Answer a refusal: the status and body come from the error's class (default_reply)."""
        reply = default_reply(exc, self.realm)
        result = Result(reply.status, outcome_of(exc), exc.reason, exc.detail)
        if send.started:
            return result  # the upstream's answer is already on its way: only the audit record tells
        headers = reply.asgi_headers()
        if isinstance(exc, MethodNotAllowed):
            headers.append((b"allow", exc.allow.encode("ascii")))
        await self._send(send, reply.status, headers, reply.body)
        return result

    async def _send_json(
        self, send: Send, status: int, document: Mapping[str, Any], extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        body = json.dumps(document, separators=(",", ":")).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            *(extra or ()),
        ]
        await self._send(send, status, headers, body)

    async def _send(self, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [*headers, self._date_header()]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _date_header(self) -> tuple[bytes, bytes]:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
        return (b"date", self._date[1])


# -- helpers ------------------------------------------------------------------------------


def _own_identity(
    config: GatewayConfig, clock: Callable[[], float], tracer_provider: trace.TracerProvider | None
) -> ServiceIdentity:
    """The gateway's identity: its key from the configuration, or (Redis registry) one it publishes."""
    if config.signing_key is None and config.key_file is None:
        return publish_own_keys(config, clock=clock, tracer_provider=tracer_provider)
    return ServiceIdentity(config.service, _signing_key(config), clock=clock, tracer_provider=tracer_provider)


async def _close(resource: object) -> None:
    """Close a key source or identity that has ``aclose`` or ``close`` (and nothing else)."""
    aclose = getattr(resource, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(resource, "close", None)
    if close is not None:
        await asyncio.to_thread(close)


def _signing_key(config: GatewayConfig) -> SigningKey:
    """The gateway's own key: given in the configuration, or read from ``key_file``."""
    if config.signing_key is not None:
        return config.signing_key
    assert config.key_file is not None  # without one, _own_identity publishes a key instead
    try:
        return SigningKey.from_file(config.key_file)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{config.source}: key_file: {exc.detail}", reason="invalid_config") from None


def create_app(
    config: GatewayConfig | str | os.PathLike[str],
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    registry: KeySource | None = None,
    issuer_keys: Mapping[str, KeySource] | None = None,
    clock: Callable[[], float] = time.time,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    configure_audit: bool = True,
) -> Gateway:
    """Build the gateway ASGI app from a :class:`GatewayConfig` or a TOML file path.

    ``upstream_transport`` replaces the httpx transport used to reach
    upstreams (tests pass an ``httpx.ASGITransport`` or ``httpx.MockTransport``;
    it is not closed by the gateway); ``registry`` and ``issuer_keys`` replace the key sources named
    in the configuration. ``configure_audit=False`` leaves the
    ``meshauth.audit`` logger alone (the default writes JSON lines to
    ``audit_log``, or stderr, between start-up and shut-down).
    """
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    return Gateway(
        config,
        upstream_transport=upstream_transport,
        registry=registry,
        issuer_keys=issuer_keys,
        clock=clock,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        configure_audit=configure_audit,
    )


def _txn_header(headers: list[tuple[bytes, bytes]], limit: int) -> str | None:
    """The request's one ``Txn-Token`` header, if any (two are ``malformed``)."""
    values = [value for name, value in headers if name.lower() == b"txn-token"]
    return txn_token_value(values[0] if values else None, repeated=len(values) > 1, limit=limit)


def _policy_for(route: Route, verified: Verified) -> Policy | None:
    """The route's policy for this caller: its users' rules for an end user, else its services' rules."""
    return route.users if verified.user is not None else route.services
