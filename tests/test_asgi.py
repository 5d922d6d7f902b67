"""meshauth.asgi.MeshAuthMiddleware: statuses, headers, bodies, audit, telemetry, mutual auth."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.trace import StatusCode
from txn_support import in_transaction

import meshauth
from meshauth._jws import body_digest
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import FakeClock, Mesh

REALM = 'Bearer realm="payments"'
NONCE = "n0nce-abcdefghijklmnop"

Headers = Sequence[tuple[str | bytes, str | bytes]]


class App:
    """A recording ASGI app: answers 200 (or ``status``) with the principal it saw."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            return
        principal = scope.get("meshauth.principal")
        caller = principal.caller if principal is not None else None
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept", "headers": []})
            await send({"type": "websocket.close", "code": 1000})
            return
        body = json.dumps({"caller": caller}).encode()
        await send(
            {"type": "http.response.start", "status": self.status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})

    @property
    def called(self) -> bool:
        return bool(self.scopes)


def call(
    app: Any, method: str = "POST", path: str = "/charges", headers: Headers = (), *, client: Any = None
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client or ("10.0.0.7", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://payments.internal") as http:
            return await http.request(method, path, headers=list(headers))

    return asyncio.run(go())


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


@pytest.fixture
def app() -> App:
    return App()


# -- accepted -------------------------------------------------------------------


def test_valid_token_reaches_app_with_principal(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {"caller": "orders"}
    principal = app.scopes[0]["meshauth.principal"]
    assert isinstance(principal, meshauth.Principal)
    assert (principal.caller, principal.subject, principal.audience) == ("orders", "orders", "payments")
    [record] = audit_log.records()
    fields = record.meshauth
    assert fields["event"] == "request"
    assert (fields["outcome"], fields["reason"]) == ("accepted", "ok")
    assert (fields["method"], fields["path"], fields["client"]) == ("POST", "/charges", "10.0.0.7")
    assert (fields["caller"], fields["audience"], fields["jti"]) == ("orders", "payments", principal.token_id)
    audit_log.assert_no_secret(token)


def test_bearer_scheme_is_case_insensitive(mesh: Mesh, app: App, token: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    response = call(wrapped, headers=[("Authorization", f"bEaReR {token}")])
    assert response.status_code == 200


def test_delegated_principal_is_exposed(mesh: Mesh, app: App) -> None:
    headers = in_transaction(mesh, "orders", "payments")
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    assert call(wrapped, headers=list(headers.items())).status_code == 200
    principal = app.scopes[0]["meshauth.principal"]
    assert (principal.caller, principal.subject, principal.txn_issuer) == ("orders", "alice", "gateway")
    assert principal.txn_token == headers["Txn-Token"] and principal.transaction


# -- rejected (401) ---------------------------------------------------------------


def test_missing_credentials(mesh: Mesh, app: App, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    response = call(wrapped, method="GET", path="/charges/c_1?secret=1")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert not app.called
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", "missing_credentials")
    # the query is never logged
    assert (record.meshauth["method"], record.meshauth["path"]) == ("GET", "/charges/c_1")
    assert record.meshauth["status"] == 401


def _bad_credentials(mesh: Mesh, clock: FakeClock) -> dict[str, tuple[Headers, str, str | None]]:
    """name -> (headers, expected reason, token that must never be logged)."""
    orders = mesh.identity("orders")
    good = orders.mint("payments")
    other_audience = orders.mint("billing")
    return {
        "wrong_scheme": ([("Authorization", "Basic dXNlcjpwYXNz")], "wrong_scheme", None),
        "bare_token": ([("Authorization", good)], "wrong_scheme", good),
        "two_headers": (
            [("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}")],
            "duplicate_authorization",
            good,
        ),
        "empty_bearer": ([("Authorization", "Bearer ")], "malformed", None),
        "scheme_only": ([("Authorization", "Bearer")], "malformed", None),
        "two_spaces": ([("Authorization", f"Bearer  {good}")], "malformed", good),
        "over_size": ([("Authorization", "Bearer " + "a" * 9000)], "too_large", None),
        "non_ascii": ([(b"authorization", b"Bearer \xff\xfe" + good.encode())], "malformed", good),
        "malformed": ([("Authorization", "Bearer not.a-jwt")], "malformed", None),
        "token68_padding": ([("Authorization", "Bearer abc==")], "malformed", None),
        "wrong_audience": (bearer(other_audience), "wrong_audience", other_audience),
        "bad_signature": (bearer(good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")), "bad_signature", good),
    }


@pytest.mark.parametrize(
    "case",
    [
        "wrong_scheme",
        "bare_token",
        "two_headers",
        "empty_bearer",
        "scheme_only",
        "two_spaces",
        "over_size",
        "non_ascii",
        "malformed",
        "token68_padding",
        "wrong_audience",
        "bad_signature",
    ],
)
def test_invalid_credentials_get_401_invalid_token(
    mesh: Mesh, clock: FakeClock, app: App, audit_log: Any, case: str
) -> None:
    headers, reason, secret = _bad_credentials(mesh, clock)[case]
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    response = call(wrapped, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="payments", error="invalid_token", error_description="{reason}"'
    )
    assert response.json() == {"error": "invalid_token", "reason": reason}
    assert not app.called
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", reason)
    assert (record.meshauth["method"], record.meshauth["path"]) == ("POST", "/charges")
    if secret is not None:
        assert secret not in response.text
        audit_log.assert_no_secret(secret)


def test_expired_token(mesh: Mesh, clock: FakeClock, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    assert call(wrapped, headers=bearer(token)).status_code == 200
    clock.advance(3600)
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].endswith('error_description="expired"')
    assert response.json() == {"error": "invalid_token", "reason": "expired"}
    assert len(app.scopes) == 1
    records = audit_log.records()
    assert [r.meshauth["outcome"] for r in records] == ["accepted", "rejected"]
    assert records[1].meshauth["caller"] == "orders"
    audit_log.assert_no_secret(token)


def test_revoked_key(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    assert call(wrapped, headers=bearer(token)).status_code == 200
    mesh.keys.revoke(mesh.signing_keys["orders"].kid)
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "reason": "unknown_kid"}
    assert len(app.scopes) == 1
    assert [r.meshauth["reason"] for r in audit_log.records()] == ["ok", "unknown_kid"]


def test_keys_unavailable_is_503(mesh: Mesh, app: App, token: str, audit_log: Any, down_keys: Any) -> None:
    verifier = meshauth.Verifier("payments", down_keys, clock=mesh.clock)
    wrapped = MeshAuthMiddleware(app, verifier, retry_after=7)
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "www-authenticate" not in response.headers
    assert response.json() == {"error": "temporarily_unavailable", "reason": "keys_unavailable"}
    assert not app.called
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", "keys_unavailable")


def test_realm_is_quote_escaped(mesh: Mesh, app: App) -> None:
    verifier = meshauth.Verifier('pay"ments\\x', mesh.keys, clock=mesh.clock)
    response = call(MeshAuthMiddleware(app, verifier))
    assert response.headers["www-authenticate"] == 'Bearer realm="pay\\"ments\\\\x"'


# -- policy (403) ------------------------------------------------------------------

POLICY = {
    "delegators": ["gateway"],
    "rules": [
        {"callers": ["orders"], "methods": ["POST"], "paths": ["/charges", "/charges/*"]},
        {"callers": ["billing"], "methods": ["GET"], "paths": ["/reports/**"], "scopes": ["reports:read"]},
    ],
}


def test_policy_allows(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    assert call(wrapped, path="/charges/c_9", headers=bearer(token)).status_code == 200
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"], record.meshauth["rule"]) == (
        "accepted",
        "allowed",
        0,
    )


def test_audit_records_name_the_rule_and_the_policy_digest(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    named = {**POLICY, "rules": [{**POLICY["rules"][0], "name": "orders may charge"}, *POLICY["rules"][1:]]}
    policy = meshauth.Policy.from_dict(named)
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=policy)
    assert call(wrapped, path="/charges/c_9", headers=bearer(token)).status_code == 200
    assert call(wrapped, method="DELETE", path="/charges/c_9", headers=bearer(token)).status_code == 403
    allowed, denied = (record.meshauth for record in audit_log.records())
    assert (allowed["outcome"], allowed["rule"], allowed["policy_sha256"]) == (
        "accepted",
        "orders may charge",
        policy.sha256,
    )
    assert (denied["outcome"], denied["policy_sha256"]) == ("denied", policy.sha256)
    assert "rule" not in denied  # no rule allowed it
    assert len(policy.sha256) == 64 and policy.sha256 != meshauth.Policy.from_dict(POLICY).sha256


def test_policy_denial_is_403(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    response = call(wrapped, method="DELETE", path="/charges/c_9", headers=bearer(token))
    assert response.status_code == 403
    assert "www-authenticate" not in response.headers
    assert response.json() == {"error": "forbidden", "reason": "no_matching_rule"}
    assert not app.called
    [record] = audit_log.records()
    fields = record.meshauth
    assert (fields["outcome"], fields["reason"], fields["caller"]) == ("denied", "no_matching_rule", "orders")
    assert (fields["method"], fields["path"], fields["status"]) == ("DELETE", "/charges/c_9", 403)


def test_policy_denial_for_missing_scope_says_insufficient_scope(mesh: Mesh, app: App) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    billing = mesh.identity("billing")
    response = call(wrapped, method="GET", path="/reports/2024/q1", headers=bearer(billing.token_for("payments")))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == 'Bearer realm="payments", error="insufficient_scope"'
    assert response.json() == {"error": "insufficient_scope", "reason": "insufficient_scope"}
    assert not app.called
    scoped = billing.mint("payments", scope="reports:read")
    assert call(wrapped, method="GET", path="/reports/2024/q1", headers=bearer(scoped)).status_code == 200


@pytest.mark.parametrize(
    "path", ["/charges/%2e%2e/admin", "/charges/a%2Fb", "/charges//x", "/charges./x", "/%63harges"]
)
def test_a_path_the_app_would_route_differently_is_refused(mesh: Mesh, app: App, token: str, path: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    response = call(wrapped, path=path, headers=bearer(token))
    assert (response.status_code, response.json()) == (400, {"error": "bad_request", "reason": "bad_path"})
    assert not app.called


def test_policy_without_raw_path_uses_encoded_path(mesh: Mesh, app: App, token: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    sent: list[dict[str, Any]] = []

    async def go(path: str) -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(b"authorization", f"Bearer {token}".encode())],
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await wrapped(scope, receive, send)

    asyncio.run(go("/charges/a b?"))  # a decoded '?' is part of the path, not a query
    assert sent[0]["status"] == 200
    sent.clear()
    asyncio.run(go("/charges/a/b"))  # '*' does not cross '/'
    assert sent[0]["status"] == 403


def test_delegation_refused_by_policy(mesh: Mesh, app: App) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    response = call(wrapped, headers=list(in_transaction(mesh, "orders", "payments").items()))
    assert (response.status_code, response.json()["reason"]) == (403, "delegation_not_allowed")


def test_policy_audit_mode_lets_through_and_records_would_deny(
    mesh: Mesh, app: App, token: str, audit_log: Any, telemetry: Any
) -> None:
    policy = meshauth.Policy.from_dict({**POLICY, "mode": "audit"})
    wrapped = MeshAuthMiddleware(
        app, mesh.verifier("payments"), policy=policy, tracer_provider=telemetry.tracer_provider
    )
    response = call(wrapped, method="DELETE", path="/charges/c_9", headers=bearer(token))
    assert response.status_code == 200
    assert app.called
    [record] = audit_log.records()
    fields = record.meshauth
    assert (fields["outcome"], fields["reason"]) == ("accepted", "audit_would_deny:no_matching_rule")
    assert fields["would_deny"] is True
    [span] = telemetry.spans("meshauth.authorize")
    assert span.attributes["meshauth.outcome"] == "accepted"
    assert span.status.status_code != StatusCode.ERROR


# -- exclusions and other scopes ------------------------------------------------------


def test_excluded_paths_skip_auth(mesh: Mesh, app: App, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), exclude=["/healthz", "/static/*"])
    assert call(wrapped, method="GET", path="/healthz").json() == {"caller": None}
    assert call(wrapped, method="GET", path="/static/css/site.css").status_code == 200
    assert len(app.scopes) == 2
    assert "meshauth.principal" not in app.scopes[0]
    assert audit_log.records() == []
    # not excluded: another path or the bare prefix; a climb out of the prefix is not even judged
    for path in ("/healthz/x", "/healthzz", "/static"):
        assert call(wrapped, method="GET", path=path).status_code == 401, path
    # (httpx removes a literal "/../" before sending; its encoded form arrives)
    assert call(wrapped, method="GET", path="/static/a/%2e%2e/%2e%2e/charges").status_code == 400
    assert len(app.scopes) == 2


def test_exclude_validation(mesh: Mesh, app: App) -> None:
    verifier = mesh.verifier("payments")
    for bad in (["healthz"], ["/a/*/b"], ["/a*"]):
        with pytest.raises(ValueError, match="exclude"):
            MeshAuthMiddleware(app, verifier, exclude=bad)
    with pytest.raises(TypeError, match="exclude"):
        MeshAuthMiddleware(app, verifier, exclude="/healthz")
    with pytest.raises(TypeError, match="Verifier"):
        MeshAuthMiddleware(app, object())  # type: ignore[arg-type]


def test_lifespan_passes_through_untouched(mesh: Mesh, app: App) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("the test app sends nothing")

    asyncio.run(wrapped(scope, receive, send))
    assert app.scopes == [{"type": "lifespan", "asgi": {"version": "3.0"}}]


def _websocket(
    wrapped: Any, headers: list[tuple[bytes, bytes]], extensions: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/stream",
        "raw_path": b"/stream",
        "headers": headers,
        "client": ("10.0.0.7", 1),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    asyncio.run(wrapped(scope, receive, send))
    return sent


def test_websocket_accepted(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    sent = _websocket(wrapped, [(b"authorization", f"Bearer {token}".encode())])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert app.scopes[0]["meshauth.principal"].caller == "orders"
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["method"]) == ("accepted", "WEBSOCKET")


def test_websocket_rejected_is_closed_before_accept(mesh: Mesh, app: App, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    sent = _websocket(wrapped, [])
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "missing_credentials"}]
    assert not app.called
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", "missing_credentials")


def test_websocket_rejected_with_http_response_extension(mesh: Mesh, app: App) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    sent = _websocket(wrapped, [(b"authorization", b"Bearer x.y.z")], extensions={"websocket.http.response": {}})
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 401
    assert (b"www-authenticate", b'Bearer realm="payments", error="invalid_token", error_description="malformed"') in (
        sent[0]["headers"]
    )
    assert json.loads(sent[1]["body"]) == {"error": "invalid_token", "reason": "malformed"}
    assert not app.called


# -- mutual authentication ---------------------------------------------------------------


@pytest.fixture
def response_checker(mesh: Mesh) -> meshauth.ResponseVerifier:
    return meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)


def test_response_token_on_success_and_app_error(
    mesh: Mesh, token: str, response_checker: meshauth.ResponseVerifier
) -> None:
    for status in (200, 500):
        app = App(status)
        wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
        response = call(wrapped, headers=[*bearer(token), ("Meshauth-Nonce", NONCE)])
        assert response.status_code == status
        proof = response_checker.verify_response(response.headers["meshauth-response"], service="payments", nonce=NONCE)
        assert proof.caller == "payments"
        with pytest.raises(meshauth.ResponseAuthError):
            response_checker.verify_response(response.headers["meshauth-response"], service="payments", nonce="other")


def test_response_token_on_websocket_accept(mesh: Mesh, app: App, token: str, response_checker: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    sent = _websocket(wrapped, [(b"authorization", f"Bearer {token}".encode()), (b"meshauth-nonce", NONCE.encode())])
    headers = dict(sent[0]["headers"])
    response_checker.verify_response(headers[b"meshauth-response"].decode(), service="payments", nonce=NONCE)


def test_every_status_is_signed_and_bound_but_only_with_a_nonce(
    mesh: Mesh, app: App, token: str, down_keys: Any, response_checker: meshauth.ResponseVerifier
) -> None:
    identity = mesh.identity("payments")
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=identity)
    response = call(wrapped, headers=[("Meshauth-Nonce", NONCE)])
    assert response.status_code == 401
    proof = response_checker.verify_response(
        response.headers["meshauth-response"], service="payments", nonce=NONCE, status=401
    )
    assert (proof.claims["aud"], proof.claims["body_sha256"]) == ("-", body_digest(response.content))
    # a refused token still names its (claimed) caller as the addressee
    refused = call(wrapped, headers=[*bearer(token[:-4] + "AAAA"), ("Meshauth-Nonce", NONCE)])
    proof = response_checker.verify_response(
        refused.headers["meshauth-response"], service="payments", nonce=NONCE, status=401
    )
    assert proof.claims["aud"] == "orders"
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 200
    assert "meshauth-response" not in response.headers
    down = MeshAuthMiddleware(app, meshauth.Verifier("payments", down_keys), identity=identity)
    response = call(down, headers=[*bearer(token), ("Meshauth-Nonce", NONCE)])
    assert response.status_code == 503
    proof = response_checker.verify_response(
        response.headers["meshauth-response"], service="payments", nonce=NONCE, status=503
    )
    assert proof.claims["body_sha256"] == body_digest(response.content)


def test_a_body_over_the_limit_is_streamed_unbound(mesh: Mesh, token: str) -> None:
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)

    async def chunked(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(4):
            await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    for limit, bound in ((1000, True), (250, False)):
        wrapped = MeshAuthMiddleware(
            chunked, mesh.verifier("payments"), identity=mesh.identity("payments"), sign_body_limit=limit
        )
        response = call(wrapped, headers=[*bearer(token), ("Meshauth-Nonce", NONCE)])
        assert response.content == b"x" * 400
        nonce_proof = checker.verify_response(
            response.headers["meshauth-response"], service="payments", nonce=NONCE, status=200
        )
        assert ("body_sha256" in nonce_proof.claims) is bound


def test_response_token_on_policy_denial(mesh: Mesh, app: App, token: str, response_checker: Any) -> None:
    wrapped = MeshAuthMiddleware(
        app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY), identity=mesh.identity("payments")
    )
    response = call(wrapped, method="PUT", headers=[*bearer(token), ("Meshauth-Nonce", NONCE)])
    assert response.status_code == 403
    response_checker.verify_response(response.headers["meshauth-response"], service="payments", nonce=NONCE)


@pytest.mark.parametrize(
    "nonces",
    [["not a nonce"], ["x" * 257], ["é"], ["", ""], ["abc", "abc"], ["a=b"]],
    ids=["space", "too_long", "non_ascii", "empty_twice", "repeated", "inner_padding"],
)
def test_invalid_nonce_is_400(mesh: Mesh, app: App, token: str, audit_log: Any, nonces: list[str]) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    headers: list[tuple[str | bytes, str | bytes]] = [*bearer(token)]
    headers += [(b"meshauth-nonce", n.encode()) for n in nonces]
    response = call(wrapped, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "reason": "invalid_nonce"}
    assert "meshauth-response" not in response.headers
    assert not app.called
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["reason"], record.meshauth["caller"]) == (
        "rejected",
        "invalid_nonce",
        "orders",
    )


def test_nonce_ignored_without_identity(mesh: Mesh, app: App, token: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    response = call(wrapped, headers=[*bearer(token), ("Meshauth-Nonce", "not a nonce")])
    assert response.status_code == 200
    assert "meshauth-response" not in response.headers


# -- error hook ------------------------------------------------------------------------------


def test_on_error_hook_replaces_reply(mesh: Mesh, app: App) -> None:
    seen: list[BaseException] = []

    def on_error(exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes] | None:
        seen.append(exc)
        if isinstance(exc, meshauth.TokenError) and exc.reason == "missing_credentials":
            return 401, [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")], b"log in first"
        return None

    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), on_error=on_error)
    response = call(wrapped)
    assert (response.status_code, response.text, response.headers["www-authenticate"]) == (
        401,
        "log in first",
        "Bearer",
    )
    response = call(wrapped, headers=[("Authorization", "Bearer x")])
    assert response.json() == {"error": "invalid_token", "reason": "malformed"}
    assert [getattr(e, "reason", None) for e in seen] == ["missing_credentials", "malformed"]
    assert not app.called


def test_broken_on_error_hook_falls_back_to_default(mesh: Mesh, app: App, caplog: pytest.LogCaptureFixture) -> None:
    def on_error(exc: BaseException) -> None:
        raise RuntimeError("boom")

    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), on_error=on_error)
    response = call(wrapped)
    assert (response.status_code, response.json()["reason"]) == (401, "missing_credentials")
    assert any("on_error hook failed (RuntimeError)" in r.getMessage() for r in caplog.records)


def test_hook_returning_garbage_falls_back_to_default(mesh: Mesh, app: App) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), on_error=lambda exc: (401, [], "not bytes"))
    response = call(wrapped)
    assert (response.status_code, response.json()["reason"]) == (401, "missing_credentials")


def test_unexpected_failure_is_500_and_fails_closed(
    mesh: Mesh, app: App, token: str, audit_log: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenVerifier(meshauth.Verifier):
        async def averify(self, token: str, txn_token: str | None = None, *, audit: bool = True) -> meshauth.Principal:
            raise RuntimeError(f"bug while handling {token}")

    wrapped = MeshAuthMiddleware(app, BrokenVerifier("payments", mesh.keys, clock=mesh.clock))
    response = call(wrapped, headers=bearer(token))
    assert response.status_code == 500
    assert response.json() == {"error": "server_error", "reason": "internal_error"}
    assert not app.called
    [record] = audit_log
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", "internal_error")
    assert any("failed while checking a request (RuntimeError)" in r.getMessage() for r in caplog.records)
    for logged in caplog.records:
        assert token not in logged.getMessage()


# -- audit and telemetry ----------------------------------------------------------------------


def test_one_audit_record_per_request_and_never_the_token(
    mesh: Mesh, clock: FakeClock, app: App, token: str, audit_log: Any
) -> None:
    wrapped = MeshAuthMiddleware(
        app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY), identity=mesh.identity("payments")
    )
    requests: list[tuple[str, Headers]] = [
        ("/charges", bearer(token)),  # accepted
        ("/refunds", bearer(token)),  # denied
        ("/charges", [*bearer(token), ("Meshauth-Nonce", NONCE)]),  # accepted, mutual
        ("/charges", [("Authorization", f"Basic {token}")]),  # rejected
        ("/charges", [("Authorization", f"Bearer {token}x")]),  # rejected (bad signature)
    ]
    for index, (path, headers) in enumerate(requests, start=1):
        call(wrapped, path=path, headers=headers)
        assert len(audit_log) == index
    assert [r.meshauth["outcome"] for r in audit_log] == ["accepted", "denied", "accepted", "rejected", "rejected"]
    assert all(r.meshauth["event"] == "request" for r in audit_log)
    audit_log.assert_no_secret(token)


def test_spans(mesh: Mesh, app: App, token: str, telemetry: Any) -> None:
    verifier = mesh.verifier("payments", tracer_provider=telemetry.tracer_provider)
    policy = meshauth.Policy.from_dict(POLICY)
    wrapped = MeshAuthMiddleware(app, verifier, policy=policy, tracer_provider=telemetry.tracer_provider)

    call(wrapped, headers=[("Authorization", "Bearer a.b.c")])
    [verify_span] = telemetry.spans("meshauth.verify")
    assert verify_span.status.status_code == StatusCode.ERROR
    assert verify_span.attributes["meshauth.outcome"] == "rejected"
    assert telemetry.spans("meshauth.authorize") == []

    call(wrapped, headers=bearer(token))
    [authorize] = telemetry.spans("meshauth.authorize")
    assert authorize.attributes["meshauth.caller"] == "orders"
    assert authorize.attributes["meshauth.subject"] == "orders"
    assert authorize.attributes["meshauth.outcome"] == "accepted"
    assert authorize.attributes["meshauth.reason"] == "allowed"
    assert authorize.status.status_code != StatusCode.ERROR

    call(wrapped, method="DELETE", headers=bearer(token))
    denied = telemetry.spans("meshauth.authorize")[-1]
    assert denied.attributes["meshauth.outcome"] == "denied"
    assert denied.attributes["meshauth.reason"] == "no_matching_rule"
    assert denied.status.status_code == StatusCode.ERROR
    for span in telemetry.spans():
        assert token not in json.dumps(dict(span.attributes or {}), default=str)


def test_authorize_span_uses_verifier_tracer_by_default(mesh: Mesh, app: App, token: str, telemetry: Any) -> None:
    verifier = mesh.verifier("payments", tracer_provider=telemetry.tracer_provider)
    wrapped = MeshAuthMiddleware(app, verifier, policy=meshauth.Policy.from_dict(POLICY))
    call(wrapped, headers=bearer(token))
    assert [s.name for s in telemetry.spans()] == ["meshauth.verify", "meshauth.authorize"]


def test_works_as_starlette_middleware(mesh: Mesh, token: str) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"caller": request.scope["meshauth.principal"].caller})

    starlette_app = Starlette(routes=[Route("/whoami", whoami)])
    starlette_app.add_middleware(MeshAuthMiddleware, verifier=mesh.verifier("payments"))
    assert call(starlette_app, method="GET", path="/whoami", headers=bearer(token)).json() == {"caller": "orders"}
    assert call(starlette_app, method="GET", path="/whoami").status_code == 401


