"""Outbound authentication: :class:`ServiceAuth`, an ``httpx.Auth`` for service calls.

The protocol is written once, as a generator (:meth:`ServiceAuth._flow`) that
yields what it needs next and receives the answer:

* an audience name (``str``): the driver answers with a token for it;
* an ``httpx.Request``: the driver sends it and answers with the response;
* a :class:`_ResponseCheck`: the driver verifies the response token (mutual
  auth) and answers ``None``, or closes the response and raises.

:meth:`ServiceAuth.sync_auth_flow` and :meth:`ServiceAuth.async_auth_flow`
are the two small drivers; they differ only in how a token is obtained
(``token_for`` / ``await atoken_for``) and how a response is verified
(``verify_response`` / ``await averify_response``), so the async client never
blocks its event loop on another task's token refresh or a key fetch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from typing import Any, Final

import httpx
from opentelemetry import metrics, trace

from ._challenge import read_challenge, warn_refused
from ._exceptions import ConfigurationError
from ._identity import ServiceIdentity
from ._mutual import NONCE_HEADER, RESPONSE_HEADER, ResponseVerifier, new_nonce
from ._principal import Principal
from ._registry import KeySource
from ._response_body import bind_body
from ._txn import TXN_TOKEN_HEADER

__all__ = ["ServiceAuth"]

AudienceSpec = str | Mapping[str, str] | Callable[[httpx.Request], str]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclasses.dataclass(frozen=True, slots=True)
class _ResponseCheck:
    """A flow step: prove that ``service`` answered the request that carried ``nonce``."""

    response: httpx.Response
    service: str
    nonce: str


_Step = str | httpx.Request | _ResponseCheck


def _asks_for_new_token(response: httpx.Response, caller: str, audience: str) -> bool:
    """Whether a 401 rejected the token for a reason a new token cures; logs what to fix otherwise."""
    challenge = read_challenge(response.headers.get_list("www-authenticate"))
    if challenge.invalid_token and not challenge.curable:
        url = response.request.url
        target = url.host if url.port is None else f"{url.host}:{url.port}"
        warn_refused(challenge, caller=caller, audience=audience, target=target)
    return challenge.curable


def _replayable(request: httpx.Request) -> bool:
    # Only a body held in memory can be sent twice. A generator or async
    # iterator body (or a multipart upload of open files) may already be
    # consumed, and replaying half of it would corrupt the retry.
    return isinstance(request.stream, httpx.ByteStream)


def _copy(request: httpx.Request) -> httpx.Request:
    # The retry is a request of its own, so the first attempt (kept in
    # ``response.history``) still shows the credentials it was sent with.
    retry = httpx.Request(
        request.method,
        request.url,
        headers=request.headers.copy(),
        stream=request.stream,
        extensions=request.extensions,
    )
    retry.read()  # a replayable body is in memory already: this only exposes it as ``.content``
    return retry


class ServiceAuth(httpx.Auth):
    """Authenticate outgoing ``httpx`` calls as a service of the mesh.

    >>> import httpx
    >>> import meshauth
    >>> from meshauth.testing import Mesh
    >>> mesh = Mesh(["orders", "payments"])
    >>> payments = mesh.verifier("payments")
    >>> def app(request: httpx.Request) -> httpx.Response:
    ...     token = request.headers["Authorization"].removeprefix("Bearer ")
    ...     return httpx.Response(200, json={"caller": payments.verify(token).caller})
    >>> auth = meshauth.ServiceAuth(mesh.identity("orders"), audience="payments")
    >>> with httpx.Client(auth=auth, transport=httpx.MockTransport(app)) as client:
    ...     client.get("https://payments.internal/charges").json()
    {'caller': 'orders'}

    Each request gets ``Authorization: Bearer <token>``, a token from
    ``identity.token_for(audience)`` (cached and refreshed ahead of expiry by
    the identity), or a new one per request with ``fresh_tokens=True`` (for
    callees that run a replay cache).

    ``audience`` names the service being called: a fixed name; a mapping from
    request host (``"payments.internal"``, or ``"host:port"``, which is tried
    first) to service name, copied at construction; or a callable taking the
    ``httpx.Request``. A request whose audience cannot be resolved raises
    :class:`~meshauth.ConfigurationError` (reason ``unknown_audience``)
    before anything is sent: a token for the wrong service is never guessed.

    On a ``401`` whose ``WWW-Authenticate`` carries ``error="invalid_token"``
    with a reason a new token cures (``expired``, ``unknown_kid``,
    ``key_expired``, ``replayed``, ``bad_signature``, or no reason given: e.g.
    after a key rotation), the cached token is dropped and the request is
    retried once with a new one. Other reasons (``wrong_audience``,
    ``not_yet_valid``, ...) are not retried: the ``meshauth`` logger warns with
    the realm that answered, the audience used and what to fix. A second
    ``401`` is returned to the caller, and a request whose body is a stream
    that cannot be replayed is never retried.

    With ``verify_responses`` (a key source, or a ready
    :class:`~meshauth.ResponseVerifier` for this service), every request also
    carries a fresh ``Meshauth-Nonce``, and every response, whatever its
    status, must carry a ``Meshauth-Response`` token signed by the audience
    service, addressed to this service (``"-"`` only on a ``401``), bound to
    that nonce and to the status received; otherwise
    :class:`~meshauth.ResponseAuthError` is raised (after closing the
    response). The token's ``body_sha256`` is checked on the bytes as they
    arrive: a body that differs raises :class:`~meshauth.BodyMismatch` when
    it has been read (``response.read()``, or the end of
    ``client.stream(...)``), before it is handed out whole. A response whose
    token does not bind the body (a streamed or large answer) raises
    :class:`~meshauth.UnboundBody` unless ``allow_unbound_body=True``.

    ``on_behalf_of`` (the inbound request's :class:`~meshauth.Principal`)
    makes every request part of that request's transaction: the principal's
    Txn-Token is forwarded unchanged in the ``Txn-Token`` header and each
    service token is bound to it (``tth``). Build one ``ServiceAuth`` per
    inbound request for this; its tokens are cached per Txn-Token.

    ``clock`` (default: the identity's clock), ``tracer_provider`` and
    ``meter_provider`` configure the response verifier built from a key
    source. Outbound authentication itself emits no span of its own: minting
    is traced as ``meshauth.mint`` and response checks as
    ``meshauth.response.verify``.

    One instance may be shared by any number of clients, threads and tasks:
    all per-request state lives in the request's own flow.
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        identity: ServiceIdentity,
        audience: AudienceSpec,
        *,
        verify_responses: KeySource | ResponseVerifier | None = None,
        allow_unbound_body: bool = False,
        fresh_tokens: bool = False,
        scope: str | None = None,
        on_behalf_of: Principal | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(identity, ServiceIdentity):
            raise TypeError("identity must be a meshauth.ServiceIdentity")
        self.identity = identity
        self.allow_unbound_body = allow_unbound_body
        self.on_behalf_of = on_behalf_of
        self.txn_token = None if on_behalf_of is None else on_behalf_of.txn_token
        self.fresh_tokens = bool(fresh_tokens)
        self.scope = normalize_scope(scope)
        # Exactly one of these is set; a fixed name costs nothing per request.
        self._audience, self._hosts, self._audience_of = split_audience(audience)
        self.response_verifier = response_verifier(
            identity,
            verify_responses,
            clock=clock if clock is not None else identity.clock,  # a test mesh's fake clock works as is
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )

    # -- the protocol, once ----------------------------------------------------------

    def _flow(self, request: httpx.Request) -> Generator[_Step, str | httpx.Response | None, None]:
        audience = self._audience if self._audience is not None else self.audience_for(request)
        token = self._fresh(audience) if self.fresh_tokens else (yield audience)
        nonce = self._attach(request, token)
        response = yield request
        assert isinstance(response, httpx.Response)

        if (
            response.status_code == 401
            and _asks_for_new_token(response, self.identity.name, audience)
            and _replayable(request)
        ):
            if self.fresh_tokens:
                token = self._fresh(audience)
            else:
                # Drop the cached token only if it is still the rejected one:
                # when many requests fail at once, the first re-mints and the
                # others pick up its token instead of discarding it in turn.
                cached = yield audience
                if cached == token:
                    self.identity.invalidate(audience)
                    cached = yield audience
                token = cached
            retry = _copy(request)
            nonce = self._attach(retry, token)
            response = yield retry  # retried once: whatever comes back is the answer
            assert isinstance(response, httpx.Response)

        if nonce is not None:
            yield _ResponseCheck(response, audience, nonce)

    def _fresh(self, audience: str) -> str:
        return self.identity.mint(audience, scope=self.scope, txn_token=self.txn_token)

    def _attach(self, request: httpx.Request, token: str | httpx.Response | None) -> str | None:
        """Put the credentials on ``request``; return the nonce sent, if mutual auth is on."""
        assert isinstance(token, str)
        headers = request.headers
        headers["Authorization"] = "Bearer " + token
        if self.txn_token is not None:
            headers[TXN_TOKEN_HEADER] = self.txn_token
        if self.response_verifier is None:
            return None
        # A new nonce per attempt: a retry must not accept the first attempt's answer.
        nonce = new_nonce()
        headers[NONCE_HEADER] = nonce
        return nonce

    # -- the drivers -------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Drive the flow for ``httpx.Client``: blocking token refresh and key lookups."""
        flow = self._flow(request)
        step = next(flow)
        while True:
            answer: str | httpx.Response | None
            if isinstance(step, httpx.Request):
                answer = yield step
            elif isinstance(step, _ResponseCheck):
                self._check_sync(step)
                answer = None
            else:
                answer = self.identity.token_for(step, scope=self.scope, txn_token=self.txn_token)
            try:
                step = flow.send(answer)
            except StopIteration:
                return

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Drive the flow for ``httpx.AsyncClient``: refreshes and key fetches never block the loop."""
        flow = self._flow(request)
        step = next(flow)
        while True:
            answer: str | httpx.Response | None
            if isinstance(step, httpx.Request):
                answer = yield step
            elif isinstance(step, _ResponseCheck):
                await self._check_async(step)
                answer = None
            else:
                answer = await self.identity.atoken_for(step, scope=self.scope, txn_token=self.txn_token)
            try:
                step = flow.send(answer)
            except StopIteration:
                return

    def _check_sync(self, check: _ResponseCheck) -> None:
        assert self.response_verifier is not None
        response = check.response
        try:
            proof = self.response_verifier.verify_response(
                response.headers.get(RESPONSE_HEADER),
                service=check.service,
                nonce=check.nonce,
                status=response.status_code,
            )
            bind_body(response, proof, check.service, allow_unbound=self.allow_unbound_body)
        except BaseException:
            # An unauthenticated answer is never handed out, not even its body.
            response.close()
            raise

    async def _check_async(self, check: _ResponseCheck) -> None:
        assert self.response_verifier is not None
        response = check.response
        try:
            proof = await self.response_verifier.averify_response(
                response.headers.get(RESPONSE_HEADER),
                service=check.service,
                nonce=check.nonce,
                status=response.status_code,
            )
            bind_body(response, proof, check.service, allow_unbound=self.allow_unbound_body)
        except BaseException:
            await response.aclose()
            raise

    # -- audiences ---------------------------------------------------------------------

    def audience_for(self, request: httpx.Request) -> str:
        """The service name ``request`` is meant for.

        Raises:
            ConfigurationError: reason ``unknown_audience`` when the host is not
                in the mapping, or the callable fails or returns no name.
        """
        if self._audience is not None:
            return self._audience
        if self._hosts is not None:
            url = request.url
            return audience_of_host(self._hosts, url.scheme, url.host, url.port)
        assert self._audience_of is not None
        try:
            audience = self._audience_of(request)
        except Exception as exc:
            raise ConfigurationError(
                f"the audience callable raised {type(exc).__name__}", reason="unknown_audience", actual=request.url.host
            ) from exc
        if not isinstance(audience, str) or not audience:
            raise ConfigurationError(
                "the audience callable returned no service name",
                reason="unknown_audience",
                expected="a non-empty str",
                actual=audience if audience is None or isinstance(audience, str) else type(audience).__name__,
            )
        return audience

    def __repr__(self) -> str:
        if self._audience is not None:
            audience = repr(self._audience)
        elif self._hosts is not None:
            audience = f"<{len(self._hosts)} hosts>"
        else:
            audience = "<callable>"
        return (
            f"ServiceAuth({self.identity.name!r}, audience={audience}, "
            f"mutual={self.response_verifier is not None}, fresh_tokens={self.fresh_tokens})"
        )


def normalize_scope(scope: str | None) -> str | None:
    if scope is None:
        return None
    if not isinstance(scope, str) or not scope.split():
        raise ConfigurationError(
            "scope must be a non-empty space-separated string", reason="invalid_scope", actual=type(scope).__name__
        )
    return " ".join(scope.split())


def split_audience(audience: object) -> tuple[str | None, dict[str, str] | None, Callable[[Any], str] | None]:
    """An audience argument as exactly one of (fixed name, host table, callable); shared by the clients."""
    if isinstance(audience, str):
        if not audience:
            raise ConfigurationError(
                "audience must be a non-empty service name", reason="invalid_audience", actual=audience
            )
        return audience, None, None
    if isinstance(audience, Mapping):
        return None, host_table(audience), None
    if callable(audience):
        return None, None, audience
    raise ConfigurationError(
        "audience must be a service name, a mapping from host to service name, or a callable",
        reason="invalid_audience",
        expected="str | Mapping[str, str] | Callable[[request], str]",
        actual=type(audience).__name__,
    )


def audience_of_host(hosts: Mapping[str, str], scheme: str, host: str, port: int | None) -> str:
    """The service name for a request to ``host`` (``host:port`` is tried first), or ``unknown_audience``."""
    host = host.lower()
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    if port is not None:
        found = hosts.get(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if found is not None:
            return found
    found = hosts.get(host)
    if found is not None:
        return found
    raise ConfigurationError(
        "no audience configured for the request's host",
        reason="unknown_audience",
        expected=sorted(hosts)[:8],
        actual=host,
    )


def host_table(mapping: Mapping[str, str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for host, service in mapping.items():
        if not isinstance(host, str) or not host or not isinstance(service, str) or not service:
            raise ConfigurationError(
                "an audience mapping maps non-empty host names to non-empty service names",
                reason="invalid_audience",
                actual=f"{host!r} -> {service!r}",
            )
        # httpx lower-cases hosts; so must the table, or "Payments.internal" never matches.
        table[host.lower()] = service
    return table


def response_verifier(
    identity: ServiceIdentity,
    source: KeySource | ResponseVerifier | None,
    *,
    clock: Callable[[], float],
    tracer_provider: trace.TracerProvider | None,
    meter_provider: metrics.MeterProvider | None,
) -> ResponseVerifier | None:
    """The checker of response tokens addressed to ``identity`` (``verify_responses=`` of the clients)."""
    if source is None:
        return None
    if isinstance(source, ResponseVerifier):
        if source.audience != identity.name:
            raise ConfigurationError(
                "the response verifier checks responses addressed to another service",
                reason="invalid_configuration",
                expected=identity.name,
                actual=source.audience,
            )
        return source
    if not isinstance(source, KeySource):
        raise TypeError("verify_responses must be a key source (get_key/aget_key) or a meshauth.ResponseVerifier")
    return ResponseVerifier(
        identity.name, source, clock=clock, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
