"""gRPC integration: server interceptors that verify callers, client interceptors that attach tokens.

``pip install 'meshauth[grpc]'``. Server side (sync ``grpc`` and ``grpc.aio``)::

    server = grpc.server(executor, interceptors=[MeshAuthInterceptor(verifier, policy=policy)])
    server = grpc.aio.server(interceptors=[AsyncMeshAuthInterceptor(verifier)])

    def Charge(self, request, context):
        principal = meshauth.grpc.principal(context)   # who called, verified

Each call's ``authorization`` metadata must be ``Bearer <service token>``; the
policy judges the method path (``/pkg.Service/Method``) as a ``POST``.
Refusals map to status codes: a missing or bad token is ``UNAUTHENTICATED``,
a policy denial ``PERMISSION_DENIED``, an unreadable registry ``UNAVAILABLE``;
the details are the HTTP middleware's JSON body (``{"error": ..., "reason":
...}``) and its ``WWW-Authenticate`` / ``Retry-After`` go in the trailing
metadata. Every call gets one audit record, as for HTTP.

Client side: :class:`MeshAuthClientInterceptor` (``grpc.intercept_channel``),
:func:`async_client_interceptors` (``grpc.aio.insecure_channel(...,
interceptors=...)``) or, on a secure channel, :func:`call_credentials`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple

from opentelemetry import trace

from ._challenge import read_challenge, warn_refused
from ._exceptions import BadPath, DuplicateAuthorization, MeshAuthError, MissingCredentials
from ._identity import ServiceIdentity
from ._middleware import Reply, RequestGuard
from ._paths import routed_path
from ._policy import Decision, Policy
from ._principal import Principal
from ._telemetry import AUDIT_LOGGER
from ._verify import Verifier

try:
    import grpc
    import grpc.aio
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("meshauth.grpc needs the 'grpc' extra: pip install 'meshauth[grpc]'") from exc

__all__ = [
    "AsyncMeshAuthInterceptor",
    "AuthenticatedContext",
    "MeshAuthClientInterceptor",
    "MeshAuthInterceptor",
    "async_client_interceptors",
    "call_credentials",
    "principal",
]

TXN_TOKEN_METADATA: Final = "txn-token"  # noqa: S105 - a metadata key, not a secret
_POLICY_METHOD: Final = "POST"  # gRPC calls are HTTP/2 POSTs
_STATUS_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    503: grpc.StatusCode.UNAVAILABLE,
}

Metadata = Sequence[tuple[str, str | bytes]]
AudienceSpec = str | Callable[[str], str]


class AuthenticatedContext:
    """The servicer context of an authenticated call: the original context plus ``principal``.

    Every attribute other than ``principal`` is the wrapped context's, so
    servicers use it exactly as a ``grpc.ServicerContext``.
    """

    __slots__ = ("_context", "principal")

    def __init__(self, context: Any, principal: Principal) -> None:
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def principal(context: object) -> Principal:
    """The verified caller of the call ``context`` belongs to (raises ``TypeError`` without the interceptor)."""
    if isinstance(context, AuthenticatedContext):
        return context.principal
    raise TypeError("no meshauth principal on this context: is MeshAuthInterceptor installed on the server?")


class _Refusal(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...]


def _refusal(reply: Reply) -> _Refusal:
    trailers = tuple(
        (name.lower(), value) for name, value in reply.headers if name.lower() in ("www-authenticate", "retry-after")
    )
    return _Refusal(_STATUS_CODES.get(reply.status, grpc.StatusCode.INTERNAL), reply.body.decode("ascii"), trailers)


class _ServerGuard:
    """The steps shared by the sync and asyncio server interceptors (their base class)."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        policy: Policy | None = None,
        exclude: Iterable[str] = (),
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.guard = RequestGuard(
            verifier,
            policy=policy,
            exclude=exclude,
            identity=None,
            tracer_provider=tracer_provider,
            on_error=None,
            retry_after=5,
        )

    def token(self, context: Any) -> str:
        values = [value for key, value in context.invocation_metadata() if key == "authorization"]
        if not values:
            raise MissingCredentials("the call has no bearer credentials")
        if len(values) > 1:
            raise DuplicateAuthorization("more than one authorization metadata entry", expected=1)
        value = values[0]
        return self.guard.bearer(value if isinstance(value, bytes) else value.encode("latin-1", "replace"))

    def txn_token(self, context: Any) -> str | None:
        """The call's one ``txn-token`` metadata entry, if any (two are ``malformed``)."""
        values = [value for key, value in context.invocation_metadata() if key == TXN_TOKEN_METADATA]
        value = values[0] if values else None
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        return self.guard.txn_token(raw, repeated=len(values) > 1)

    def skips(self, method: str) -> bool:
        """True if ``method`` is excluded from authentication, and canonical: a non-canonical one is refused."""
        if not self.guard.excluded(method):
            return False
        try:
            _check_method_path(method)
        except BadPath:
            return False  # judged, and refused as bad_path (an excluded prefix followed by %2e%2e/...)
        return True

    def judge(self, method: str, context: Any) -> Principal | _Refusal:
        """The verified caller of a sync call, or why it is refused."""
        try:
            _check_method_path(method)
            caller = self.guard.verifier.verify(self.token(context), self.txn_token(context), audit=False)
        except Exception as exc:
            return self.refuse(exc, method, context)
        return self.admit(caller, method, context) or caller

    async def ajudge(self, method: str, context: Any) -> Principal | _Refusal:
        """The verified caller of an asyncio call, or why it is refused."""
        try:
            _check_method_path(method)
            caller = await self.guard.verifier.averify(self.token(context), self.txn_token(context), audit=False)
        except Exception as exc:
            return self.refuse(exc, method, context)
        return self.admit(caller, method, context) or caller

    def admit(self, principal: Principal, method: str, context: Any) -> _Refusal | None:
        """The policy's verdict and the audit record for a verified call; None when admitted."""
        guard = self.guard
        decision: Decision | None = None
        span = None
        if guard.policy is not None:
            decision, denied, span = guard.authorize(guard.policy, principal, _POLICY_METHOD, method)
            if denied is not None:
                return self.refuse(denied, method, context, principal=principal, span=span)
        if AUDIT_LOGGER.isEnabledFor(logging.INFO):
            guard.audit_accepted(principal, decision, span, **_call_fields(method, context))
        return None

    def refuse(
        self, exc: BaseException, method: str, context: Any, *, principal: Principal | None = None, span: Any = None
    ) -> _Refusal:
        reply = self.guard.reply(exc)
        self.guard.audit_refused(exc, reply, principal=principal, span=span, **_call_fields(method, context))
        return _refusal(reply)