# -- a real server on loopback ------------------------------------------------------------------


def test_real_server_on_loopback(mesh: Mesh, app: App, token: str, serve_asgi: Callable[..., str]) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    base = serve_asgi(wrapped, lifespan="off")  # the app records every scope, lifespan included
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    with httpx.Client(base_url=base, timeout=10) as http:
        ok = http.post("/charges", headers={"Authorization": f"Bearer {token}", "Meshauth-Nonce": NONCE})
        assert ok.status_code == 200
        assert ok.json() == {"caller": "orders"}
        checker.verify_response(ok.headers["meshauth-response"], service="payments", nonce=NONCE)
        # two Authorization headers really on the wire
        twice = http.post("/charges", headers=[("Authorization", f"Bearer {token}")] * 2)
        assert (twice.status_code, twice.json()["reason"]) == (401, "duplicate_authorization")
        missing = http.get("/charges")
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, REALM)
    assert len(app.scopes) == 1


def _silent_client_socket(wrapped_app: Any, token: str) -> tuple[list[dict[str, Any]], float]:
    """Open a websocket through the middleware with a client that sends nothing; what was sent, and when it ended."""

    async def run() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        connected = False

        async def receive() -> dict[str, Any]:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            await asyncio.Event().wait()  # a silent client
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "headers": bearer_headers(token)}
        await asyncio.wait_for(wrapped_app(scope, receive, send), 5)
        return sent

    started = time.monotonic()
    sent = asyncio.run(run())
    return sent, time.monotonic() - started


