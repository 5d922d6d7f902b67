"""Tests for meshauth._httpx: ServiceAuth on httpx.Client and httpx.AsyncClient.

Three kinds of transport: httpx.MockTransport (most tests, sync and async),
respx (routing by host), and a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import enum
import io
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from cryptography.hazmat.primitives.asymmetric import ec

import meshauth
from meshauth import ConfigurationError, ResponseAuthError, ResponseVerifier, ServiceIdentity, SigningKey
from meshauth._httpx import ServiceAuth
from meshauth._mutual import NONCE_HEADER, RESPONSE_HEADER
from meshauth._proof import unverified_caller
from meshauth.testing import FakeClock, Mesh

URL = "https://payments.internal/charges"
INVALID_TOKEN = 'Bearer realm="payments", error="invalid_token", error_description="expired"'

Handler = Callable[[httpx.Request], httpx.Response]


# -- helpers ---------------------------------------------------------------------------


def bearer(request: httpx.Request) -> str:
    value = request.headers["Authorization"]
    assert value.startswith("Bearer ")
    return value.removeprefix("Bearer ")


class Callee:
    """A MockTransport handler playing a service: verifies tokens, records calls, signs answers.

    ``script`` lists, per call, what to answer: ``"ok"`` (200, signed when a
    nonce came), ``"invalid"`` (401 invalid_token), ``"missing"`` (401 without
    an error code), ``"unavailable"`` (503), or a callable building the response.
    Calls beyond the script answer ``"ok"``.
    """

    def __init__(self, mesh: Mesh, name: str = "payments", script: tuple[Any, ...] = ()) -> None:
        self.mesh = mesh
        self.name = name
        self.verifier = mesh.verifier(name)
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()

    @property
    def tokens(self) -> list[str]:
        return [bearer(request) for request in self.requests]

    @property
    def nonces(self) -> list[str | None]:
        return [request.headers.get(NONCE_HEADER) for request in self.requests]

    def sign(
        self, request: httpx.Request, signer: str | None = None, *, status: int = 200, body: bytes | None = None
    ) -> dict[str, str]:
        nonce = request.headers.get(NONCE_HEADER)
        if nonce is None:
            return {}
        caller = unverified_caller(bearer(request))  # as the middleware does, refused or not
        token = self.mesh.identity(signer or self.name).mint_response(caller, nonce, status=status, body=body)
        return {RESPONSE_HEADER: token}

    def answer(self, request: httpx.Request, status: int, document: Any, **headers: str) -> httpx.Response:
        """A JSON answer, signed (status and body) when the request asked for proof."""
        body = json.dumps(document).encode()
        proof = self.sign(request, status=status, body=body)
        return httpx.Response(status, content=body, headers={"content-type": "application/json", **headers, **proof})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            step = self.script.pop(0) if self.script else "ok"
        if callable(step):
            return step(request)  # type: ignore[no-any-return]
        if step == "invalid":
            return self.answer(request, 401, {"error": "invalid_token"}, **{"WWW-Authenticate": INVALID_TOKEN})
        if step == "missing":
            return self.answer(
                request, 401, {"error": "unauthorized"}, **{"WWW-Authenticate": 'Bearer realm="payments"'}
            )
        if step == "unavailable":
            return self.answer(request, 503, {"error": "keys_unavailable"})
        principal = self.verifier.verify(bearer(request))
        return self.answer(request, 200, {"caller": principal.caller})


def call(
    auth: httpx.Auth,
    handler: Callable[[httpx.Request], Any],
    mode: str,
    method: str = "GET",
    url: str = URL,
    **kwargs: Any,
) -> httpx.Response:
    """One request through httpx.Client (mode "sync") or httpx.AsyncClient (mode "async")."""
    transport = httpx.MockTransport(handler)
    if mode == "sync":
        with httpx.Client(auth=auth, transport=transport) as client:
            return client.request(method, url, **kwargs)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth, transport=transport) as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def orders(mesh: Mesh) -> ServiceIdentity:
    return mesh.identity("orders")


@pytest.fixture
def callee(mesh: Mesh) -> Callee:
    return Callee(mesh)


# -- attaching tokens ------------------------------------------------------------------


def test_attaches_a_bearer_token_for_the_audience(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    response = call(ServiceAuth(orders, audience="payments"), callee, mode)

    assert response.status_code == 200
    assert response.json() == {"caller": "orders"}
    principal = callee.verifier.verify(callee.tokens[0])
    assert (principal.caller, principal.audience, principal.subject) == ("orders", "payments", "orders")
    # Without mutual auth no nonce is sent.
    assert callee.nonces == [None]


def test_replaces_an_authorization_header_set_by_the_caller(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    call(ServiceAuth(orders, audience="payments"), callee, mode, headers={"Authorization": "Basic Zm9vOmJhcg=="})

    assert callee.requests[0].headers.get_list("Authorization") == [f"Bearer {callee.tokens[0]}"]


def test_cached_token_is_reused_across_requests(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments")
    for _ in range(3):
        call(auth, callee, mode)

    assert len(set(callee.tokens)) == 1
    assert callee.tokens[0] == orders.token_for("payments")


def test_fresh_tokens_mints_one_token_per_request(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments", fresh_tokens=True)
    for _ in range(3):
        call(auth, callee, mode)

    assert len(set(callee.tokens)) == 3
    assert len({callee.verifier.verify(token).token_id for token in callee.tokens}) == 3


def test_fresh_tokens_pass_a_replay_cache(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    callee = Callee(mesh)
    callee.verifier = mesh.verifier("payments", replay_cache=meshauth.MemoryReplayCache())
    auth = ServiceAuth(orders, audience="payments", fresh_tokens=True)

    assert [call(auth, callee, mode).status_code for _ in range(3)] == [200, 200, 200]


def test_scope_is_requested_for_the_token(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    call(ServiceAuth(orders, audience="payments", scope="charges:write  charges:read"), callee, mode)
    call(ServiceAuth(orders, audience="payments", scope="charges:read", fresh_tokens=True), callee, mode)

    scopes = [callee.verifier.verify(token).scopes for token in callee.tokens]
    assert scopes == [frozenset({"charges:write", "charges:read"}), frozenset({"charges:read"})]


# -- audiences -------------------------------------------------------------------------


def test_audience_from_a_host_mapping(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        token = bearer(request)
        audience = "billing" if "billing" in request.url.host else "payments"
        seen.append((request.url.host, mesh.verifier(audience).verify(token).audience))
        return httpx.Response(204)

    auth = ServiceAuth(
        orders,
        audience={"payments.internal": "payments", "Billing.Internal": "billing", "billing.internal:8443": "payments"},
    )
    call(auth, handler, mode, url="https://payments.internal/x")
    call(auth, handler, mode, url="http://BILLING.internal/x")
    call(auth, handler, mode, url="https://billing.internal:9000/x")

    assert seen == [("payments.internal", "payments"), ("billing.internal", "billing"), ("billing.internal", "billing")]


def test_host_and_port_entry_wins_over_the_host(orders: ServiceIdentity) -> None:
    auth = ServiceAuth(
        orders,
        audience={"svc.internal": "payments", "svc.internal:8443": "billing", "svc.internal:443": "gateway"},
    )

    assert auth.audience_for(httpx.Request("GET", "https://svc.internal:8443/")) == "billing"
    assert auth.audience_for(httpx.Request("GET", "https://svc.internal/")) == "gateway"  # default port
    assert auth.audience_for(httpx.Request("GET", "http://svc.internal/")) == "payments"


def test_ipv6_hosts_are_matched_in_brackets(orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience={"[::1]:8080": "payments", "::1": "billing"})

    assert auth.audience_for(httpx.Request("GET", "http://[::1]:8080/")) == "payments"
    assert auth.audience_for(httpx.Request("GET", "http://[::1]:9090/")) == "billing"


def test_audience_from_a_callable(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    audiences: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        audiences.append(mesh.verifier(request.url.path.strip("/")).verify(bearer(request)).audience)
        return httpx.Response(204)

    auth = ServiceAuth(orders, audience=lambda request: request.url.path.strip("/"))
    call(auth, handler, mode, url="https://mesh.internal/payments")
    call(auth, handler, mode, url="https://mesh.internal/billing")

    assert audiences == ["payments", "billing"]


class Service(enum.StrEnum):
    PAYMENTS = "payments"
    BILLING = "billing"


def test_audience_may_be_a_str_subclass(mode: str, orders: ServiceIdentity, callee: Callee) -> None:
    call(ServiceAuth(orders, audience={"payments.internal": Service.PAYMENTS}), callee, mode)
    call(ServiceAuth(orders, audience=lambda request: Service.PAYMENTS), callee, mode)

    assert [callee.verifier.verify(token).audience for token in callee.tokens] == ["payments", "payments"]


def _raises(request: httpx.Request) -> str:
    raise LookupError("no route")


@pytest.mark.parametrize(
    "audience",
    [
        {"billing.internal": "billing"},
        lambda request: None,
        lambda request: "",
        lambda request: b"payments",
        _raises,
    ],
    ids=["host-not-mapped", "callable-none", "callable-empty", "callable-bytes", "callable-raises"],
)
def test_unresolvable_audience_raises_before_anything_is_sent(
    mode: str, orders: ServiceIdentity, callee: Callee, audience: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        call(ServiceAuth(orders, audience=audience), callee, mode)

    assert caught.value.reason == "unknown_audience"
    assert callee.requests == []


def test_unknown_host_error_names_the_host(orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience={"payments.internal": "payments"})

    with pytest.raises(ConfigurationError, match="unknown_audience") as caught:
        auth.audience_for(httpx.Request("GET", "https://evil.example/"))
    assert caught.value.actual == "evil.example"
    assert caught.value.expected == ["payments.internal"]


def test_callable_failure_is_chained(orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience=_raises)

    with pytest.raises(ConfigurationError, match="LookupError") as caught:
        auth.audience_for(httpx.Request("GET", URL))
    assert isinstance(caught.value.__cause__, LookupError)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"audience": ""}, ConfigurationError),
        ({"audience": 42}, ConfigurationError),
        ({"audience": {"payments.internal": ""}}, ConfigurationError),
        ({"audience": {"": "payments"}}, ConfigurationError),
        ({"audience": "payments", "scope": "   "}, ConfigurationError),
        ({"audience": "payments", "verify_responses": object()}, TypeError),
    ],
    ids=["empty", "int", "empty-service", "empty-host", "blank-scope", "not-a-key-source"],
)
def test_invalid_configuration_is_rejected_at_construction(
    orders: ServiceIdentity, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        ServiceAuth(orders, **kwargs)


def test_identity_must_be_a_service_identity() -> None:
    with pytest.raises(TypeError, match="ServiceIdentity"):
        ServiceAuth("orders", audience="payments")  # type: ignore[arg-type]


def test_response_verifier_for_another_service_is_rejected(mesh: Mesh, orders: ServiceIdentity) -> None:
    with pytest.raises(ConfigurationError, match="another service"):
        ServiceAuth(orders, "payments", verify_responses=ResponseVerifier("billing", mesh.keys, clock=mesh.clock))


def test_repr_names_no_secret(mesh: Mesh, orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience={"a": "payments"}, verify_responses=mesh.keys)
    token = orders.token_for("payments")

    assert repr(auth) == "ServiceAuth('orders', audience=<1 hosts>, mutual=True, fresh_tokens=False)"
    assert token not in repr(auth)


# -- retry on 401 invalid_token ----------------------------------------------------------


def test_invalid_token_is_retried_once_with_a_new_token_and_nonce(
    mode: str, mesh: Mesh, orders: ServiceIdentity
) -> None:
    callee = Callee(mesh, script=("invalid",))
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    response = call(auth, callee, mode, method="POST", json={"amount": 5})

    assert response.status_code == 200
    assert len(callee.requests) == 2
    first, second = callee.tokens
    assert first != second
    assert callee.verifier.verify(second).token_id != callee.verifier.verify(first).token_id
    assert callee.nonces[0] != callee.nonces[1]
    assert None not in callee.nonces
    # The body is replayed intact, and the cache now holds the new token.
    assert [json.loads(request.content) for request in callee.requests] == [{"amount": 5}, {"amount": 5}]
    assert orders.token_for("payments") == second


def test_retry_with_fresh_tokens_mints_again(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    callee = Callee(mesh, script=("invalid",))

    response = call(ServiceAuth(orders, audience="payments", fresh_tokens=True), callee, mode)

    assert response.status_code == 200
    assert len(set(callee.tokens)) == 2


def test_retry_keeps_a_token_another_request_already_refreshed(mesh: Mesh, orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience="payments")
    stale = orders.token_for("payments")
    flow = auth.sync_auth_flow(httpx.Request("GET", URL))
    assert bearer(next(flow)) == stale
    # Meanwhile a concurrent request got its 401 first and re-minted.
    orders.invalidate("payments")
    refreshed = orders.token_for("payments")

    retry = flow.send(httpx.Response(401, headers={"WWW-Authenticate": INVALID_TOKEN}))

    assert bearer(retry) == refreshed != stale
    assert orders.token_for("payments") == refreshed  # not discarded again
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200))


@pytest.mark.parametrize(
    "challenge",
    ["Bearer error=invalid_token", 'Basic realm="x", Bearer ERROR = "invalid_token"'],
    ids=["bare-token", "second-challenge"],
)
def test_invalid_token_challenge_forms(mode: str, mesh: Mesh, orders: ServiceIdentity, challenge: str) -> None:
    callee = Callee(mesh, script=(lambda request: httpx.Response(401, headers={"WWW-Authenticate": challenge}),))

    assert call(ServiceAuth(orders, audience="payments"), callee, mode).status_code == 200
    assert len(callee.requests) == 2


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (401, {"WWW-Authenticate": 'Bearer realm="payments"'}),
        (401, {}),
        (401, {"WWW-Authenticate": 'Bearer error="insufficient_scope"'}),
        (401, {"WWW-Authenticate": 'Bearer error_description="invalid_token"'}),
        (403, {"WWW-Authenticate": INVALID_TOKEN}),
    ],
    ids=["no-error-code", "no-challenge", "other-error", "description-only", "403"],
)
def test_other_rejections_are_not_retried(
    mode: str, mesh: Mesh, orders: ServiceIdentity, status: int, headers: dict[str, str]
) -> None:
    callee = Callee(mesh, script=(lambda request: httpx.Response(status, headers=headers),))

    assert call(ServiceAuth(orders, audience="payments"), callee, mode).status_code == status
    assert len(callee.requests) == 1


def test_second_401_is_returned_without_looping(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    callee = Callee(mesh, script=("invalid", "invalid", "invalid"))

    response = call(ServiceAuth(orders, audience="payments", verify_responses=mesh.keys), callee, mode)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == INVALID_TOKEN
    assert len(callee.requests) == 2


class StreamingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Consumes request bodies chunk by chunk, as a network transport does.

    (``httpx.MockTransport`` reads the whole body into memory first, which
    makes every body replayable.)
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        self.bodies.append(b"".join(request.stream))
        return self.handler(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        self.bodies.append(b"".join([chunk async for chunk in request.stream]))
        return self.handler(request)


def test_streamed_sync_body_is_not_retried(mesh: Mesh, orders: ServiceIdentity) -> None:
    transport = StreamingTransport(Callee(mesh, script=("invalid",)))

    def body() -> Iterator[bytes]:
        yield b"chunk-1;"
        yield b"chunk-2"

    with httpx.Client(auth=ServiceAuth(orders, "payments"), transport=transport) as client:
        response = client.post(URL, content=body())

    assert response.status_code == 401
    assert transport.bodies == [b"chunk-1;chunk-2"]


def test_streamed_async_body_is_not_retried(mesh: Mesh, orders: ServiceIdentity) -> None:
    transport = StreamingTransport(Callee(mesh, script=("invalid",)))

    async def body() -> AsyncIterator[bytes]:
        yield b"chunk-1;"
        yield b"chunk-2"

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(auth=ServiceAuth(orders, "payments"), transport=transport) as client:
            return await client.post(URL, content=body())

    assert asyncio.run(run()).status_code == 401
    assert transport.bodies == [b"chunk-1;chunk-2"]


def test_multipart_file_upload_is_not_retried(mesh: Mesh, orders: ServiceIdentity) -> None:
    transport = StreamingTransport(Callee(mesh, script=("invalid",)))

    with httpx.Client(auth=ServiceAuth(orders, "payments"), transport=transport) as client:
        response = client.post(URL, files={"receipt": ("r.txt", io.BytesIO(b"paid"))})

    assert response.status_code == 401
    assert len(transport.bodies) == 1


def test_in_memory_body_is_replayed_through_a_streaming_transport(
    mode: str, mesh: Mesh, orders: ServiceIdentity
) -> None:
    transport = StreamingTransport(Callee(mesh, script=("invalid",)))
    auth = ServiceAuth(orders, "payments")
    if mode == "sync":
        with httpx.Client(auth=auth, transport=transport) as client:
            response = client.put(URL, content=b"full body")
    else:

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(auth=auth, transport=transport) as client:
                return await client.put(URL, content=b"full body")

        response = asyncio.run(run())

    assert response.status_code == 200
    assert transport.bodies == [b"full body", b"full body"]
    assert [r.status_code for r in response.history] == [401]


# -- mutual authentication ---------------------------------------------------------------


def test_signed_response_is_accepted(mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    responses = [call(auth, callee, mode) for _ in range(2)]

    assert [response.json() for response in responses] == [{"caller": "orders"}] * 2
    nonces = callee.nonces
    assert None not in nonces
    assert len(set(nonces)) == 2  # a fresh nonce per request


def test_response_verifier_can_be_passed_ready_made(
    mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee
) -> None:
    verifier = ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    auth = ServiceAuth(orders, audience="payments", verify_responses=verifier)

    assert auth.response_verifier is verifier
    assert call(auth, callee, mode).status_code == 200


def _expect_response_error(mode: str, mesh: Mesh, orders: ServiceIdentity, handler: Handler) -> ResponseAuthError:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    with pytest.raises(ResponseAuthError) as caught:
        call(auth, handler, mode)
    return caught.value


def test_missing_response_token_is_rejected(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    error = _expect_response_error(mode, mesh, orders, lambda request: httpx.Response(200, json={}))

    assert error.reason == "missing_response"
    assert isinstance(error, meshauth.MeshAuthError)


def test_response_from_another_registered_service_is_rejected(
    mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee
) -> None:
    # A man in the middle holding a valid mesh key (billing) answers in place of payments.
    def billing_answers(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=callee.sign(request, signer="billing"))

    error = _expect_response_error(mode, mesh, orders, billing_answers)

    assert error.reason == "wrong_responder"
    assert (error.expected, error.actual) == ("payments", "billing")


def test_replayed_response_token_is_rejected(mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    earlier = call(auth, callee, mode).headers[RESPONSE_HEADER]

    error = _expect_response_error(
        mode, mesh, orders, lambda request: httpx.Response(200, headers={RESPONSE_HEADER: earlier})
    )

    assert error.reason == "nonce_mismatch"
    assert earlier not in str(error)


def test_expired_response_token_is_rejected(
    mode: str, mesh: Mesh, clock: FakeClock, orders: ServiceIdentity, callee: Callee
) -> None:
    def slow_network(request: httpx.Request) -> httpx.Response:
        headers = callee.sign(request)
        clock.advance(120)  # the answer arrives long after it was signed
        return httpx.Response(200, headers=headers)

    error = _expect_response_error(mode, mesh, orders, slow_network)

    assert error.reason == "expired"


def test_forged_response_tokens_are_rejected(mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    impostor = ServiceIdentity("payments", SigningKey.generate(), clock=mesh.clock)  # not in the registry

    def unregistered_key(request: httpx.Request) -> httpx.Response:
        answer = impostor.mint_response("orders", request.headers[NONCE_HEADER])
        return httpx.Response(200, headers={RESPONSE_HEADER: answer})

    def tampered(request: httpx.Request) -> httpx.Response:
        header, payload, signature = callee.sign(request)[RESPONSE_HEADER].split(".")
        flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
        return httpx.Response(200, headers={RESPONSE_HEADER: f"{header}.{payload}.{flipped}"})

    def service_token(request: httpx.Request) -> httpx.Response:
        # A service token of payments is not a response token.
        return httpx.Response(200, headers={RESPONSE_HEADER: mesh.identity("payments").token_for("orders")})

    reasons = [
        _expect_response_error(mode, mesh, orders, h).reason for h in (unregistered_key, tampered, service_token)
    ]

    assert reasons == ["unknown_kid", "bad_signature", "wrong_type"]


@pytest.mark.parametrize("script", [("missing",), ("unavailable",), ("invalid", "invalid")], ids=str)
def test_signed_401_and_503_are_proven_like_any_answer(
    mode: str, mesh: Mesh, orders: ServiceIdentity, script: tuple[str, ...]
) -> None:
    callee = Callee(mesh, script=script)
    response = call(ServiceAuth(orders, audience="payments", verify_responses=mesh.keys), callee, mode)

    assert response.status_code in (401, 503)
    assert RESPONSE_HEADER in response.headers


@pytest.mark.parametrize("status", [401, 503])
def test_a_forged_unsigned_401_or_503_is_refused(mode: str, mesh: Mesh, orders: ServiceIdentity, status: int) -> None:
    forged = lambda request: httpx.Response(status, json={"error": "forged"})  # noqa: E731
    assert _expect_response_error(mode, mesh, orders, forged).reason == "missing_response"


def test_status_and_body_are_bound(mode: str, mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    def swapped_status(request: httpx.Request) -> httpx.Response:
        body = b'{"charge":"declined"}'
        return httpx.Response(201, content=body, headers=callee.sign(request, status=200, body=body))

    def swapped_body(request: httpx.Request) -> httpx.Response:
        proof = callee.sign(request, status=200, body=b'{"charge":"declined"}')
        return httpx.Response(200, content=b'{"charge":"approved"}', headers=proof)

    def unbound(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"big", headers=callee.sign(request, status=200, body=None))

    assert _expect_response_error(mode, mesh, orders, swapped_status).reason == "status_mismatch"
    assert _expect_response_error(mode, mesh, orders, swapped_body).reason == "body_mismatch"
    assert _expect_response_error(mode, mesh, orders, unbound).reason == "unbound_body"
    allowed = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys, allow_unbound_body=True)
    assert call(allowed, unbound, mode).content == b"big"


def test_aud_dash_is_accepted_only_on_a_401(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    payments = mesh.identity("payments")

    def answer(status: int) -> Callable[[httpx.Request], httpx.Response]:
        def handler(request: httpx.Request) -> httpx.Response:
            token = payments.mint_response("-", request.headers[NONCE_HEADER], status=status, body=b"{}")
            return httpx.Response(status, content=b"{}", headers={RESPONSE_HEADER: token})

        return handler

    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    assert call(auth, answer(401), mode).status_code == 401
    assert _expect_response_error(mode, mesh, orders, answer(200)).reason == "wrong_audience"


def test_other_errors_still_need_a_response_token(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    error = _expect_response_error(mode, mesh, orders, lambda request: httpx.Response(403, json={"error": "denied"}))

    assert error.reason == "missing_response"


class TrackedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that records whether it was read and closed."""

    def __init__(self) -> None:
        self.read = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield b"secret ledger"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        yield b"secret ledger"

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_streaming_response_is_rejected_before_its_body_is_read(mesh: Mesh, orders: ServiceIdentity) -> None:
    stream = TrackedStream()
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=stream))

    with (
        httpx.Client(auth=auth, transport=transport) as client,
        pytest.raises(ResponseAuthError) as caught,
        client.stream("GET", URL),
    ):
        pytest.fail("an unauthenticated response must not be handed out")

    assert caught.value.reason == "missing_response"
    assert (stream.read, stream.closed) == (False, True)