def _check_method_path(method: str) -> None:
    """Refuse (``BadPath``, INVALID_ARGUMENT) a method path the policy would judge in another form.

    gRPC hands a handler the ``:path`` exactly as sent, and a generic handler may route on it as it
    likes: ``/admin.Svc/x/../../pub.Svc/Get`` must not be judged as ``/pub.Svc/Get`` and then run
    an admin method. A method path is canonical (``/package.Service/Method``), so anything that
    canonicalisation would change (dot-segments, ``%2e``, ``//``, a query) is refused.
    """
    if "?" in method:
        raise BadPath("a gRPC method path has no query", expected="/package.Service/Method", actual=method[:80])
    routed_path(method)


def _call_fields(method: str, context: Any) -> dict[str, Any]:
    traceparent = next((v for k, v in context.invocation_metadata() if k == "traceparent"), None)
    return {
        "method": _POLICY_METHOD,
        "path": method,
        "client": context.peer(),
        "traceparent": traceparent if isinstance(traceparent, str) else None,
    }


def _replace_behavior(
    handler: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its one behaviour wrapped by ``wrap``."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary), handler.request_deserializer, handler.response_serializer
    )


class MeshAuthInterceptor(_ServerGuard, grpc.ServerInterceptor):
    """Verify every call of a sync ``grpc`` server; the principal is on the servicer context.

    ``exclude`` lists method paths (``/grpc.health.v1.Health/Check``, or a
    ``/pkg.Service/*`` prefix) that skip authentication. Verification runs in
    the server's worker threads, not in its event loop.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self.skips(method):
            return handler
        judge = self.judge

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                outcome = judge(method, context)
                if isinstance(outcome, Principal):
                    return behavior(request, AuthenticatedContext(context, outcome))
                context.set_trailing_metadata(outcome.trailers)
                context.abort(outcome.code, outcome.details)

            return guarded

        return _replace_behavior(handler, wrap)


class AsyncMeshAuthInterceptor(_ServerGuard, grpc.aio.ServerInterceptor):
    """:class:`MeshAuthInterceptor` for ``grpc.aio`` servers (key fetches never block the loop)."""

    async def _caller(self, method: str, context: Any) -> Principal:
        outcome = await self.ajudge(method, context)
        if isinstance(outcome, Principal):
            return outcome
        context.set_trailing_metadata(outcome.trailers)
        await context.abort(outcome.code, outcome.details)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self.skips(method):
            return handler  # type: ignore[no-any-return]
        judge = self._caller

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                    caller = await judge(method, context)
                    async for item in behavior(request, AuthenticatedContext(context, caller)):
                        yield item

                return streamed

            async def unary(request: Any, context: Any) -> Any:
                caller = await judge(method, context)
                result = behavior(request, AuthenticatedContext(context, caller))
                return await result if inspect.isawaitable(result) else result

            return unary

        return _replace_behavior(handler, wrap)


# -- client side -----------------------------------------------------------------------------


class _Credentials:
    """Which token and metadata a call gets; shared by the client interceptors and call credentials."""

    def __init__(
        self,
        identity: ServiceIdentity,
        audience: AudienceSpec,
        *,
        scope: str | None,
        on_behalf_of: Principal | None,
    ) -> None:
        if not isinstance(identity, ServiceIdentity):
            raise TypeError("identity must be a meshauth.ServiceIdentity")
        if not (isinstance(audience, str) and audience) and not callable(audience):
            raise MeshAuthError(
                "audience must be a service name or a callable taking the method path", reason="invalid_audience"
            )
        self.identity = identity
        self.audience = audience
        self.scope = scope
        self.on_behalf_of = on_behalf_of

    def audience_for(self, method: str) -> str:
        audience = self.audience if isinstance(self.audience, str) else self.audience(method)
        if not isinstance(audience, str) or not audience:
            raise MeshAuthError(f"no audience for gRPC method {method!r}", reason="unknown_audience")
        return audience

    def with_token(self, token: str) -> list[tuple[str, str]]:
        metadata = [("authorization", "Bearer " + token)]
        txn_token = getattr(self.on_behalf_of, "txn_token", None)
        if isinstance(txn_token, str) and txn_token:
            metadata.append((TXN_TOKEN_METADATA, txn_token))
        return metadata

    def metadata(self, method: str) -> list[tuple[str, str]]:
        audience = self.audience_for(method)
        txn_token = None if self.on_behalf_of is None else self.on_behalf_of.txn_token
        return self.with_token(self.identity.token_for(audience, scope=self.scope, txn_token=txn_token))

    async def ametadata(self, method: str) -> list[tuple[str, str]]:
        txn_token = None if self.on_behalf_of is None else self.on_behalf_of.txn_token
        audience = self.audience_for(method)
        return self.with_token(await self.identity.atoken_for(audience, scope=self.scope, txn_token=txn_token))

    def renew(self, method: str, code: grpc.StatusCode, trailers: Metadata | None) -> bool:
        """After a finished call: True if it was refused for a reason a new token cures (the cached one is dropped).

        For any other refusal of the token, the ``meshauth`` logger says what to fix.
        """
        if code != grpc.StatusCode.UNAUTHENTICATED:
            return False
        challenge = read_challenge(str(v) for k, v in trailers or () if k == "www-authenticate")
        audience = self.audience_for(method)
        if not challenge.curable:
            if challenge.invalid_token:
                warn_refused(challenge, caller=self.identity.name, audience=audience, target=method)
            return False
        self.identity.invalidate(audience)
        return True


def _method_name(method: str | bytes) -> str:
    return method.decode("ascii") if isinstance(method, bytes) else method


class _ClientCallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Metadata | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class MeshAuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Attach ``authorization: Bearer <token>`` to every call of a sync channel.

    >>> import grpc
    >>> from meshauth.testing import Mesh
    >>> mesh = Mesh(["orders", "payments"])
    >>> channel = grpc.intercept_channel(
    ...     grpc.insecure_channel("127.0.0.1:50051"), MeshAuthClientInterceptor(mesh.identity("orders"), "payments")
    ... )

    ``audience``: the callee's service name, or a callable taking the method
    path. A unary call refused ``UNAUTHENTICATED`` for a reason a new token
    cures (``expired``, ``unknown_kid``, ``key_expired``, ``replayed``,
    ``bad_signature``) is retried once with a new token; other refusals of the
    token are logged with what to fix. ``on_behalf_of`` (the inbound request's principal) forwards its Txn-Token
    unchanged as ``txn-token`` metadata and binds each call's token to it (``tth``).
    """

    def __init__(
        self,
        identity: ServiceIdentity,
        audience: AudienceSpec,
        *,
        scope: str | None = None,
        on_behalf_of: Principal | None = None,
    ) -> None:
        self._credentials = _Credentials(identity, audience, scope=scope, on_behalf_of=on_behalf_of)

    def _details(self, details: grpc.ClientCallDetails) -> _ClientCallDetails:
        method = _method_name(details.method)
        return _ClientCallDetails(
            method,
            details.timeout,
            [*(details.metadata or ()), *self._credentials.metadata(method)],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        # Retried once when a new token cures the refusal; this waits for the call to finish.
        call = continuation(self._details(client_call_details), request)
        method = _method_name(client_call_details.method)
        if self._credentials.renew(method, call.code(), call.trailing_metadata()):
            call = continuation(self._details(client_call_details), request)
        return call

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _AsyncClientInterceptor:
    """Adds the credentials to a ``grpc.aio`` call; one subclass per call kind (aio takes one kind per object)."""

    def __init__(self, credentials: _Credentials) -> None:
        self._credentials = credentials

    async def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in await self._credentials.ametadata(_method_name(details.method)):
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AsyncUnaryUnary(_AsyncClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(await self._details(client_call_details), request)
        method = _method_name(client_call_details.method)
        if self._credentials.renew(method, await call.code(), await call.trailing_metadata()):
            call = await continuation(await self._details(client_call_details), request)
        return call


class _AsyncUnaryStream(_AsyncClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _AsyncStreamUnary(_AsyncClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


class _AsyncStreamStream(_AsyncClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


def async_client_interceptors(
    identity: ServiceIdentity,
    audience: AudienceSpec,
    *,
    scope: str | None = None,
    on_behalf_of: Principal | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """:class:`MeshAuthClientInterceptor` for ``grpc.aio`` channels: one interceptor per call kind.

    ``grpc.aio.insecure_channel(target, interceptors=async_client_interceptors(me, "payments"))``;
    token refreshes never block the event loop.
    """
    credentials = _Credentials(identity, audience, scope=scope, on_behalf_of=on_behalf_of)
    return [kind(credentials) for kind in (_AsyncUnaryUnary, _AsyncUnaryStream, _AsyncStreamUnary, _AsyncStreamStream)]


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, credentials: _Credentials) -> None:
        self._credentials = credentials

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            metadata = self._credentials.metadata(context.method_name)
        except Exception as exc:
            callback((), exc)
            return
        callback(tuple(metadata), None)


def call_credentials(
    identity: ServiceIdentity,
    audience: AudienceSpec,
    *,
    scope: str | None = None,
    on_behalf_of: Principal | None = None,
) -> grpc.CallCredentials:
    """Per-call credentials carrying a service token, for secure channels.

    ``grpc.composite_channel_credentials(grpc.ssl_channel_credentials(), call_credentials(me, "payments"))``.
    gRPC sends call credentials only over TLS (or ``grpc.local_channel_credentials()``); on a
    plain channel use :class:`MeshAuthClientInterceptor`. With a callable ``audience``, it
    receives the method name (gRPC gives plugins the method, not the full path).
    """
    return grpc.metadata_call_credentials(
        _TokenPlugin(_Credentials(identity, audience, scope=scope, on_behalf_of=on_behalf_of))
    )