def _socket_app(seen: list[dict[str, Any]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        seen.append(await receive())  # waits: the client sends nothing
        await send({"type": "websocket.send", "text": "too late"})

    return app


def test_websocket_max_age_closes_the_socket(mesh: Mesh, token: str) -> None:
    seen: list[dict[str, Any]] = []
    app = _socket_app(seen)
    sent, _ = _silent_client_socket(MeshAuthMiddleware(app, mesh.verifier("payments"), websocket_max_age=0.05), token)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1008
    assert seen == [{"type": "websocket.disconnect", "code": 1008}]
    with pytest.raises(ValueError, match="websocket_max_age"):
        MeshAuthMiddleware(app, mesh.verifier("payments"), websocket_max_age=0)


def test_websocket_closes_when_its_token_expires_before_max_age(mesh: Mesh, clock: FakeClock) -> None:
    clock.advance(86_400)  # the verifier's clock is a day ahead of the wall clock: only its own time counts
    token = mesh.identity("orders").mint("payments", ttl=60)
    clock.advance(59.9)  # on the verifier's clock the token has 0.1 s left; max_age allows an hour
    seen: list[dict[str, Any]] = []
    wrapped = MeshAuthMiddleware(_socket_app(seen), mesh.verifier("payments"), websocket_max_age=3600)
    sent, took = _silent_client_socket(wrapped, token)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"] and sent[1]["code"] == 1008
    assert seen == [{"type": "websocket.disconnect", "code": 1008}]
    assert 0.05 < took < 4  # closed at the token's expiry, measured on the verifier's clock, not at max_age


def bearer_headers(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


def test_a_service_accepting_delegated_calls_without_a_policy_is_warned_at_start_up(
    mesh: Mesh, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="meshauth"):
        MeshAuthMiddleware(app, mesh.verifier("payments"))
    assert "accepts requests inside users' transactions" in caplog.text and "has no policy" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="meshauth"):
        MeshAuthMiddleware(app, meshauth.Verifier("payments", mesh.keys, txn_issuers=(), clock=mesh.clock))
        MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict({"rules": []}))
    assert "has no policy" not in caplog.text


def test_transaction_in_verify_and_authorize_spans(mesh: Mesh, app: App, telemetry: Any, audit_log: Any) -> None:
    headers = in_transaction(mesh, "gateway", "payments")
    verifier = mesh.verifier("payments", tracer_provider=telemetry.tracer_provider)
    policy = meshauth.Policy.from_dict({"delegators": ["gateway"], "rules": [{"callers": ["gateway"]}]})
    wrapped = MeshAuthMiddleware(app, verifier, policy=policy, tracer_provider=telemetry.tracer_provider)
    assert call(wrapped, headers=list(headers.items())).status_code == 200
    transaction = app.scopes[0]["meshauth.principal"].transaction
    for name in ("meshauth.verify", "meshauth.authorize"):
        (span,) = telemetry.spans(name)
        assert span.attributes["meshauth.transaction"] == transaction, name
        assert span.attributes["meshauth.txn_issuer"] == "gateway", name
    (record,) = audit_log.fields()
    assert (record["transaction"], record["txn_issuer"]) == (transaction, "gateway")
    audit_log.assert_no_secret(headers["Txn-Token"])


@pytest.mark.parametrize(
    "payload", [b"[" * 6000, b'{"iss": "orders", "iss": "x"}', b'{"iss": "orders*"}', b"\xff\xfe", b"null"]
)
def test_a_hostile_refused_token_still_gets_a_signed_401_to_no_caller(
    mesh: Mesh, app: App, payload: bytes, response_checker: meshauth.ResponseVerifier
) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    forged = "eyJhbGciOiJFUzI1NiJ9." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + ".c2ln"
    response = call(wrapped, headers=[*bearer(forged), ("Meshauth-Nonce", NONCE)])
    assert response.status_code == 401
    proof = response_checker.verify_response(
        response.headers["meshauth-response"], service="payments", nonce=NONCE, status=401
    )
    assert proof.claims["aud"] == "-"
    assert not app.called
