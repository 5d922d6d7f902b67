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

Exactly one ``gateway.request`` audit record is written per proxied request,
with the trace id, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import fnmatch
import importlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from time import perf_counter
from typing import Any, Final

import httpx
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import audit as audit_log
from .._discovery import DiscoveredKeys
from .._exceptions import AccessDenied, BadPath, ConfigurationError, KeysUnavailable, MeshAuthError, TokenError
from .._identity import ServiceIdentity
from .._jwks_endpoint import JWKSEndpoint
from .._keys import SigningKey
from .._middleware import (
    DUPLICATE_AUTHORIZATION,
    INSUFFICIENT_SCOPE,
    MISSING_CREDENTIALS,
    asgi_raw_path,
    credentials_error,
    default_reply,
)
from .._policy import normalize_path
from .._principal import Principal
from .._registry import JWKSFile, KeySource
from .._telemetry import AUDIT_LOGGER, Telemetry, audit, mark_rejected
from .._verify import Verifier
from ._config import GatewayConfig, IssuerConfig, RouteConfig, Timeout, is_url, issuer_key_parser, load_config
from ._forwarded import client_address, forwarded_host, forwarded_proto, normal_address
from ._idp import UserPrincipal, UserTokenVerifier, is_service_token
from ._tracing import RequestTrace, inject, is_sdk_span, start_trace
from ._upstream import UpstreamTransport

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("meshauth.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"
AUDIT_EVENT: Final = "gateway.request"

# RFC 9110 section 7.6.1, plus the non-standard ones still seen in the wild.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Inbound headers never forwarded: identity and trace headers the gateway sets
# itself (a client-sent copy would be a forgery), the Host it rewrites, and
# Expect (the server already answered 100-continue).
_NOT_FORWARDED: Final = _HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-authorization",
    b"x-real-ip",
    b"x-client-ip",
    b"true-client-ip",
    b"x-original-url",
    b"x-rewrite-url",
    b"proxy-authorization",
    b"txn-token",
    b"traceparent",
    b"tracestate",
}
_MESHAUTH_PREFIX: Final = b"meshauth-"
# Every X-Forwarded-* (Prefix, Port, ...) and X-Meshauth-* header is the gateway's to set, never the client's.
_DROPPED_PREFIXES: Final = (b"meshauth-", b"x-meshauth-", b"x-forwarded-")
_DROPPED_RESPONSE_PREFIXES: Final = (b"meshauth-", b"x-meshauth-")
_BEARER: Final = b"bearer "
_MAX_AUDIT_PATH: Final = 1024
_INTERNAL: Final = "internal_error"


@dataclasses.dataclass(frozen=True, slots=True)
class _Route:
    """A route compiled for matching and forwarding."""

    config: RouteConfig
    prefix: str
    base: httpx.URL
    base_path: bytes
    methods: frozenset[str] | None
    allow: bytes
    issuers: frozenset[str] | None
    subjects: Callable[[str], bool] | None
    callers: Callable[[str], bool] | None
    groups: frozenset[str] | None
    scopes: frozenset[str]
    timeout: dict[str, float]


def _glob_matcher(patterns: tuple[str, ...] | None) -> Callable[[str], bool] | None:
    if patterns is None:
        return None
    if "*" in patterns:
        return lambda _value: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda value: regex.match(value) is not None


def _httpx_timeout(timeout: Timeout) -> dict[str, float]:
    # The form httpx transports read from ``request.extensions["timeout"]``.
    return {"connect": timeout.connect, "read": timeout.read, "write": timeout.read, "pool": timeout.connect}


def _compile(route: RouteConfig, default_timeout: Timeout) -> _Route:
    base = httpx.URL(route.upstream)
    methods = frozenset(route.methods) if route.methods is not None else None
    return _Route(
        config=route,
        prefix=route.prefix,
        base=base,
        base_path=base.raw_path.split(b"?", 1)[0].rstrip(b"/"),
        methods=methods,
        allow=", ".join(sorted(methods or ())).encode("ascii"),
        issuers=frozenset(route.issuers) if route.issuers is not None else None,
        subjects=_glob_matcher(route.subjects),
        callers=_glob_matcher(route.callers),
        groups=frozenset(route.groups) if route.groups is not None else None,
        scopes=frozenset(route.scopes or ()),
        timeout=_httpx_timeout(route.timeout or default_timeout),
    )


