"""The gateway in process: httpx.ASGITransport in front of it, an in-process ASGI app behind it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from opentelemetry.trace import SpanKind, StatusCode

import meshauth
from meshauth import JWKSEndpoint, JWKSFile, StaticKeys
from meshauth._idp_keys import IdPKeyParser, parse_idp_jwk
from meshauth.gateway import Gateway, IssuerConfig, UserTokenVerifier, create_app, load_config, serve
from meshauth.gateway._idp import is_service_token
from meshauth.testing import FakeClock

IDP = "https://idp.example.com"
OTHER_IDP = "https://partners.example.com"
AUDIENCE = "api-gateway"
PEER = ("203.0.113.7", 5555)

# -- keys and tokens ---------------------------------------------------------------------


@dataclass
class IdPKeys:
    """An IdP's private keys (RSA for RS256/PS256, EC, Ed25519) and their public JWKS."""

    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    other_rsa: rsa.RSAPrivateKey

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {**jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1"},
                {
                    **jwt.algorithms.RSAAlgorithm.to_jwk(self.other_rsa.public_key(), as_dict=True),
                    "kid": "rsa-pinned",
                    "alg": "RS256",
                },
                {
                    **jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True),
                    "kid": "rsa-ps",
                    "alg": "PS256",
                },
                {**jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec-1"},
                {**jwt.algorithms.OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": "ed-1"},
            ]
        }