def test_async_streaming_response_is_rejected_before_its_body_is_read(mesh: Mesh, orders: ServiceIdentity) -> None:
    stream = TrackedStream()
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=stream))

    async def run() -> None:
        async with httpx.AsyncClient(auth=auth, transport=transport) as client, client.stream("GET", URL):
            pytest.fail("an unauthenticated response must not be handed out")

    with pytest.raises(ResponseAuthError, match="missing_response"):
        asyncio.run(run())
    assert (stream.read, stream.closed) == (False, True)


def test_streaming_response_with_valid_token_is_readable(mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=TrackedStream(), headers=callee.sign(request, body=b"secret ledger"))

    with (
        httpx.Client(auth=auth, transport=httpx.MockTransport(handler)) as client,
        client.stream("GET", URL) as response,
    ):
        assert b"".join(response.iter_bytes()) == b"secret ledger"


def test_a_streamed_body_that_differs_fails_at_its_end(mesh: Mesh, orders: ServiceIdentity, callee: Callee) -> None:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=TrackedStream(), headers=callee.sign(request, body=b"another ledger"))

    with httpx.Client(auth=auth, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(meshauth.BodyMismatch), client.stream("GET", URL) as response:
            response.read()
        with pytest.raises(meshauth.BodyMismatch):
            client.get(URL)


def test_response_verification_is_traced_but_outbound_auth_adds_no_span(
    mode: str, mesh: Mesh, callee: Callee, telemetry: Any
) -> None:
    orders = mesh.identity("orders", tracer_provider=telemetry.tracer_provider)
    auth = ServiceAuth(
        orders,
        audience="payments",
        verify_responses=mesh.keys,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    call(auth, callee, mode)

    names = sorted(span.name for span in telemetry.spans())
    assert names == ["meshauth.mint", "meshauth.response.verify"]
    (verify_span,) = telemetry.spans("meshauth.response.verify")
    assert verify_span.attributes["meshauth.outcome"] == "accepted"
    assert verify_span.attributes["meshauth.caller"] == "payments"
    token = callee.tokens[0]
    for span in telemetry.spans():
        assert all(token not in str(value) for value in span.attributes.values())


# -- concurrency -------------------------------------------------------------------------


class CountingKey(SigningKey):
    """A signing key that counts its signatures."""

    def __init__(self) -> None:
        super().__init__(ec.generate_private_key(ec.SECP256R1()))
        self.signatures = 0
        self._count_lock = threading.Lock()

    def sign(self, data: bytes) -> bytes:
        with self._count_lock:
            self.signatures += 1
        return super().sign(data)


def test_threads_and_tasks_on_a_cold_cache_share_one_signature(mesh: Mesh) -> None:
    key = CountingKey()
    mesh.keys.add_key(key, "orders-2")
    auth = ServiceAuth(ServiceIdentity("orders-2", key, clock=mesh.clock), audience="payments")
    tokens: list[str] = []
    tokens_lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with tokens_lock:
            tokens.append(bearer(request))
        return httpx.Response(204)

    transport = httpx.MockTransport(handler)
    start = threading.Barrier(51, timeout=10)
    failures: list[BaseException] = []

    def thread_caller() -> None:
        try:
            with httpx.Client(auth=auth, transport=transport) as client:
                start.wait()
                client.get(URL).raise_for_status()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    async def task_callers() -> None:
        async with httpx.AsyncClient(auth=auth, transport=transport) as client:
            responses = await asyncio.gather(*(client.get(URL) for _ in range(50)))
        assert all(response.status_code == 204 for response in responses)

    threads = [threading.Thread(target=thread_caller) for _ in range(50)]
    for thread in threads:
        thread.start()
    start.wait()
    asyncio.run(task_callers())
    for thread in threads:
        thread.join(timeout=10)

    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert len(tokens) == 100
    assert len(set(tokens)) == 1
    assert key.signatures == 1


def test_tasks_on_a_cold_cache_share_one_mint_span(mesh: Mesh, telemetry: Any) -> None:
    orders = mesh.identity("orders", tracer_provider=telemetry.tracer_provider)
    auth = ServiceAuth(orders, audience="payments")
    transport = httpx.MockTransport(lambda request: httpx.Response(204))

    async def run() -> None:
        async with httpx.AsyncClient(auth=auth, transport=transport) as client:
            await asyncio.gather(*(client.get(URL) for _ in range(50)))

    asyncio.run(run())

    assert len(telemetry.spans("meshauth.mint")) == 1


# -- respx ---------------------------------------------------------------------------------


def test_respx_routes_get_tokens_for_their_hosts(mode: str, mesh: Mesh, orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience={"payments.internal": "payments", "billing.internal:8443": "billing"})

    def verified_by(name: str) -> Handler:
        return lambda request: httpx.Response(200, json={"caller": mesh.verifier(name).verify(bearer(request)).caller})

    # Every route must be called, and respx fails any request that matches no route.
    with respx.mock(assert_all_called=True) as router:
        payments = router.post("https://payments.internal/charges").mock(side_effect=verified_by("payments"))
        billing = router.get("https://billing.internal:8443/invoices").mock(side_effect=verified_by("billing"))
        if mode == "sync":
            with httpx.Client(auth=auth) as client:
                client.post("https://payments.internal/charges", json={}).raise_for_status()
                client.get("https://billing.internal:8443/invoices").raise_for_status()
                with pytest.raises(ConfigurationError, match="unknown_audience"):
                    client.get("https://unknown.internal/")
        else:

            async def run() -> None:
                async with httpx.AsyncClient(auth=auth) as client:
                    (await client.post("https://payments.internal/charges", json={})).raise_for_status()
                    (await client.get("https://billing.internal:8443/invoices")).raise_for_status()
                    with pytest.raises(ConfigurationError, match="unknown_audience"):
                        await client.get("https://unknown.internal/")

            asyncio.run(run())

        assert (payments.call_count, billing.call_count, len(router.calls)) == (1, 1, 2)


def test_respx_retry_after_invalid_token(mesh: Mesh, orders: ServiceIdentity) -> None:
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)
    callee = Callee(mesh, script=("invalid",))

    with respx.mock() as router:
        route = router.get(URL).mock(side_effect=callee)
        with httpx.Client(auth=auth) as client:
            response = client.get(URL)

    assert response.status_code == 200
    assert route.call_count == 2
    sent = [c.request for c in route.calls]
    assert bearer(sent[0]) != bearer(sent[1])
    assert sent[0].headers[NONCE_HEADER] != sent[1].headers[NONCE_HEADER]


# -- a real server on the loopback interface --------------------------------------------


def payments_app(mesh: Mesh, verifier: meshauth.Verifier, signer: str = "payments") -> Any:
    """The payments service as a bare ASGI app, HTTP only (the meshauth middleware is tested elsewhere)."""
    identity = mesh.identity(signer)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = dict(scope["headers"])
        credentials = headers.get(b"authorization", b"").decode("latin-1")
        status, body = 200, b""
        extra: list[tuple[bytes, bytes]] = []
        caller = "-"
        try:
            principal = verifier.verify(credentials.removeprefix("Bearer "))
        except meshauth.TokenError as exc:
            challenge = f'Bearer realm="payments", error="invalid_token", error_description="{exc.reason}"'
            status, body = 401, json.dumps({"error": "invalid_token", "reason": exc.reason}).encode()
            extra.append((b"www-authenticate", challenge.encode()))
            caller = unverified_caller(credentials.removeprefix("Bearer "))
        else:
            body = json.dumps({"caller": principal.caller, "path": scope["path"]}).encode()
            caller = principal.caller
        nonce = headers.get(b"meshauth-nonce")
        if nonce is not None:
            answer = identity.mint_response(caller, nonce.decode("ascii"), status=status, body=body)
            extra.append((b"meshauth-response", answer.encode()))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_loopback_sync_and_async_with_mutual_auth(
    mesh: Mesh, orders: ServiceIdentity, serve_asgi: Callable[..., str]
) -> None:
    base = serve_asgi(payments_app(mesh, mesh.verifier("payments")), lifespan="off")
    auth = ServiceAuth(orders, audience={"127.0.0.1": "payments"}, verify_responses=mesh.keys)

    with httpx.Client(auth=auth, base_url=base, timeout=10) as client:
        assert client.get("/charges").json() == {"caller": "orders", "path": "/charges"}
        with client.stream("GET", "/stream") as response:
            assert json.loads(response.read()) == {"caller": "orders", "path": "/stream"}

    async def run() -> list[Any]:
        async with httpx.AsyncClient(auth=auth, base_url=base, timeout=10) as client:
            responses = await asyncio.gather(*(client.get(f"/charges/{n}") for n in range(5)))
        return [response.json()["path"] for response in responses]

    assert asyncio.run(run()) == [f"/charges/{n}" for n in range(5)]


def test_loopback_replay_cache_rejection_is_retried_with_a_new_token(
    mesh: Mesh, orders: ServiceIdentity, serve_asgi: Callable[..., str]
) -> None:
    # A callee with a replay cache rejects the cached token the second time it sees it;
    # ServiceAuth re-mints once and the retry goes through.
    verifier = mesh.verifier("payments", replay_cache=meshauth.MemoryReplayCache())
    base = serve_asgi(payments_app(mesh, verifier), lifespan="off")
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    with httpx.Client(auth=auth, base_url=base, timeout=10) as client:
        first = client.get("/charges")
        second = client.get("/charges")

    assert (first.status_code, second.status_code) == (200, 200)
    assert [r.status_code for r in second.history] == [401]
    assert second.history[0].json() == {"error": "invalid_token", "reason": "replayed"}


def test_loopback_man_in_the_middle_is_detected(
    mesh: Mesh, orders: ServiceIdentity, serve_asgi: Callable[..., str]
) -> None:
    # Whoever answers at this address relays the request to a real payments verifier,
    # but can only sign the answer with its own (registered) billing key.
    base = serve_asgi(payments_app(mesh, mesh.verifier("payments"), signer="billing"), lifespan="off")
    auth = ServiceAuth(orders, audience="payments", verify_responses=mesh.keys)

    with httpx.Client(auth=auth, base_url=base, timeout=10) as client, pytest.raises(ResponseAuthError) as caught:
        client.get("/charges")

    assert caught.value.reason == "wrong_responder"

    async def run() -> None:
        async with (
            httpx.AsyncClient(auth=auth, base_url=base, timeout=10) as client,
            client.stream("GET", "/charges"),
        ):
            pytest.fail("an answer from the wrong service must not be handed out")

    with pytest.raises(ResponseAuthError, match="wrong_responder"):
        asyncio.run(run())


def test_on_behalf_of_forwards_and_binds_the_txn_token() -> None:
    mesh = Mesh(["gateway", "orders", "payments"])
    txn = mesh.identity("gateway").issue_txn_token("alice", scope="charges:write")
    inbound = mesh.verifier("orders").verify(mesh.identity("gateway").token_for("orders", txn_token=txn), txn)
    seen: list[meshauth.Principal] = []

    def payments(request: httpx.Request) -> httpx.Response:
        seen.append(mesh.verifier("payments").verify(bearer(request), request.headers.get("txn-token")))
        return httpx.Response(200)

    auth = meshauth.ServiceAuth(mesh.identity("orders"), audience="payments", on_behalf_of=inbound)
    with httpx.Client(auth=auth, transport=httpx.MockTransport(payments)) as client:
        client.get("https://payments.internal/a")
        client.get("https://payments.internal/b")

    async def run() -> None:
        async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(payments)) as client:
            await client.get("https://payments.internal/c")

    asyncio.run(run())
    assert [(p.caller, p.subject, p.txn_issuer) for p in seen] == [("orders", "alice", "gateway")] * 3
    assert {p.transaction for p in seen} == {inbound.transaction} and seen[0].scopes == {"charges:write"}
    assert seen[0].token_id == seen[1].token_id == seen[2].token_id  # cached per (audience, Txn-Token)
    assert not auth.fresh_tokens