class _Refused(Exception):
    """A request the gateway answers itself (404, 405, 400, 502, 504, ...)."""

    def __init__(self, status: int, error: str, reason: str, detail: str, outcome: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.detail = detail
        self.outcome = outcome
        self.headers: list[tuple[bytes, bytes]] = []


class _ClientGone(Exception):
    """The client disconnected, or the server cut its request body short, while it was being forwarded."""

    def __init__(self, message: Message) -> None:
        reason = message.get("meshauth.reason")
        status = message.get("meshauth.status")
        super().__init__(reason)
        # A server that cut the body short (too slow, too large) says why in the disconnect message.
        self.reason = reason if isinstance(reason, str) else "client_disconnected"
        self.status = status if isinstance(status, int) else 499
        self.outcome = "rejected" if isinstance(status, int) else "error"


class _Exchange:
    """Per-request state, and the fields of the request's one audit record."""

    __slots__ = (
        "actors",
        "caller",
        "client",
        "detail",
        "issuer",
        "jti",
        "kid",
        "method",
        "outcome",
        "path",
        "reason",
        "response_started",
        "route",
        "service",
        "span_id",
        "started",
        "status",
        "subject",
        "trace",
    )

    def __init__(self, method: str, path: str, client: str | None, request_trace: RequestTrace) -> None:
        self.method = method
        self.path = path
        self.client = client
        self.trace = request_trace
        self.span_id = request_trace.hop_id
        self.started = perf_counter()
        self.status = 500
        self.outcome = "error"
        self.reason = _INTERNAL
        self.detail: str | None = None
        self.route: str | None = None
        self.service: str | None = None
        self.caller: str | None = None
        self.issuer: str | None = None
        self.subject: str | None = None
        self.actors: tuple[str, ...] = ()
        self.kid: str | None = None
        self.jti: str | None = None
        self.response_started = False


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
        key = config.signing_key
        if key is None:
            try:
                key = SigningKey.from_file(config.key_file)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{source}: key_file: {exc.detail}", reason="invalid_config") from None
        self.identity = ServiceIdentity(config.service, key, clock=clock, tracer_provider=tracer_provider)
        self._owns_registry = registry is None
        self.registry = registry if registry is not None else open_registry(config.registry, source=source)
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
            max_token_bytes=config.max_token_bytes,
            clock=clock,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.clock = clock
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self.realm = config.service
        self.max_token_bytes = config.max_token_bytes
        self._routes = sorted(
            (_compile(route, config.timeout) for route in config.routes), key=lambda r: len(r.prefix), reverse=True
        )
        self._trusted = config.trusted_proxies
        self._max_hops = config.max_forwarded_hops
        self._trusted_cache: dict[str, bool] = {}
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
            self._transport = _upstream_transport()
        if self._configure_audit and self._audit_handler is None:
            self._audit_level = AUDIT_LOGGER.level
            self._audit_handler = audit_log.configure(self.config.audit_log)
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
        close_registry = getattr(self.registry, "aclose", None) if self._owns_registry else None
        if close_registry is not None:
            await close_registry()
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
        registry_ready = _source_ready(self.registry)
        issuers = {name: _source_ready(source) for name, source in self.issuer_keys.items()}
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
        if client and self._trusted and self._is_trusted(client):
            client = self._original_client(headers, client)
        exchange = _Exchange(scope["method"], raw_path, client, start_trace(headers))
        try:
            if not self._started:
                await self._ensure_started()
            await self._exchange(exchange, scope, raw_path, receive, send)
        except _ClientGone as gone:
            exchange.status, exchange.outcome, exchange.reason = gone.status, gone.outcome, gone.reason
        except Exception as exc:
            # A defect: answer 500 if still possible, log the type only (an
            # exception message could quote request data).
            logger.error("gateway: unexpected %s on %s %s", type(exc).__name__, exchange.method, exchange.route)
            exchange.status, exchange.outcome, exchange.reason = 500, "error", _INTERNAL
            exchange.detail = type(exc).__name__
            if not exchange.response_started:
                await self._send_json(send, 500, {"error": "server_error", "reason": _INTERNAL})
        finally:
            self._audit(exchange)

    async def _exchange(self, ex: _Exchange, scope: Scope, raw_path: str, receive: Receive, send: Send) -> None:
        try:
            try:
                normalized = normalize_path(raw_path)
            except BadPath as invalid:
                raise _Refused(400, "bad_request", "bad_path", invalid.detail, "rejected") from None
            route = self._match(normalized)
            if route is None:
                raise _Refused(404, "not_found", "no_route", "no route matches the path", "denied")
            ex.route = route.prefix
            ex.service = route.config.service
            token = self._bearer(scope["headers"])
            delegated, user_token = await self._authenticate_and_authorize(ex, route, scope["method"], token)
        except _Refused as refused:
            await self._refuse(ex, send, refused)
            return
        except (TokenError, AccessDenied, KeysUnavailable) as exc:
            await self._reject(ex, send, exc)
            return
        try:
            await self._forward(
                ex,
                scope=scope,
                raw_path=raw_path,
                normalized=normalized,
                route=route,
                delegated=delegated,
                user_token=user_token,
                receive=receive,
                send=send,
            )
        except _Refused as refused:
            await self._refuse(ex, send, refused)

    # -- steps ---------------------------------------------------------------------

    def _match(self, path: str) -> _Route | None:
        lowered = path.lower()
        for route in self._routes:
            prefix = route.prefix
            if prefix in ("/", path) or path.startswith(prefix + "/"):
                return route
            folded = prefix.lower()
            if lowered == folded or lowered.startswith(folded + "/"):
                # Upstreams that ignore case (IIS) would route this to the prefix's service.
                raise _Refused(
                    400,
                    "bad_request",
                    "bad_path",
                    f"path matches the route {prefix!r} only when case is ignored",
                    "rejected",
                )
        return None

    def _bearer(self, headers: list[tuple[bytes, bytes]]) -> str:
        value: bytes | None = None
        for name, header_value in headers:
            if name.lower() == b"authorization":
                if value is not None:
                    raise TokenError("more than one Authorization header", reason=DUPLICATE_AUTHORIZATION, expected=1)
                value = header_value
        if value is None:
            raise TokenError("no bearer credentials", reason=MISSING_CREDENTIALS)
        limit = self.max_token_bytes + len(_BEARER)
        if len(value) <= limit and value[: len(_BEARER)].lower() == _BEARER:
            token = value[len(_BEARER) :]
            if token and token.isascii() and b" " not in token:
                return token.decode("ascii")
        raise credentials_error(value, limit)

    async def _authenticate_and_authorize(
        self, ex: _Exchange, route: _Route, method: str, token: str
    ) -> tuple[str, str | None]:
        """Verify the token, apply the route policy, mint the delegated token.

        Returns the delegated token and the user's own token when the route
        forwards it. Runs with the request's trace context attached, so that
        the verifier's and minter's spans join the request's trace.
        """
        attached = otel_context.attach(ex.trace.context)
        try:
            service_principal: Principal | None = None
            user: UserPrincipal | None = None
            if route.config.accept_service_tokens and is_service_token(token):
                service_principal = await self.service_verifier.averify(token, audit=False)
                ex.caller, ex.subject, ex.kid, ex.jti = (
                    service_principal.caller,
                    service_principal.subject,
                    service_principal.kid,
                    service_principal.token_id,
                )
            else:
                try:
                    user = await self.user_verifier.averify(token)
                except TokenError as exc:
                    issuer = getattr(exc, "issuer", None)
                    ex.issuer = issuer if isinstance(issuer, str) else None
                    raise
                ex.issuer, ex.subject, ex.kid, ex.jti = user.issuer, user.subject, user.kid, user.token_id
            self._authorize(ex, route, method, user, service_principal)
            now = self.clock()
            if user is not None:
                ttl = max(1, min(self.identity.ttl, int(user.expires_at - now)))
                scope = sorted(user.scopes) or None
                delegated = self.identity.mint(route.config.service, subject=user.subject, scope=scope, ttl=ttl)
                ex.actors = (self.config.service,)
            else:
                assert service_principal is not None
                ttl = max(1, min(self.identity.ttl, int(service_principal.expires_at - now)))
                delegated = self.identity.on_behalf_of(
                    service_principal, route.config.service, scope=service_principal.scope or None, ttl=ttl
                )
                ex.actors = (self.config.service, *service_principal.actors)
        finally:
            otel_context.detach(attached)
        forwarded_user_token = token if user is not None and route.config.forward_user_token else None
        return delegated, forwarded_user_token

    def _authorize(
        self,
        ex: _Exchange,
        route: _Route,
        method: str,
        user: UserPrincipal | None,
        service: Principal | None,
    ) -> None:
        span = self.telemetry.tracer.start_span("meshauth.authorize")
        subject = user.subject if user is not None else service.subject if service is not None else ""
        denial: tuple[str, str] | None = None
        if route.methods is not None and method not in route.methods:
            denial = ("method_not_allowed", f"method {method[:16]} is not allowed on {route.prefix}")
        elif user is not None:
            if route.issuers is not None and user.issuer not in route.issuers:
                denial = ("issuer_not_allowed", f"issuer {user.issuer[:64]!r} is not accepted on {route.prefix}")
        elif service is not None:
            if route.callers is not None and not route.callers(service.caller):
                denial = ("caller_not_allowed", f"caller {service.caller[:64]!r} may not use {route.prefix}")
            elif self.config.service in service.actors or len(service.actors) >= self.identity.max_actors:
                denial = ("delegation_not_allowed", "the actor chain would repeat the gateway or grow too long")
        if denial is None:
            if subject == self.config.service:
                # A delegated token for the gateway's own name would read as a
                # plain call by the gateway itself.
                denial = ("delegation_not_allowed", "the subject is the gateway's own service name")
            elif route.subjects is not None and not route.subjects(subject):
                denial = ("subject_not_allowed", f"subject {subject[:64]!r} may not use {route.prefix}")
            elif user is not None and route.groups is not None and not (route.groups & user.groups):
                denial = ("group_required", f"{route.prefix} requires one of the groups {sorted(route.groups)}")
            else:
                scopes = user.scopes if user is not None else service.scopes if service is not None else frozenset()
                if not route.scopes <= scopes:
                    denial = (INSUFFICIENT_SCOPE, f"{route.prefix} requires the scopes {sorted(route.scopes)}")
        if span.is_recording():
            span.set_attribute("meshauth.audience", route.config.service)
            span.set_attribute("meshauth.subject", subject)
            # For a user, the caller as the gateway sees it: the client address (past trusted proxies).
            caller = service.caller if service is not None else ex.client
            if caller:
                span.set_attribute("meshauth.caller", caller)
            if denial is None:
                span.set_attribute("meshauth.outcome", "accepted")
                span.set_attribute("meshauth.reason", "allowed")
        if denial is None:
            span.end()
            return
        reason, detail = denial
        error = AccessDenied(detail, reason=reason)
        mark_rejected(span, error, reason, outcome="denied")
        span.end()
        if reason == "method_not_allowed":
            refused = _Refused(405, "method_not_allowed", reason, detail, "denied")
            refused.headers.append((b"allow", route.allow))
            raise refused
        raise error

    # -- forwarding ------------------------------------------------------------------

    async def _forward(
        self,
        ex: _Exchange,
        *,
        scope: Scope,
        raw_path: str,
        normalized: str,
        route: _Route,
        delegated: str,
        user_token: str | None,
        receive: Receive,
        send: Send,
    ) -> None:
        method: str = scope["method"]
        target = route.base_path + _forward_path(normalized, route)
        query: bytes = scope.get("query_string", b"")
        if query:
            target += b"?" + query
        url = self._url(route, target)
        span = self.telemetry.tracer.start_span(method, context=ex.trace.context, kind=SpanKind.CLIENT)
        if is_sdk_span(span, ex.trace):
            ex.span_id = format(span.get_span_context().span_id, "016x")
        trace_headers = inject(span, ex.trace)
        headers, has_body = self._request_headers(scope, delegated, user_token, trace_headers)
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
            request = httpx.Request(
                method,
                url,
                headers=headers,
                content=_body(receive) if has_body else None,
                extensions={"timeout": route.timeout},
            )
            try:
                response = await transport.handle_async_request(request)
            except httpx.TimeoutException as exc:
                raise self._upstream_failed(span, exc, 504, "gateway_timeout", "upstream_timeout") from None
            except httpx.HTTPError as exc:
                raise self._upstream_failed(span, exc, 502, "bad_gateway", "upstream_unreachable") from None
            if span.is_recording():
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 400:  # an error for a CLIENT span (HTTP semantic conventions)
                    span.set_status(Status(StatusCode.ERROR, f"upstream answered {response.status_code}"))
            try:
                await self._relay(ex, response, receive, send)
            finally:
                await response.aclose()
        finally:
            span.end()

    def _url(self, route: _Route, target: bytes) -> httpx.URL:
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

    def _upstream_failed(self, span: trace.Span, exc: Exception, status: int, error: str, reason: str) -> _Refused:
        if span.is_recording():
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, f"{reason}: {type(exc).__name__}"))
        return _Refused(status, error, reason, f"upstream call failed: {type(exc).__name__}", "error")

    async def _relay(self, ex: _Exchange, response: httpx.Response, receive: Receive, send: Send) -> None:
        named = _connection_tokens(response.headers.get_list("connection"))
        headers = [
            (name, value)
            for name, value in ((k.lower(), v) for k, v in response.headers.raw)
            # An upstream's Meshauth-* headers answer a nonce the gateway never sent for the client.
            if name not in _HOP_BY_HOP and name not in named and not name.startswith(_DROPPED_RESPONSE_PREFIXES)
        ]
        ex.status = response.status_code
        ex.outcome, ex.reason = "accepted", "ok"
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        ex.response_started = True
        gone = asyncio.Event()
        # A response without Content-Length may stream for a long time (SSE,
        # long polling): watch for the client leaving so that the upstream
        # stream is dropped too. Sized responses end by themselves.
        watcher = (
            None if "content-length" in response.headers else asyncio.ensure_future(_watch_disconnect(receive, gone))
        )
        try:
            # A transport may hand back a response it already read (httpx.MockTransport).
            chunks = _already_read(response) if response.is_stream_consumed else response.aiter_raw()
            # With a Content-Length the last chunk is known when it arrives: sent as the last
            # message, it leaves with the head in one write when the body is one chunk.
            left, ended = _declared_length(response), False
            async for chunk in chunks:
                if gone.is_set():
                    ex.outcome, ex.reason = "error", "client_disconnected"
                    return
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left != 0})
                ended = left == 0
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.TimeoutException as exc:
            # Too late for a 504: the status line is sent. Ending without the
            # final body message makes the server drop the connection, so the
            # client cannot take a truncated body for a complete one.
            ex.outcome, ex.reason, ex.detail = "error", "upstream_timeout", type(exc).__name__
        except httpx.HTTPError as exc:
            ex.outcome, ex.reason, ex.detail = "error", "upstream_stream_error", type(exc).__name__
        finally:
            if watcher is not None:
                watcher.cancel()

    def _request_headers(
        self,
        scope: Scope,
        delegated: str,
        user_token: str | None,
        trace_headers: list[tuple[bytes, bytes]],
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        inbound: list[tuple[bytes, bytes]] = scope["headers"]
        named: frozenset[bytes] = frozenset()
        forwarded_for: list[bytes] = []
        proto_values: list[bytes] = []
        host_values: list[bytes] = []
        host: bytes | None = None
        has_body = False
        injected = {name for name, _ in trace_headers}
        out: list[tuple[bytes, bytes]] = []
        for raw_name, value in inbound:
            name = raw_name.lower()
            if name == b"connection":
                named = named | _connection_tokens([value.decode("latin-1")])
        for raw_name, value in inbound:
            name = raw_name.lower()
            if name == b"content-length":
                has_body = True  # even when Connection names it: the body is there all the same
            if name in _NOT_FORWARDED or name.startswith(_DROPPED_PREFIXES) or name in named or name in injected:
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif name == b"host":
                    host = value
                elif name == b"x-forwarded-proto":
                    proto_values.append(value)
                elif name == b"x-forwarded-host":
                    host_values.append(value)
                elif name == b"transfer-encoding":
                    has_body = True
                continue
            out.append((name, value))
        peer = scope.get("client")
        peer_host = peer[0] if peer else ""
        if self._trusted and peer_host and self._is_trusted(peer_host):
            # Only the rightmost values were written by trusted proxies (DESIGN section 8).
            hops = [hop for value in forwarded_for for hop in value.split(b",")][-self._max_hops :]
            chain = b", ".join([*(hop.strip() for hop in hops), peer_host.encode("latin-1")])
            out.append((b"x-forwarded-for", chain))
            proto = forwarded_proto(proto_values)
            out.append((b"x-forwarded-proto", (proto or scope.get("scheme", "http")).encode("latin-1")))
            proxied_host = forwarded_host(host_values)
            if proxied_host or host:
                out.append((b"x-forwarded-host", proxied_host.encode("latin-1") if proxied_host else host or b""))
        else:
            if peer_host:
                out.append((b"x-forwarded-for", peer_host.encode("latin-1")))
            out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
            if host:
                out.append((b"x-forwarded-host", host))
        out.extend(trace_headers)
        out.append((b"authorization", b"Bearer " + delegated.encode("ascii")))
        if user_token is not None:
            out.append((b"x-forwarded-authorization", b"Bearer " + user_token.encode("ascii")))
        return out, has_body

    def _original_client(self, headers: list[tuple[bytes, bytes]], peer: str) -> str:
        """The address a trusted proxy says it served: the rightmost untrusted hop of X-Forwarded-For."""
        values = [value for name, value in headers if name.lower() == b"x-forwarded-for"]
        return client_address(values, peer, self._is_trusted_address, max_hops=self._max_hops)[:64]

    def _is_trusted(self, host: str) -> bool:
        known = self._trusted_cache.get(host)
        if known is None:
            address = normal_address(host)
            known = address is not None and self._is_trusted_address(address)
            if len(self._trusted_cache) >= 1024:
                self._trusted_cache.clear()
            self._trusted_cache[host] = known
        return known

    def _is_trusted_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._trusted)

    # -- replies and audit --------------------------------------------------------------

    async def _reject(self, ex: _Exchange, send: Send, exc: MeshAuthError) -> None:
        reply = default_reply(exc, self.realm)
        ex.status = reply.status
        ex.reason = exc.reason
        ex.detail = exc.detail
        ex.outcome = "denied" if isinstance(exc, AccessDenied) else "error" if reply.status == 503 else "rejected"
        if exc.kid and ex.kid is None:
            ex.kid = exc.kid[:256]
        caller = getattr(exc, "caller", None)
        if isinstance(caller, str) and ex.caller is None:
            ex.caller = caller
        await self._send(send, reply.status, reply.asgi_headers(), reply.body)

    async def _refuse(self, ex: _Exchange, send: Send, refused: _Refused) -> None:
        ex.status, ex.outcome, ex.reason, ex.detail = refused.status, refused.outcome, refused.reason, refused.detail
        if ex.response_started:
            return
        await self._send_json(send, refused.status, {"error": refused.error, "reason": refused.reason}, refused.headers)

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

    def _audit(self, ex: _Exchange) -> None:
        if not AUDIT_LOGGER.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "caller": ex.caller,
            "subject": ex.subject,
            "actors": ex.actors,
            "audience": ex.service,
            "kid": ex.kid,
            "jti": ex.jti,
            "method": ex.method,
            "path": ex.path[:_MAX_AUDIT_PATH],
            "client": ex.client,
            "trace_id": ex.trace.trace_id,
            "span_id": ex.span_id,
            "status": ex.status,
            "route": ex.route,
            "duration_ms": round((perf_counter() - ex.started) * 1000, 3),
        }
        if ex.issuer is not None:
            fields["issuer"] = ex.issuer
        if ex.detail is not None:
            fields["detail"] = ex.detail
        audit(AUDIT_EVENT, ex.outcome, ex.reason, **fields)