@pytest.fixture(scope="module")
def idp() -> IdPKeys:
    return IdPKeys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        other_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def idp_keys(document: Any, *, source: str = "idp keys") -> StaticKeys:
    return StaticKeys.from_jwks(document, source=source, parser=IdPKeyParser(IDP))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Tokens:
    """Mints IdP user tokens on the test clock."""

    def __init__(self, idp: IdPKeys, clock: FakeClock) -> None:
        self.idp = idp
        self.clock = clock

    def claims(self, subject: str = "alice", **overrides: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": IDP,
            "sub": subject,
            "aud": [AUDIENCE, "other-api"],
            "iat": now,
            "exp": now + 600,
            "jti": "user-jti-1",
            "groups": ["staff"],
            "scope": "orders:read orders:write",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def user(self, subject: str = "alice", *, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
        key: Any = {"RS256": self.idp.rsa, "PS256": self.idp.rsa, "ES256": self.idp.ec, "EdDSA": self.idp.ed}[alg]
        default_kid = {"RS256": "rsa-1", "PS256": "rsa-ps", "ES256": "ec-1", "EdDSA": "ed-1"}[alg]
        return jwt.encode(
            self.claims(subject, **claims), key, algorithm=alg, headers={"kid": kid or default_kid, "typ": "JWT"}
        )

    def raw(self, header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
        return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"

    def unsigned(self) -> str:
        return self.raw({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, self.claims())

    def hs256_with_public_key(self) -> str:
        pem = self.idp.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(self.claims()).encode())}"
        signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(signature)}"

    def tampered(self) -> str:
        header, _, signature = self.user().split(".")
        forged = b64(json.dumps(self.claims("mallory")).encode())
        return f"{header}.{forged}.{signature}"


# -- the upstream ----------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k.decode("latin-1").lower() == name]


@dataclass
class Upstream:
    """An in-process upstream that records every request it receives."""

    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.seen.append(Seen(scope["method"], scope["raw_path"], scope["query_string"], scope["headers"], body))
        path = scope["path"]
        if path.endswith("/stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for part in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = json.dumps({"path": path, "length": len(body)}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"x-upstream", b"yes"),
            (b"keep-alive", b"timeout=5"),
            (b"connection", b"x-internal"),
            (b"x-internal", b"secret"),
        ]
        await send(
            {"type": "http.response.start", "status": 201 if scope["method"] == "POST" else 200, "headers": headers}
        )
        await send({"type": "http.response.body", "body": payload})


# -- the harness -------------------------------------------------------------------------------

CONFIG = """
service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"
audit_log = "audit.jsonl"
{top}

[[issuers]]
issuer = "{idp}"
jwks = "idp-jwks.json"
audience = "{audience}"
algorithms = ["RS256", "PS256", "ES256", "EdDSA"]
leeway = 30

[[issuers]]
issuer = "{other_idp}"
jwks = "idp-jwks.json"
audience = "{audience}"
algorithms = ["RS256"]

[[routes]]
prefix = "/orders"
upstream = "http://orders.internal:8001"
service = "orders"
methods = ["GET", "POST"]
issuers = ["{idp}"]
subjects = ["*"]
groups = ["staff", "admins"]
scopes = ["orders:read"]

[[routes]]
prefix = "/orders/admin"
upstream = "http://orders.internal:8001"
service = "orders"
subjects = ["root", "admin-*"]

[[routes]]
prefix = "/billing"
upstream = "http://billing.internal:8002/api"
service = "billing"
strip_prefix = true
accept_service_tokens = true
callers = ["payments"]
forward_user_token = true
"""


class Harness:
    """Writes keys, registry, IdP key set and config to a directory; builds gateways over it."""

    def __init__(self, tmp_path: Path, idp: IdPKeys, *, top: str = "") -> None:
        self.dir = tmp_path
        self.clock = FakeClock(start=time.time())
        self.tokens = Tokens(idp, self.clock)
        self.gateway_key = meshauth.SigningKey.generate()
        self.payments_key = meshauth.SigningKey.generate("EdDSA")
        (tmp_path / "gateway.pem").write_bytes(self.gateway_key.to_pem())
        registry = {"keys": [self.gateway_key.public_jwk(iss="gateway"), self.payments_key.public_jwk(iss="payments")]}
        (tmp_path / "registry.json").write_text(json.dumps(registry))
        self.registry = meshauth.StaticKeys.from_jwks(registry)
        (tmp_path / "idp-jwks.json").write_text(json.dumps(idp.jwks()))
        text = CONFIG.format(top=top, idp=IDP, other_idp=OTHER_IDP, audience=AUDIENCE)
        (tmp_path / "gateway.toml").write_text(text)
        self.config = load_config(tmp_path / "gateway.toml")
        self.upstream = Upstream()

    def gateway(self, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> Gateway:
        upstream = transport or httpx.ASGITransport(app=self.upstream)  # type: ignore[arg-type]
        return create_app(self.config, upstream_transport=upstream, clock=self.clock, **kwargs)

    def run(
        self,
        scenario: Callable[[httpx.AsyncClient], Awaitable[Any]],
        *,
        gateway: Gateway | None = None,
        peer: tuple[str, int] = PEER,
    ) -> Any:
        app = gateway or self.gateway()

        async def main() -> Any:
            async with app:
                transport = httpx.ASGITransport(app=app, client=peer)  # type: ignore[arg-type]
                async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
                    result = await scenario(client)
            return result

        return asyncio.run(main())

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        headers = list(headers.items()) if isinstance(headers, dict) else list(headers)
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        method = kwargs.pop("method", "GET")
        gateway = kwargs.pop("gateway", None)

        async def scenario(client: httpx.AsyncClient) -> httpx.Response:
            return await client.request(method, path, headers=headers, **kwargs)

        response: httpx.Response = self.run(scenario, gateway=gateway)
        return response

    def audit(self) -> list[dict[str, Any]]:
        path = self.dir / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def upstream_principal(self, seen: Seen, service: str = "orders") -> meshauth.Principal:
        (authorization,) = seen.header("authorization")
        assert authorization.startswith("Bearer ")
        txn = seen.header("txn-token")
        assert len(txn) <= 1
        verifier = meshauth.Verifier(service, self.registry, clock=self.clock)
        return verifier.verify(authorization[7:], txn[0] if txn else None)


@pytest.fixture
def harness(tmp_path: Path, idp: IdPKeys) -> Harness:
    return Harness(tmp_path, idp)


def assert_no_token_leak(text: str, *tokens: str) -> None:
    for token in tokens:
        assert token not in text
        signature = token.rsplit(".", 1)[-1]
        if len(signature) >= 16:  # a short fake could occur in a random trace id
            assert signature not in text


# -- the happy path ---------------------------------------------------------------------------


def test_alice_reaches_orders_with_a_delegated_token(harness: Harness) -> None:
    token = harness.tokens.user()
    response = harness.get("/orders/42?expand=items&x=%20y", token, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json() == {"path": "/orders/42", "length": 0}
    (seen,) = harness.upstream.seen
    assert seen.raw_path == b"/orders/42" and seen.query == b"expand=items&x=%20y"
    principal = harness.upstream_principal(seen)
    assert principal.subject == "alice"
    assert principal.caller == "gateway"
    assert principal.txn_issuer == "gateway" and principal.transaction
    assert principal.context == {"groups": ("staff",), "idp": IDP}
    assert principal.audience == "orders"
    assert principal.scopes == frozenset({"orders:read", "orders:write"})
    assert principal.expires_at - principal.issued_at <= 300
    # The user's own token never goes upstream, in any header.
    assert_no_token_leak(repr(seen.headers), token)
    assert seen.header("accept") == ["application/json"]
    assert seen.header("x-forwarded-for") == [PEER[0]]
    assert seen.header("x-forwarded-proto") == ["http"]
    assert seen.header("x-forwarded-host") == ["gateway.test"]
    assert seen.header("host") == ["orders.internal:8001"]
    # Upstream response headers pass, except hop-by-hop ones.
    assert response.headers["x-upstream"] == "yes"
    assert "keep-alive" not in response.headers and "x-internal" not in response.headers
    (record,) = harness.audit()
    assert record["event"] == "gateway.request"
    assert (record["outcome"], record["reason"], record["status"]) == ("accepted", "ok", 200)
    assert record["subject"] == "alice" and record["issuer"] == IDP and record["txn_issuer"] == "gateway"
    assert record["transaction"] == principal.transaction
    assert record["audience"] == "orders" and record["route"] == "/orders" and record["kid"] == "rsa-1"
    assert record["jti"] == "user-jti-1" and record["method"] == "GET" and record["path"] == "/orders/42"
    assert record["client"] == PEER[0]
    assert len(record["trace_id"]) == 32 and len(record["span_id"]) == 16


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_every_idp_algorithm(harness: Harness, alg: str) -> None:
    response = harness.get("/orders", harness.tokens.user(alg=alg))
    assert response.status_code == 200, response.text
    assert harness.upstream_principal(harness.upstream.seen[0]).subject == "alice"


def test_request_and_response_bodies_stream_through(harness: Harness) -> None:
    token = harness.tokens.user()
    chunks = [b"x" * 65536 for _ in range(8)]

    async def body() -> Any:
        for chunk in chunks:
            yield chunk

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        streamed = await client.post("/orders", headers=headers, content=body())
        sized = await client.post("/orders", headers=headers, content=b"abc")
        async with client.stream("GET", "/orders/stream", headers=headers) as response:
            parts = [part async for part in response.aiter_raw()]
        assert b"".join(parts) == b"one,two,three"
        return streamed, sized, response

    streamed, sized, _ = harness.run(scenario)
    assert streamed.status_code == 201 and streamed.json()["length"] == 8 * 65536
    assert sized.json()["length"] == 3
    first, second, third = harness.upstream.seen
    assert first.body == b"".join(chunks)
    assert second.header("content-length") == ["3"] and second.header("transfer-encoding") == []
    assert third.body == b"" and third.header("content-length") == []
    assert [r["status"] for r in harness.audit()] == [201, 201, 200]


def test_strip_prefix_and_dot_segments(harness: Harness) -> None:
    token = harness.tokens.user()

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        headers = {"Authorization": f"Bearer {token}"}
        a = await client.get("/billing/invoices/7?full=1", headers=headers)
        b = await client.get("/billing", headers=headers)
        # httpx would resolve the dots itself: send the raw target.
        c = await client.get(
            httpx.URL("http://gateway.test").copy_with(raw_path=b"/orders/a/./b/../c"), headers=headers
        )
        return [a.status_code, b.status_code, c.status_code]

    assert harness.run(scenario) == [200, 200, 200]
    invoices, root, dotted = harness.upstream.seen
    assert invoices.raw_path == b"/api/invoices/7" and invoices.query == b"full=1"
    assert root.raw_path == b"/api/"
    assert dotted.raw_path == b"/orders/a/c"
    assert harness.upstream_principal(invoices, "billing").subject == "alice"
    # forward_user_token: the user's token in its own header, never in Authorization.
    assert invoices.header("x-forwarded-authorization") == [f"Bearer {token}"]
    assert token not in invoices.header("authorization")[0]


def test_longest_prefix_wins_and_segments_matter(harness: Harness) -> None:
    admin = harness.tokens.user("admin-bob", groups=None, scope=None)

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        headers = {"Authorization": f"Bearer {admin}"}
        return [
            (await client.get("/orders/admin/x", headers=headers)).status_code,
            (await client.get("/ordersx", headers=headers)).status_code,
            (await client.get("/nothing", headers=headers)).status_code,
            (
                await client.get("/orders/admin", headers={"Authorization": f"Bearer {harness.tokens.user()}"})
            ).status_code,
        ]

    # /orders/admin needs no group or scope but a subject glob; /orders needs the group.
    assert harness.run(scenario) == [200, 404, 404, 403]
    records = harness.audit()
    assert [r["reason"] for r in records] == ["ok", "no_route", "no_route", "subject_not_allowed"]
    assert records[1]["outcome"] == "denied" and records[1]["status"] == 404


# -- refusals ----------------------------------------------------------------------------------


def _bad_tokens(t: Tokens) -> dict[str, tuple[str, str]]:
    now = int(t.clock())
    return {
        "expired": (t.user(exp=now - 31, iat=now - 400), "expired"),
        "tampered": (t.tampered(), "bad_signature"),
        "wrong issuer": (t.user(iss="https://evil.example.com"), "issuer_mismatch"),
        "wrong audience": (t.user(aud="someone-else"), "wrong_audience"),
        "unsigned": (t.unsigned(), "unsupported_alg"),
        "hs256 with the public key": (t.hs256_with_public_key(), "unsupported_alg"),
        "oversized": (t.user(padding="x" * 17000), "too_large"),  # IdP tokens: 16 KiB by default
        "not a jwt": ("abc.def", "malformed"),
        "unknown kid": (t.user(kid="nope"), "unknown_kid"),
        "pinned key, other alg": (t.user(alg="PS256", kid="rsa-pinned"), "unsupported_alg"),
        "missing subject": (t.user(sub=None), "missing_claim"),
        "not yet valid": (t.user(nbf=now + 3600), "not_yet_valid"),
        "forbidden header": (
            t.raw({"alg": "RS256", "kid": "rsa-1", "jku": "https://evil/jwks"}, t.claims()),
            "malformed",
        ),
    }


def test_bad_tokens_get_401_with_reason_and_audit(harness: Harness) -> None:
    bad = _bad_tokens(harness.tokens)

    async def scenario(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        return {
            name: await client.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
            for name, (token, _) in bad.items()
        }

    responses = harness.run(scenario)
    assert harness.upstream.seen == []
    for name, (_token, reason) in bad.items():
        response = responses[name]
        assert response.status_code == 401, name
        assert response.json() == {"error": "invalid_token", "reason": reason}, name
        assert response.headers["www-authenticate"] == (
            f'Bearer realm="gateway", error="invalid_token", error_description="{reason}"'
        ), name
        assert response.headers["cache-control"] == "no-store"
        assert_no_token_leak(response.text, _token)
    records = harness.audit()
    assert [(r["outcome"], r["reason"], r["status"]) for r in records] == [
        ("rejected", reason, 401) for _, reason in bad.values()
    ]
    assert all(r["trace_id"] and r["route"] == "/orders" for r in records)
    log_text = (harness.dir / "audit.jsonl").read_text()
    assert_no_token_leak(log_text, *(token for token, _ in bad.values() if len(token) < 9000))


def test_missing_duplicate_and_wrong_scheme_credentials(harness: Harness) -> None:
    token = harness.tokens.user()

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get("/orders"),
            await client.get(
                "/orders", headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
            ),
            await client.get("/orders", headers={"Authorization": "Basic YWxpY2U6cHc="}),
            await client.get("/orders", headers={"Authorization": "Bearer "}),
        ]

    missing, duplicate, basic, empty = harness.run(scenario)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="gateway"'
    assert missing.json()["reason"] == "missing_credentials"
    assert duplicate.status_code == 401 and duplicate.json()["reason"] == "duplicate_authorization"
    assert basic.status_code == 401 and basic.json()["reason"] == "wrong_scheme"
    assert empty.status_code == 401 and empty.json()["reason"] == "malformed"
    assert harness.upstream.seen == []
    assert [r["reason"] for r in harness.audit()] == [
        "missing_credentials",
        "duplicate_authorization",
        "wrong_scheme",
        "malformed",
    ]


@pytest.mark.parametrize(
    ("claims", "request_line", "status", "reason"),
    [
        ({"groups": ["contractors"]}, ("GET", "/orders"), 403, "group_required"),
        ({"groups": None}, ("GET", "/orders"), 403, "group_required"),
        ({"scope": "orders:write"}, ("GET", "/orders"), 403, "insufficient_scope"),
        ({"iss": OTHER_IDP}, ("GET", "/orders"), 403, "issuer_not_allowed"),
        ({}, ("DELETE", "/orders/1"), 405, "method_not_allowed"),
        ({}, ("GET", "/orders/admin"), 403, "subject_not_allowed"),
        ({"sub": "gateway"}, ("GET", "/orders"), 403, "delegation_not_allowed"),
    ],
)
def test_route_policy_refusals(
    harness: Harness, claims: dict[str, Any], request_line: tuple[str, str], status: int, reason: str
) -> None:
    method, path = request_line
    token = harness.tokens.user(**claims)
    response = harness.get(path, token, method=method)
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason
    if status == 405:
        assert response.headers["allow"] == "GET, POST"
    if reason == "insufficient_scope":
        assert response.headers["www-authenticate"] == 'Bearer realm="gateway", error="insufficient_scope"'
    assert harness.upstream.seen == []
    (record,) = harness.audit()
    assert (record["outcome"], record["reason"], record["status"]) == ("denied", reason, status)
    assert record["subject"] == claims.get("sub", "alice")


def test_invalid_paths_are_refused(harness: Harness) -> None:
    token = harness.tokens.user()

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        base = httpx.URL("http://gateway.test")
        headers = {"Authorization": f"Bearer {token}"}
        return [
            (await client.get(base.copy_with(raw_path=raw), headers=headers)).status_code
            for raw in (b"/orders%2Fadmin", b"/orders/%2e%2e/%2E%2E/etc", b"/orders/%00", b"/orders/%zz")
        ]

    assert harness.run(scenario) == [400, 400, 400, 400]
    assert {r["reason"] for r in harness.audit()} == {"bad_path"}
    assert harness.upstream.seen == []


# -- upstream failures ---------------------------------------------------------------------------


def _failing(error: type[httpx.TransportError]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("upstream failed", request=request)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (httpx.ConnectError, 502, "upstream_unreachable"),
        (httpx.RemoteProtocolError, 502, "upstream_unreachable"),
        (httpx.ReadTimeout, 504, "upstream_timeout"),
        (httpx.ConnectTimeout, 504, "upstream_timeout"),
    ],
)
def test_upstream_failures(harness: Harness, error: type[httpx.TransportError], status: int, reason: str) -> None:
    response = harness.get("/orders", harness.tokens.user(), gateway=harness.gateway(_failing(error)))
    assert response.status_code == status
    assert response.json()["reason"] == reason
    (record,) = harness.audit()
    assert (record["outcome"], record["reason"], record["status"]) == ("error", reason, status)
    assert record["subject"] == "alice"


def test_upstream_down_for_real(harness: Harness) -> None:
    """A real client (no injected transport) and a closed loopback port."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = (harness.dir / "gateway.toml").read_text().replace("orders.internal:8001", f"127.0.0.1:{port}")
    (harness.dir / "gateway.toml").write_text(text)
    gateway = create_app(harness.dir / "gateway.toml", clock=harness.clock)
    response = harness.get("/orders", harness.tokens.user(), gateway=gateway)
    assert response.status_code == 502 and response.json()["reason"] == "upstream_unreachable"


# -- headers ---------------------------------------------------------------------------------------


def test_forged_identity_and_hop_by_hop_headers_are_dropped(harness: Harness) -> None:
    token = harness.tokens.user()
    forged = [
        ("Authorization", f"Bearer {token}"),
        ("X-Forwarded-For", "10.9.9.9"),
        ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Authorization", "Bearer forged"),
        ("Forwarded", "for=10.9.9.9"),
        ("X-Real-IP", "10.9.9.9"),
        ("Meshauth-Response", "forged.response.token"),
        ("Meshauth-Nonce", "n1"),
        ("Meshauth-Principal", "root"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Forwarded-Port", "1"),
        ("X-Client-IP", "10.9.9.9"),
        ("True-Client-IP", "10.9.9.9"),
        ("X-Meshauth-Principal", "ceo"),
        ("Txn-Token", "forged"),
        ("X-Custom", "kept"),
    ]
    response = harness.get("/orders", headers=forged)
    assert response.status_code == 200
    (seen,) = harness.upstream.seen
    names = {k.decode().lower() for k, _ in seen.headers}
    for dropped in (
        "forwarded",
        "x-real-ip",
        "meshauth-response",
        "meshauth-nonce",
        "meshauth-principal",
        "x-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "x-forwarded-authorization",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-forwarded-port",
        "x-client-ip",
        "true-client-ip",
        "x-meshauth-principal",
    ):
        assert dropped not in names, dropped
    # The client's forged Txn-Token is dropped: the one upstream is the gateway's own, issued for alice.
    assert seen.header("txn-token") != ["forged"] and len(seen.header("txn-token")) == 1
    assert seen.header("x-custom") == ["kept"]
    assert seen.header("x-forwarded-for") == [PEER[0]]
    assert seen.header("x-forwarded-host") == ["gateway.test"]
    assert seen.header("x-forwarded-proto") == ["http"]
    assert len(seen.header("authorization")) == 1
    assert harness.upstream_principal(seen).subject == "alice"


def test_trusted_proxy_forwarded_for_is_appended(tmp_path: Path, idp: IdPKeys) -> None:
    harness = Harness(tmp_path, idp, top='trusted_proxies = ["203.0.113.0/24"]')
    token = harness.tokens.user()
    headers = {
        "X-Forwarded-For": "198.51.100.1, 203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example.com",
    }
    assert harness.get("/orders", token, headers=headers).status_code == 200
    (seen,) = harness.upstream.seen
    assert seen.header("x-forwarded-for") == ["198.51.100.1, 203.0.113.9, 203.0.113.7"]
    assert seen.header("x-forwarded-proto") == ["https"]
    assert seen.header("x-forwarded-host") == ["api.example.com"]
    (record,) = harness.audit()
    assert record["client"] == "198.51.100.1"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # a client's values first, the appending proxy's last: the proxy's win
        (
            {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "evil.example, gw.example"},
            ("http", "gw.example", None),
        ),
        ({"X-Forwarded-Proto": "javascript, http"}, ("http", None, None)),
        ({"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "a b"}, ("http", "gateway.test", None)),
        # the address forms a proxy may use, all in normal form
        ({"X-Forwarded-For": "198.51.100.1, ::ffff:203.0.113.9"}, ("http", None, "198.51.100.1")),
        ({"X-Forwarded-For": "198.51.100.1, [203.0.113.9]:443"}, ("http", None, "198.51.100.1")),
        ({"X-Forwarded-For": "198.51.100.1, 203.0.113.9:443"}, ("http", None, "198.51.100.1")),
        # no more than max_forwarded_hops entries are looked at
        ({"X-Forwarded-For": ", ".join(["198.51.100.1"] + ["203.0.113.9"] * 6000)}, ("http", None, "203.0.113.9")),
    ],
)
def test_trusted_proxy_values_are_the_rightmost_valid_ones(
    tmp_path: Path, idp: IdPKeys, headers: dict[str, str], expected: tuple[str, str | None, str | None]
) -> None:
    proto, host, client = expected
    harness = Harness(tmp_path, idp, top='trusted_proxies = ["203.0.113.0/24"]')
    assert harness.get("/orders", harness.tokens.user(), headers=headers).status_code == 200
    (seen,) = harness.upstream.seen
    assert seen.header("x-forwarded-proto") == [proto]
    if host is not None:
        assert seen.header("x-forwarded-host") == [host]
    (forwarded_for,) = seen.header("x-forwarded-for")
    assert len(forwarded_for.split(",")) <= 11
    if client is not None:
        (record,) = harness.audit()
        assert record["client"] == client


# -- trace context ------------------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_traceparent_is_continued_or_started(harness: Harness) -> None:
    token = harness.tokens.user()

    async def scenario(client: httpx.AsyncClient) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        await client.get("/orders", headers={**auth, "traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "v=1"})
        await client.get("/orders", headers=auth)
        await client.get("/orders", headers={**auth, "traceparent": "00-zz-bad-01"})
        await client.get(
            "/orders",
            headers=[*auth.items(), ("traceparent", f"00-{TRACE_ID}-{PARENT}-01")] * 1
            + [("traceparent", f"00-{TRACE_ID}-{PARENT}-00")],
        )
        await client.get("/nowhere", headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-00"})

    harness.run(scenario)
    continued, started, invalid, doubled = harness.upstream.seen
    records = harness.audit()
    (traceparent,) = continued.header("traceparent")
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id != PARENT and parent_id == records[0]["span_id"]
    assert continued.header("tracestate") == ["v=1"]
    assert records[0]["trace_id"] == TRACE_ID
    for seen, record in ((started, records[1]), (invalid, records[2]), (doubled, records[3])):
        (value,) = seen.header("traceparent")
        _, trace_id, parent_id, flags = value.split("-")
        assert trace_id != TRACE_ID and trace_id == record["trace_id"] and len(trace_id) == 32
        assert parent_id == record["span_id"] and flags == "01"
        assert seen.header("tracestate") == []
    assert len({r["trace_id"] for r in records[1:4]}) == 3
    # A refused request still carries the caller's trace id in its audit record.
    assert records[4]["trace_id"] == TRACE_ID and records[4]["status"] == 404


def test_spans_with_an_sdk(harness: Harness, telemetry: Any) -> None:
    gateway = harness.gateway(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider)
    token = harness.tokens.user()

    async def scenario(client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
        await client.get("/orders", headers=headers)
        await client.get("/orders", headers={**headers, "Authorization": f"Bearer {harness.tokens.tampered()}"})
        await client.get("/orders", headers={"Authorization": f"Bearer {harness.tokens.user(groups=['x'])}"})

    harness.run(scenario, gateway=gateway)
    verify = telemetry.spans("meshauth.verify")
    assert [s.attributes["meshauth.outcome"] for s in verify] == ["accepted", "rejected", "accepted"]
    assert verify[1].status.status_code == StatusCode.ERROR
    assert verify[1].attributes["meshauth.reason"] == "bad_signature"
    assert verify[0].attributes["meshauth.subject"] == "alice"
    assert all(s.context.trace_id == int(TRACE_ID, 16) for s in verify[:2])
    assert all(s.parent is not None and s.parent.span_id == int(PARENT, 16) for s in verify[:2])
    authorize = telemetry.spans("meshauth.authorize")
    assert [s.attributes["meshauth.outcome"] for s in authorize] == ["accepted", "denied"]
    assert authorize[1].status.status_code == StatusCode.ERROR
    (client_span,) = [s for s in telemetry.spans() if s.kind == SpanKind.CLIENT]
    assert client_span.name == "GET" and client_span.attributes["http.response.status_code"] == 200
    (seen,) = harness.upstream.seen
    assert seen.header("traceparent") == [f"00-{TRACE_ID}-{client_span.context.span_id:016x}-01"]
    records = harness.audit()
    assert records[0]["span_id"] == f"{client_span.context.span_id:016x}"
    # The third request started a trace: its verify span belongs to the audited trace id.
    assert verify[2].context.trace_id == int(records[2]["trace_id"], 16)
    assert telemetry.spans("meshauth.mint")
    points = telemetry.metric_points("meshauth.verify.outcomes")
    assert sum(p.value for p in points) == 3
    for span in telemetry.spans():
        assert_no_token_leak(json.dumps(dict(span.attributes or {})), token)


# -- service tokens ---------------------------------------------------------------------------------


def test_service_tokens_on_routes_that_accept_them(harness: Harness) -> None:
    payments = meshauth.ServiceIdentity("payments", harness.payments_key, clock=harness.clock)
    plain = payments.token_for("gateway")
    gateway_identity = meshauth.ServiceIdentity("gateway", harness.gateway_key, clock=harness.clock)
    carol_txn = gateway_identity.issue_txn_token("carol", scope="refunds")
    delegated = payments.mint("gateway", scope="refunds", txn_token=carol_txn)
    for_orders = payments.token_for("orders")
    gateway = harness.gateway()

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get("/billing/x", headers={"Authorization": f"Bearer {plain}"}),
            await client.get("/billing/y", headers={"Authorization": f"Bearer {delegated}", "Txn-Token": carol_txn}),
            await client.get("/orders", headers={"Authorization": f"Bearer {plain}"}),
            await client.get("/billing/z", headers={"Authorization": f"Bearer {for_orders}"}),
        ]

    ok_plain, ok_delegated, not_here, wrong_audience = harness.run(scenario, gateway=gateway)
    assert ok_plain.status_code == 200 and ok_delegated.status_code == 200
    first, second = harness.upstream.seen
    p1 = harness.upstream_principal(first, "billing")
    assert (p1.caller, p1.subject, p1.transaction) == ("gateway", "gateway", None)
    p2 = harness.upstream_principal(second, "billing")
    assert (p2.caller, p2.subject, p2.scopes) == ("gateway", "carol", frozenset({"refunds"}))
    # The Txn-Token that came with the service token is forwarded unchanged, never re-issued.
    assert second.header("txn-token") == [carol_txn] and first.header("txn-token") == []
    # Service tokens carry no user token to forward.
    assert first.header("x-forwarded-authorization") == []
    assert not_here.status_code == 401 and not_here.json()["reason"] == "wrong_type"
    assert wrong_audience.status_code == 401 and wrong_audience.json()["reason"] == "wrong_audience"
    # Exactly one record per request: the verifier's own is suppressed (audit=False).
    records = harness.audit()
    assert {r["event"] for r in records} == {"gateway.request"}
    assert [r["reason"] for r in records] == ["ok", "ok", "wrong_type", "wrong_audience"]
    assert records[0]["caller"] == "payments" and records[1]["transaction"] == p2.transaction
    assert records[3]["caller"] == "payments"


def test_service_token_from_a_caller_not_listed(harness: Harness) -> None:
    other = meshauth.SigningKey.generate()
    registry = meshauth.StaticKeys.from_jwks(
        {"keys": [*harness.registry.to_jwks()["keys"], other.public_jwk(iss="reports")]}
    )
    token = meshauth.ServiceIdentity("reports", other, clock=harness.clock).token_for("gateway")
    gateway = harness.gateway(registry=registry)
    response = harness.get("/billing/x", token, gateway=gateway)
    assert response.status_code == 403 and response.json()["reason"] == "caller_not_allowed"


# -- health, readiness, lifecycle ----------------------------------------------------------------------


def test_healthz_and_readyz(harness: Harness) -> None:
    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/healthz"), await client.get("/readyz?verbose=1")]

    health, ready = harness.run(scenario)
    assert health.status_code == 200 and health.json() == {"ready": True}
    # Anonymous clients are told readiness only: no issuer URL or key source (verbose or not).
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert harness.gateway().readiness() == (
        True,
        {"status": "ready", "registry": True, "issuers": {IDP: True, OTHER_IDP: True}},
    )
    assert harness.audit() == []


def test_not_ready_while_an_issuer_key_set_cannot_be_fetched(harness: Harness) -> None:
    failing = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(500)))
    endpoint = JWKSEndpoint("https://idp.example.com/jwks", async_client=failing, retries=1, parser=IdPKeyParser(IDP))
    static = idp_keys(harness.tokens.idp.jwks())
    gateway = harness.gateway(issuer_keys={IDP: endpoint, OTHER_IDP: static})

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        result = [
            await client.get("/readyz"),
            await client.get("/orders", headers={"Authorization": f"Bearer {harness.tokens.user()}"}),
        ]
        await failing.aclose()
        return result

    ready, request = harness.run(scenario, gateway=gateway)
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert gateway.readiness() == (
        False,
        {"status": "not_ready", "registry": True, "issuers": {IDP: False, OTHER_IDP: True}},
    )
    assert request.status_code == 503 and request.json()["reason"] == "keys_unavailable"
    assert "retry-after" in request.headers
    refresh, record = harness.audit()
    assert (refresh["event"], refresh["reason"]) == ("jwks.refresh", "http_error")
    assert (record["outcome"], record["reason"], record["status"]) == ("error", "keys_unavailable", 503)


def test_lifespan_protocol_and_websocket_refusal(harness: Harness) -> None:
    gateway = create_app(harness.config)
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
            queue.put_nowait(message)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await gateway({"type": "lifespan"}, queue.get, send)
        await gateway({"type": "websocket", "path": "/orders"}, queue.get, send)

    asyncio.run(main())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete", "websocket.close"]
    assert gateway._transport is None and gateway._audit_handler is None


def test_audit_is_one_json_line_per_request_without_tokens(harness: Harness) -> None:
    good = harness.tokens.user()
    now = int(harness.clock())
    expired = harness.tokens.user(iat=now - 700, exp=now - 100)
    elsewhere = harness.tokens.user(aud="billing-api")

    async def scenario(client: httpx.AsyncClient) -> None:
        for token in (good, expired, good, harness.tokens.tampered(), elsewhere):
            await client.get("/orders?access_token=secret-in-query", headers={"Authorization": f"Bearer {token}"})

    harness.run(scenario)
    text = (harness.dir / "audit.jsonl").read_text()
    lines = text.splitlines()
    assert len(lines) == 5
    records = [json.loads(line) for line in lines]
    assert [r["reason"] for r in records] == ["ok", "expired", "ok", "bad_signature", "wrong_audience"]
    # The detail keeps what was expected and what was found, in words.
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 100))
    assert re.search(rf"the token expired {when}, 10[01] s ago \(now 20[-0-9T:]+Z, leeway 30 s\)", records[1]["detail"])
    assert "the token is for 'billing-api', not for 'api-gateway'" in records[4]["detail"]
    assert all(r["trace_id"] and r["event"] == "gateway.request" for r in records)
    # The route's policy judged the two accepted requests: the rule (named after the route) and its digest.
    assert records[0]["rule"] == records[0]["route"] == records[2]["rule"]
    assert (
        re.fullmatch("[0-9a-f]{64}", records[0]["policy_sha256"])
        and records[2]["policy_sha256"] == records[0]["policy_sha256"]
    )
    assert not any("rule" in r or "policy_sha256" in r for r in (records[1], records[3], records[4]))  # refused before
    assert "secret-in-query" not in text
    assert_no_token_leak(text, good, expired, harness.tokens.tampered())
    # Delegated tokens do not leak either.
    for seen in harness.upstream.seen:
        (authorization,) = seen.header("authorization")
        assert_no_token_leak(text, authorization[7:])


def test_serve_returns_2_on_a_configuration_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('service = "gateway"\nbogus = 1\n')
    assert serve(path) == 2
    assert f"{path}: bogus: unknown key" in capsys.readouterr().err


# -- the IdP verifier and key sources ------------------------------------------------------------------


def _verifier(idp: IdPKeys, clock: FakeClock, **issuer: Any) -> UserTokenVerifier:
    config = IssuerConfig(IDP, "unused", AUDIENCE, tuple(issuer.pop("algorithms", ("RS256", "ES256"))), **issuer)
    return UserTokenVerifier([config], {IDP: idp_keys(idp.jwks())}, clock=clock)


def test_user_token_claims(idp: IdPKeys) -> None:
    clock = FakeClock()
    tokens = Tokens(idp, clock)
    verifier = _verifier(idp, clock)
    user = asyncio.run(verifier.averify(tokens.user(scope="a b", scp=["c"], groups="staff")))
    assert user.subject == "alice" and user.issuer == IDP and user.audience == AUDIENCE
    assert user.scopes == frozenset({"a", "b", "c"}) and user.groups == frozenset({"staff"})
    assert user.token_id == "user-jti-1" and user.kid == "rsa-1" and user.alg == "RS256"

    def reason(token: str) -> str:
        with pytest.raises(meshauth.TokenError) as caught:
            asyncio.run(verifier.averify(token))
        return caught.value.reason

    now = int(clock())
    assert reason(tokens.user(alg="EdDSA")) == "unsupported_alg"  # not in this issuer's algorithms
    assert reason(tokens.user(groups=[1])) == "invalid_claim"
    assert reason(tokens.user(scope=["a"])) == "invalid_claim"
    assert reason(tokens.user(exp="soon")) == "invalid_claim"
    assert reason(tokens.user(exp=True)) == "invalid_claim"
    assert reason(tokens.user(aud=[])) == "wrong_audience"
    assert reason(tokens.user(aud=[1])) == "invalid_claim"
    assert reason(tokens.user(sub="")) == "invalid_claim"
    assert reason(tokens.user(iss=None)) == "missing_claim"
    assert reason(tokens.user(iat=now + 3600, exp=now + 4000)) == "not_yet_valid"
    assert (
        reason(tokens.raw({"alg": "RS256", "kid": "rsa-1", "typ": "meshauth+jwt"}, tokens.claims(), b"s"))
        == "wrong_type"
    )
    # No kid, and the issuer's key set holds several keys: which one is meant is unknown.
    assert reason(tokens.raw({"alg": "RS256", "typ": "JWT"}, tokens.claims(), b"s")) == "unknown_kid"
    assert reason(tokens.raw({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}, tokens.claims(), b"s")) == "malformed"
    assert reason(tokens.raw({"alg": "RS256", "kid": "rsa-1"}, tokens.claims())) == "malformed"
    # The leeway applies: 20 s after exp is still fine with 30 s of leeway.
    assert asyncio.run(verifier.averify(tokens.user(iat=now - 300, exp=now - 20))).subject == "alice"
    assert is_service_token(tokens.user()) is False


def test_idp_key_file_reloads_on_change(tmp_path: Path, idp: IdPKeys) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [idp.jwks()["keys"][0]]}))
    ticks = [0.0]
    keys = JWKSFile(path, monotonic=lambda: ticks[0], parser=IdPKeyParser(IDP))
    assert keys.get_key("ec-1") is None and keys.get_key("rsa-1") is not None
    path.write_text(json.dumps(idp.jwks()) + " ")
    ticks[0] = 5.0
    assert keys.get_key("ec-1") is not None
    path.write_text("not json at all")
    ticks[0] = 10.0
    assert keys.get_key("ec-1") is not None  # the last good set stays
    assert keys.status()["last_error"] and keys.status()["ready"]


def test_idp_jwks_skips_bad_keys_and_duplicates(idp: IdPKeys) -> None:
    good = idp.jwks()["keys"]
    document = {
        "keys": [
            *good,
            {**good[0], "kid": "dup"},
            {**good[2], "kid": "dup"},
            {"kty": "oct", "kid": "secret"},
            {**good[0], "kid": "enc", "use": "enc"},
            {**good[0], "kid": "bad-alg", "alg": "ES256"},
            {"kty": "RSA", "kid": "small", "n": b64((2**1023 + 1).to_bytes(128, "big")), "e": "AQAB"},
        ]
    }
    keys = idp_keys(document)
    assert set(keys.keyset.kids()) == {"rsa-1", "rsa-pinned", "rsa-ps", "ec-1", "ed-1"}
    assert len(keys.problems) == 5
    assert all(record.owner == IDP for record in keys.keyset)
    # A published private member is not a skippable key: the whole document is refused.
    with pytest.raises(meshauth.ConfigurationError, match="private key members"):
        idp_keys({"keys": [*good, {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"}]})


def test_idp_keys_over_jwks_endpoint(idp: IdPKeys) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=idp.jwks(), headers={"cache-control": "max-age=600"})

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            parser = IdPKeyParser(IDP, algorithms=("PS256", "ES256"))
            endpoint = JWKSEndpoint("https://idp.example.com/jwks", async_client=client, parser=parser)
            found = await asyncio.gather(*(endpoint.aget_key("ec-1") for _ in range(10)))
            assert all(record is found[0] and record.alg == "ES256" for record in found) and len(calls) == 1
            # Without "alg", an RSA key is bound to the first allowed RSA algorithm.
            assert (await endpoint.aget_key("rsa-1")).alg == "PS256"
            assert await endpoint.aget_key("rsa-pinned") is None  # RS256 is not allowed for this issuer
            assert any("rsa-pinned" in problem for problem in endpoint.status()["problems"])
            await endpoint.aclose()

    asyncio.run(main())


def test_idp_key_endpoint_refuses_big_bodies_and_plain_http(idp: IdPKeys) -> None:
    with pytest.raises(meshauth.ConfigurationError):
        JWKSEndpoint("http://idp.example.com/jwks", parser=IdPKeyParser(IDP))
    JWKSEndpoint("http://127.0.0.1:9/jwks", parser=IdPKeyParser(IDP))  # loopback may be plain http

    async def main() -> None:
        response = httpx.Response(200, content=b" " * 2048, headers={"content-type": "application/json"})
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: response)) as client:
            endpoint = JWKSEndpoint(
                "https://idp.example.com/jwks", async_client=client, max_bytes=1024, parser=IdPKeyParser(IDP)
            )
            with pytest.raises(meshauth.KeysUnavailable, match="exceeds 1024"):
                await endpoint.aget_key("rsa-1")

    asyncio.run(main())


def test_verified_user_tokens_are_cached_until_expiry_or_key_removal(tmp_path: Path, idp: IdPKeys) -> None:
    clock = FakeClock()
    tokens = Tokens(idp, clock)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(idp.jwks()))
    ticks = [0.0]
    keys = JWKSFile(path, monotonic=lambda: ticks[0], parser=IdPKeyParser(IDP))
    verifier = UserTokenVerifier([IssuerConfig(IDP, str(path), AUDIENCE, ("RS256",))], {IDP: keys}, clock=clock)

    def verify(token: str) -> Any:
        try:
            return asyncio.run(verifier.averify(token))
        except meshauth.TokenError as exc:
            return exc.reason

    token = tokens.user()
    first = verify(token)
    assert verify(token) is first  # answered from the cache
    clock.advance(600 + 30)
    assert verify(token) == "expired"
    fresh = tokens.user()
    assert verify(fresh).subject == "alice"
    # The issuer drops the key: the cached verdict goes with it.
    path.write_text(json.dumps({"keys": [k for k in idp.jwks()["keys"] if k["kid"] != "rsa-1"]}))
    ticks[0] = 5.0
    assert verify(fresh) == "unknown_kid"


# -- edges: raw ASGI, streams that fail, key sets that do not parse --------------------------------


class _Stream(httpx.AsyncByteStream):
    """An upstream body that yields a few chunks, then optionally fails."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    async def __aiter__(self) -> Any:
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk
        if self.error is not None:
            raise self.error


def _streaming(chunks: list[bytes], error: Exception | None = None, headers: Any = None) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers or [], stream=_Stream(chunks, error))

    return httpx.MockTransport(handler)


def _asgi_call(gateway: Gateway, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drive the app directly: ``receive`` hands out ``messages``, then waits forever."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in messages:
            queue.put_nowait(message)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async with gateway:
            await gateway(scope, queue.get, send)

    asyncio.run(main())
    return sent


def _scope(token: str, method: str = "GET", path: str = "/orders/1", extra: Any = ()) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "scheme": "http",
        "client": PEER,
        "headers": [(b"host", b"gateway.test"), (b"authorization", f"Bearer {token}".encode()), *extra],
    }


def test_upstream_failing_mid_stream_drops_the_connection(harness: Harness) -> None:
    transport = _streaming([b"part-1", b"part-2"], httpx.ReadTimeout("slow"), headers=[("content-length", "100")])
    sent = _asgi_call(harness.gateway(transport), _scope(harness.tokens.user()), [])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies] == [b"part-1", b"part-2"]
    # No final message: the server closes the connection instead of ending the body.
    assert all(m.get("more_body") for m in bodies)
    (record,) = harness.audit()
    assert (record["outcome"], record["reason"], record["status"]) == ("error", "upstream_timeout", 200)


def test_client_leaving_an_unsized_stream_stops_it(harness: Harness) -> None:
    transport = _streaming([b"event-%d\n" % i for i in range(50)])
    sent = _asgi_call(harness.gateway(transport), _scope(harness.tokens.user()), [{"type": "http.disconnect"}])
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) < 50
    (record,) = harness.audit()
    assert (record["outcome"], record["reason"]) == ("error", "client_disconnected")


def test_client_leaving_during_the_upload(harness: Harness) -> None:
    scope = _scope(harness.tokens.user(), method="POST", extra=[(b"content-length", b"10")])
    messages = [{"type": "http.request", "body": b"12345", "more_body": True}, {"type": "http.disconnect"}]
    sent = _asgi_call(harness.gateway(), scope, messages)
    assert sent == []
    (record,) = harness.audit()
    assert (record["status"], record["outcome"], record["reason"]) == (499, "error", "client_disconnected")


def test_upstream_error_statuses_pass_through(harness: Harness) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"busy": True}))
    response = harness.get("/orders", harness.tokens.user(), gateway=harness.gateway(transport))
    assert response.status_code == 503 and response.json() == {"busy": True}
    (record,) = harness.audit()
    assert (record["outcome"], record["status"]) == ("accepted", 503)


def test_startup_failure_is_reported_through_lifespan(harness: Harness, tmp_path: Path) -> None:
    import dataclasses

    config = dataclasses.replace(harness.config, audit_log=str(tmp_path / "gone" / "audit.jsonl"))
    gateway = create_app(config)
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        queue.put_nowait({"type": "lifespan.startup"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await gateway({"type": "lifespan"}, queue.get, send)

    asyncio.run(main())
    assert sent[0]["type"] == "lifespan.startup.failed" and "FileNotFoundError" in sent[0]["message"]


def test_url_registry_uses_jwks_endpoint(harness: Harness) -> None:
    import dataclasses

    from meshauth.gateway._sources import open_registry

    keys = open_registry("http://127.0.0.1:9/jwks.json")
    assert type(keys).__name__ == "JWKSEndpoint"
    config = dataclasses.replace(harness.config, registry="http://127.0.0.1:9/jwks.json")
    gateway = create_app(config, configure_audit=False)
    ready, document = gateway.readiness()
    assert not ready and document["registry"] is False


@pytest.mark.parametrize(
    ("jwk", "problem"),
    [
        ("not a key", "not a JSON object"),
        ({"kty": "RSA"}, "'kid' must be a non-empty string"),
        ({"kty": "RSA", "kid": "k", "d": "x"}, "private key members"),
        ({"kty": "RSA", "kid": "k", "use": "enc"}, "not a signing key"),
        ({"kty": "RSA", "kid": "k", "key_ops": ["encrypt"]}, "does not allow 'verify'"),
        ({"kty": "oct", "kid": "k"}, "unsupported key type"),
        ({"kty": "RSA", "kid": "k", "alg": "HS256"}, "does not fit key type RSA"),
        ({"kty": "RSA", "kid": "k", "n": 5, "e": "AQAB"}, "'n' must be a base64url string"),
        ({"kty": "RSA", "kid": "k", "n": "a+b", "e": "AQAB"}, "'n' is not base64url"),
        ({"kty": "EC", "kid": "k", "crv": "P-384", "x": "AA", "y": "AA"}, "P-256"),
        ({"kty": "EC", "kid": "k", "crv": "P-256", "x": "AA", "y": "AA"}, "32 bytes"),
        ({"kty": "EC", "kid": "k", "crv": "P-256", "x": b64(b"\x01" * 32), "y": b64(b"\x01" * 32)}, "not a valid EC"),
        ({"kty": "OKP", "kid": "k", "crv": "X25519", "x": "AA"}, "Ed25519"),
        ({"kty": "OKP", "kid": "k", "crv": "Ed25519", "x": "AAAA"}, "not a valid OKP"),
    ],
)
def test_bad_idp_keys_are_described(jwk: Any, problem: str) -> None:
    with pytest.raises(meshauth.ConfigurationError, match=problem):
        parse_idp_jwk(jwk, "idp: keys[0]", issuer=IDP)


def test_idp_documents_that_are_not_key_sets() -> None:
    for document in ("{", "[]", '{"keys": {}}', b"\xff"):
        with pytest.raises(meshauth.ConfigurationError, match="idp"):
            idp_keys(document, source="idp")


# -- the hostile-token suite through the gateway, over HTTP -----------------------------------------

_KIDS = {"RS256": "rsa-1", "PS256": "rsa-ps", "ES256": "ec-1"}


def _signer(idp: IdPKeys, alg: str) -> Callable[[bytes], bytes]:
    if alg == "ES256":

        def sign_es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(idp.ec.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign_es256
    pad = padding.PKCS1v15() if alg == "RS256" else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return lambda data: idp.rsa.sign(data, pad, hashes.SHA256())


def _hostile_http_tokens(t: Tokens, alg: str) -> dict[str, tuple[str, str]]:
    sign = _signer(t.idp, alg)
    header = {"alg": alg, "kid": _KIDS[alg], "typ": "JWT"}
    claims = t.claims()

    def token(head: dict[str, Any] = header, body: dict[str, Any] = claims, *, raw_payload: str | None = None) -> str:
        signing_input = f"{b64(json.dumps(head).encode())}.{raw_payload or b64(json.dumps(body).encode())}"
        return f"{signing_input}.{b64(sign(signing_input.encode()))}"

    swapped = {"RS256": "PS256", "PS256": "RS256", "ES256": "RS256"}[alg]
    swap_input = f"{b64(json.dumps({**header, 'alg': swapped}).encode())}.{b64(json.dumps(claims).encode())}"
    now = int(t.clock())
    return {
        "alg none": (
            f"{b64(json.dumps({**header, 'alg': 'none'}).encode())}.{b64(json.dumps(claims).encode())}.",
            "unsupported_alg",
        ),
        "hs256 with the public key": (t.hs256_with_public_key(), "unsupported_alg"),
        "alg swapped on the same key": (
            f"{swap_input}.{b64(_signer(t.idp, swapped)(swap_input.encode()))}",
            "unsupported_alg",
        ),
        "jku": (token({**header, "jku": "https://attacker.example/keys"}), "malformed"),
        "jwk": (token({**header, "jwk": {"kty": "oct", "k": "c2VjcmV0"}}), "malformed"),
        "x5u": (token({**header, "x5u": "https://attacker.example/cert"}), "malformed"),
        "x5c": (token({**header, "x5c": ["MIIB"]}), "malformed"),
        "crit": (token({**header, "crit": ["exp"]}), "malformed"),
        "kid unknown": (token({**header, "kid": "rsa-2"}), "unknown_kid"),
        "kid traversal": (token({**header, "kid": "../idp-jwks.json"}), "unknown_kid"),
        "kid a number": (token({**header, "kid": 7}), "malformed"),
        "no kid, several keys": (token({"alg": alg, "typ": "JWT"}), "unknown_kid"),
        "duplicate claim": (
            token(raw_payload=b64(json.dumps(claims)[:-1].encode() + b', "sub": "mallory"}')),
            "malformed",
        ),
        "non-canonical base64url": (token(raw_payload=b64(json.dumps(claims).encode()) + "="), "malformed"),
        "exp a string": (token(body={**claims, "exp": "never"}), "invalid_claim"),
        "expired": (token(body={**claims, "iat": now - 700, "exp": now - 100}), "expired"),
        "oversized": (token(body={**claims, "padding": "x" * 17000}), "too_large"),
    }


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_hostile_user_tokens_over_http(harness: Harness, alg: str) -> None:
    bad = _hostile_http_tokens(harness.tokens, alg)
    hinted = harness.tokens.raw({"alg": alg, "kid": _KIDS[alg], "x5t": "aGludA"}, harness.tokens.claims())
    sign = _signer(harness.tokens.idp, alg)
    signing_input = hinted.rsplit(".", 1)[0]
    hinted = f"{signing_input}.{b64(sign(signing_input.encode()))}"

    async def scenario(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        answers = {
            name: await client.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
            for name, (token, _) in bad.items()
        }
        answers["x5t"] = await client.get("/orders/1", headers={"Authorization": f"Bearer {hinted}"})
        return answers

    responses = harness.run(scenario)
    assert responses.pop("x5t").status_code == 200  # an IdP's certificate hint is allowed and ignored
    assert len(harness.upstream.seen) == 1  # nothing else reached the upstream
    for name, (token, reason) in bad.items():
        response = responses[name]
        assert (response.status_code, response.json()) == (401, {"error": "invalid_token", "reason": reason}), name
        assert_no_token_leak(response.text, token)