# -- helpers ------------------------------------------------------------------------------


def _connection_tokens(values: list[str]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration, RFC 9110 7.6.1)."""
    names: set[bytes] = set()
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if name:
                names.add(name.encode("latin-1"))
    return frozenset(names)


def _forward_path(canonical: str, route: _Route) -> bytes:
    """The path sent upstream: byte for byte the canonical path the policy judged.

    With ``strip_prefix`` the route's prefix is removed first (the upstream's
    base path is added by the caller).
    """
    if route.config.strip_prefix and route.prefix != "/":
        rest = canonical[len(route.prefix) :]
        canonical = rest if rest.startswith("/") else "/" + rest
    return canonical.encode("ascii")


def _declared_length(response: httpx.Response) -> int:
    """The response's Content-Length, or -1 (never reached by subtracting chunk sizes) without one."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else -1


async def _already_read(response: httpx.Response) -> AsyncIterator[bytes]:
    yield response.content


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone(message)
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def _source_ready(source: object) -> bool:
    status = getattr(source, "status", None)
    if status is None:
        return True
    try:
        document = status()
    except Exception:
        return False
    return bool(document.get("ready", True)) if isinstance(document, Mapping) else True


def _upstream_transport() -> httpx.AsyncBaseTransport:
    # Upstreams are internal: no HTTP(S)_PROXY from the environment applies
    # (a transport never reads it), and no retries behind the client's back.
    return UpstreamTransport(max_idle=128, keepalive_expiry=30)


def open_registry(location: str, *, source: str = "<config>") -> KeySource:
    """The internal key registry: a :class:`meshauth.JWKSFile`, or a JWKS endpoint for a URL."""
    if not is_url(location):
        try:
            return JWKSFile(location)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: registry: {exc.detail}", reason="invalid_config") from None
    # JWKSEndpoint is newer than the gateway: looked up at run time so that
    # a build without it still serves file registries.
    endpoint: Any = getattr(importlib.import_module("meshauth"), "JWKSEndpoint", None)
    if endpoint is None:
        try:
            endpoint = getattr(importlib.import_module("meshauth._jwks_endpoint"), "JWKSEndpoint", None)
        except ImportError:
            endpoint = None
    if endpoint is None:
        raise ConfigurationError(
            f"{source}: registry: a URL registry needs meshauth.JWKSEndpoint, which this installation lacks; "
            "use a registry file",
            reason="invalid_config",
        )
    keys: KeySource = endpoint(location)
    return keys


# An IdP publishes a handful of keys: 1 MiB is plenty, and bounds what a bad answer costs.
IDP_MAX_JWKS_BYTES: Final = 1 << 20


def open_issuer_keys(issuer: IssuerConfig, *, source: str = "<config>", where: str = "jwks") -> KeySource:
    """An issuer's key set: by OpenID Connect discovery, a :class:`meshauth.JWKSEndpoint` for a URL, or a file."""
    try:
        if issuer.discovery:
            limit = {"max_bytes": IDP_MAX_JWKS_BYTES}
            return DiscoveredKeys(issuer.issuer, algorithms=issuer.algorithms, endpoint_options=limit)
        parser = issuer_key_parser(issuer)
        if is_url(issuer.jwks):
            return JWKSEndpoint(issuer.jwks, parser=parser, max_bytes=IDP_MAX_JWKS_BYTES)
        return JWKSFile(issuer.jwks, parser=parser)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: {where}: {exc.detail}", reason="invalid_config") from None


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
