"""Adversarial tests for the verifier, from RFC 8725 and the known JWT CVEs.

Every hostile token is built by hand (header and payload JSON encoded here,
base64url without padding) and, unless the signature itself is under test,
signed with the registered key, so that each case isolates one rule of the
token profile (DESIGN section 2). Each rejection is checked for its exact
``reason`` and class, through ``verify`` and ``averify``, and for secrets:
neither the exception, nor the audit record, nor the span may contain the
token or any excerpt of one of its segments.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meshauth
from meshauth import (
    BadSignature,
    InvalidClaim,
    IssuerMismatch,
    KeyExpired,
    KeysUnavailable,
    LifetimeTooLong,
    MalformedToken,
    MemoryReplayCache,
    MissingClaim,
    Principal,
    ResponseAuthError,
    ResponseVerifier,
    SigningKey,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    TokenTooLarge,
    UnknownKey,
    UnsupportedAlgorithm,
    Verifier,
    WrongAudience,
    WrongTokenType,
)
from meshauth.testing import FakeClock, MemoryKeys, Mesh

# P-256 group order and Ed25519 group order, for signature malleability cases.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_L = 2**252 + 27742317777372353535851937790883648493
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
REASON_CLASS: dict[str, type[TokenError]] = {
    "too_large": TokenTooLarge,
    "malformed": MalformedToken,
    "wrong_type": WrongTokenType,
    "unsupported_alg": UnsupportedAlgorithm,
    "unknown_kid": UnknownKey,
    "key_expired": KeyExpired,
    "bad_signature": BadSignature,
    "missing_claim": MissingClaim,
    "invalid_claim": InvalidClaim,
    "issuer_mismatch": IssuerMismatch,
    "wrong_audience": WrongAudience,
    "expired": TokenExpired,
    "not_yet_valid": TokenNotYetValid,
    "lifetime_too_long": LifetimeTooLong,
    "replayed": TokenReplayed,
}
ACCEPT = "accept"
DROP: Any = object()  # a claims()/header() override that removes the member


# -- building hostile tokens -----------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def lenient_b64decode(segment: str) -> bytes:
    """What a careless decoder sees: padding added, unused trailing bits ignored."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def nested(depth: int, leaf: Any = 1) -> Any:
    """A JSON value of exactly ``depth`` nested objects (depth 0 is the leaf)."""
    value = leaf
    for _ in range(depth):
        value = {"n": value}
    return value


def json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


def noncanonical(segment: str) -> str:
    """The same bytes as ``segment`` for a lenient decoder, with non-zero unused bits."""
    assert len(segment) % 4 in (2, 3), "only a partial final quantum has unused bits"
    twin = segment[:-1] + B64_ALPHABET[B64_ALPHABET.index(segment[-1]) | 1]
    assert twin != segment
    assert lenient_b64decode(twin) == lenient_b64decode(segment)
    return twin


def noncanonical_signature(token: str) -> str:
    head, signature = token.rsplit(".", 1)
    return f"{head}.{noncanonical(signature)}"


def splice(text: str, at: int, insert: str, *, drop: int = 0) -> str:
    """``text`` with ``insert`` placed at index ``at`` (replacing ``drop`` characters)."""
    at = at % len(text)
    return text[:at] + insert + text[at + drop :]


def ecdsa_parts(signature: bytes) -> tuple[int, int]:
    return int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")


def ecdsa_raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclasses.dataclass
class World:
    """A small mesh on a fake clock, with a verifier for ``payments`` under attack."""

    mesh: Mesh
    clock: FakeClock
    verifier: Verifier
    spans: InMemorySpanExporter

    @property
    def now(self) -> int:
        return int(self.clock())

    def key(self, service: str = "orders") -> SigningKey:
        return self.mesh.signing_keys[service]

    def header(self, signer: str = "orders", **members: Any) -> dict[str, Any]:
        key = self.key(signer)
        header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "meshauth+jwt"}
        return _apply(header, members)

    def claims(self, **members: Any) -> dict[str, Any]:
        now = self.now
        claims: dict[str, Any] = {
            "iss": "orders",
            "sub": "orders",
            "aud": "payments",
            "iat": now,
            "exp": now + 300,
            "jti": "jti-" + hashlib.sha256(repr(members).encode()).hexdigest()[:24],
        }
        return _apply(claims, members)

    def delegated(self, **members: Any) -> dict[str, Any]:
        """orders calling for alice after the gateway (DESIGN section 2 example)."""
        base = {"sub": "alice", "act": {"sub": "orders", "act": {"sub": "gateway"}}}
        return self.claims(**{**base, **members})

    def token(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        *,
        raw_header: bytes | None = None,
        raw_payload: bytes | None = None,
        signer: str = "orders",
    ) -> str:
        """A compact JWS whose signature is valid for ``signer``'s key."""
        header_seg = b64(raw_header if raw_header is not None else enc(header or self.header(signer)))
        payload_seg = b64(raw_payload if raw_payload is not None else enc(claims or self.claims()))
        return self.sign(f"{header_seg}.{payload_seg}", signer)

    def sign(self, signing_input: str, signer: str = "orders") -> str:
        return f"{signing_input}.{b64(self.key(signer).sign(signing_input.encode('utf-8')))}"

    def with_signature(self, token: str, signature: bytes) -> str:
        return token.rsplit(".", 1)[0] + "." + b64(signature)

    def signature(self, token: str) -> bytes:
        return lenient_b64decode(token.rsplit(".", 1)[1])


def _apply(base: dict[str, Any], members: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for name, value in members.items():
        if value is DROP:
            result.pop(name, None)
        else:
            result[name] = value
    return result


@pytest.fixture
def world(caplog: pytest.LogCaptureFixture) -> Iterator[World]:
    caplog.set_level(logging.INFO, logger="meshauth.audit")
    clock = FakeClock()
    mesh = Mesh(["orders", "payments", "gateway", "billing"], clock=clock)
    mesh.add_service("ledger", alg="EdDSA")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    verifier = Verifier("payments", mesh.keys, clock=clock, tracer_provider=provider)
    yield World(mesh, clock, verifier, exporter)
    provider.shutdown()


# -- checking rejections -----------------------------------------------------------------


LEAK_WINDOW = 24  # characters of a token segment that count as a leak


def secret_parts(token: Any) -> list[str]:
    """The segments of ``token`` no excerpt of which may appear in an error, log or span."""
    if isinstance(token, bytes | bytearray):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            return []
    if not isinstance(token, str):
        return []
    return [segment for segment in token.split(".") if len(segment) >= LEAK_WINDOW]


def _windows(text: str) -> set[str]:
    return {text[i : i + LEAK_WINDOW] for i in range(len(text) - LEAK_WINDOW + 1)}


def assert_no_leak(token: Any, *texts: Any) -> None:
    """No run of LEAK_WINDOW characters of any token segment appears in ``texts``.

    Checking excerpts rather than whole segments also catches a truncated
    token (``token[:64]``) in a message.
    """
    parts = secret_parts(token)
    if not parts:
        return
    secret = set().union(*(_windows(part) for part in parts))
    for text in texts:
        rendered = text if isinstance(text, str) else repr(text)
        assert not secret.intersection(_windows(rendered)), "a token excerpt leaked into an error, log or span"


def assert_error_has_no_secret(token: Any, exc: BaseException) -> None:
    assert isinstance(exc, meshauth.MeshAuthError)
    assert_no_leak(token, str(exc), repr(exc), exc.detail, exc.expected, exc.actual, str(exc.expected), str(exc.actual))


def assert_telemetry_has_no_secret(world: World, token: Any, caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        if record.name == "meshauth.audit":
            assert_no_leak(token, record.getMessage(), getattr(record, "meshauth", None))
    for span in world.spans.get_finished_spans():
        assert_no_leak(token, dict(span.attributes or {}), span.status.description or "")


def verify_both(verifier: Verifier, token: Any) -> tuple[Principal | BaseException, Principal | BaseException]:
    """The outcome of ``verify`` and of ``averify`` on the same token."""

    def outcome(call: Callable[[], Principal]) -> Principal | BaseException:
        try:
            return call()
        except Exception as exc:  # the test inspects whatever escaped, of any class
            return exc

    sync = outcome(lambda: verifier.verify(token))
    async_ = outcome(lambda: asyncio.run(verifier.averify(token)))
    return sync, async_


def assert_rejected(
    world: World,
    caplog: pytest.LogCaptureFixture,
    token: Any,
    reason: str,
    *,
    verifier: Verifier | None = None,
    defect_ok: bool = False,
) -> TokenError:
    """Both verify paths reject ``token`` with exactly ``reason``, leaking nothing.

    ``defect_ok`` tolerates the verifier's catch-all ("could not be processed"),
    which otherwise means an internal exception was masked as ``malformed``.
    """
    results = verify_both(verifier or world.verifier, token)
    for result in results:
        assert isinstance(result, TokenError), f"expected a TokenError ({reason}), got {result!r}"
        assert result.reason == reason, f"expected {reason}, got {result.reason}: {result.detail}"
        assert type(result) is REASON_CLASS[reason]
        if not defect_ok:
            assert "could not be processed" not in result.detail, f"internal defect masked: {result.detail}"
        assert_error_has_no_secret(token, result)
    assert_telemetry_has_no_secret(world, token, caplog)
    error = results[0]
    assert isinstance(error, TokenError)
    return error


def assert_accepted(world: World, token: Any, *, verifier: Verifier | None = None) -> Principal:
    results = verify_both(verifier or world.verifier, token)
    for result in results:
        assert isinstance(result, Principal), f"expected acceptance, got {result!r}"
    principal = results[0]
    assert isinstance(principal, Principal)
    return principal


def check(world: World, caplog: pytest.LogCaptureFixture, token: Any, expected: str) -> None:
    if expected == ACCEPT:
        assert_accepted(world, token)
    else:
        assert_rejected(world, caplog, token, expected)


Case = Callable[[World], Any]


def cases(*rows: tuple[str, Case, str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("build", "expected"), [pytest.param(b, e, id=i) for i, b, e in rows])


# -- algorithms (RFC 8725 section 2.1, 3.1; CVE-2015-9235, CVE-2022-29217) -------------


def _hs256(world: World, secret: bytes) -> str:
    header = b64(enc(world.header(alg="HS256")))
    payload = b64(enc(world.claims()))
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def _public_pem(world: World) -> bytes:
    return world.key().public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@cases(
    ("none-with-signature", lambda w: w.token(w.header(alg="none")), "unsupported_alg"),
    ("None-capitalised", lambda w: w.token(w.header(alg="None")), "unsupported_alg"),
    ("hs256-public-pem-as-secret", lambda w: _hs256(w, _public_pem(w)), "unsupported_alg"),
    ("hs256-public-jwk-as-secret", lambda w: _hs256(w, enc(w.key().public_jwk(iss="orders"))), "unsupported_alg"),
    ("rs256", lambda w: w.token(w.header(alg="RS256")), "unsupported_alg"),
    ("ps256", lambda w: w.token(w.header(alg="PS256")), "unsupported_alg"),
    ("es384", lambda w: w.token(w.header(alg="ES384")), "unsupported_alg"),
    ("es512", lambda w: w.token(w.header(alg="ES512")), "unsupported_alg"),
    ("es256k", lambda w: w.token(w.header(alg="ES256K")), "unsupported_alg"),
    # RFC 9864's fully specified name is not (yet) part of the profile.
    ("ed25519-rfc9864-name", lambda w: w.token(w.header("ledger", alg="Ed25519"), signer="ledger"), "unsupported_alg"),
    ("eddsa-header-es256-key", lambda w: w.token(w.header(alg="EdDSA")), "unsupported_alg"),
    ("es256-header-eddsa-key", lambda w: w.token(w.header("ledger", alg="ES256"), signer="ledger"), "unsupported_alg"),
    ("lowercase-es256", lambda w: w.token(w.header(alg="es256")), "unsupported_alg"),
    ("mixedcase-Es256", lambda w: w.token(w.header(alg="Es256")), "unsupported_alg"),
    ("uppercase-EDDSA", lambda w: w.token(w.header("ledger", alg="EDDSA"), signer="ledger"), "unsupported_alg"),
    ("lowercase-eddsa", lambda w: w.token(w.header("ledger", alg="eddsa"), signer="ledger"), "unsupported_alg"),
    ("es256-trailing-space", lambda w: w.token(w.header(alg="ES256 ")), "unsupported_alg"),
    ("es256-trailing-nul", lambda w: w.token(w.header(alg="ES256\x00")), "unsupported_alg"),
    ("alg-missing", lambda w: w.token(w.header(alg=DROP)), "malformed"),
    ("alg-empty", lambda w: w.token(w.header(alg="")), "malformed"),
    ("alg-null", lambda w: w.token(w.header(alg=None)), "malformed"),
    ("alg-list", lambda w: w.token(w.header(alg=["ES256"])), "malformed"),
    ("alg-int", lambda w: w.token(w.header(alg=256)), "malformed"),
)
def test_algorithm_attacks(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_alg_none_with_empty_signature_is_rejected(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # The classic "alg":"none" token ends in a dot. Every profile reads the
    # header first and names the real problem: the algorithm. An empty
    # signature under an allowed algorithm is a syntax error.
    token = f"{b64(enc(world.header(alg='none')))}.{b64(enc(world.claims()))}."
    assert_rejected(world, caplog, token, "unsupported_alg")
    unsigned = f"{b64(enc(world.header()))}.{b64(enc(world.claims()))}."
    assert_rejected(world, caplog, unsigned, "malformed")


def test_registered_algorithms_are_accepted(world: World) -> None:
    assert assert_accepted(world, world.token()).alg == "ES256"
    ledger = world.token(world.header("ledger"), world.claims(iss="ledger", sub="ledger"), signer="ledger")
    assert assert_accepted(world, ledger).alg == "EdDSA"


# -- forbidden header members (RFC 8725 section 3.10; key injection CVEs) ----------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """Refuse and record any socket connection or DNS lookup; mock httpx with respx.

    Yields a function returning every attempt so far (sockets and httpx
    requests), so that a request swallowed by the verifier's fail-closed
    handler is still seen.
    """
    attempts: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(name)
            raise OSError("network disabled in this test")

        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        router.route(host="attacker.example").mock(return_value=httpx.Response(200, json={"keys": []}))
        yield lambda: attempts + [str(call.request.url) for call in router.calls]


def test_the_network_guard_sees_requests(no_network: Callable[[], list[str]]) -> None:
    httpx.get("https://attacker.example/jwks.json")
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("127.0.0.1", 9))
    assert no_network() == ["create_connection", "https://attacker.example/jwks.json"]


def _attacker_jwk_token(world: World, *, claim_kid: str | None = None) -> str:
    attacker = SigningKey.generate("ES256")
    jwk = attacker.public_jwk(iss="orders")
    header = {"alg": "ES256", "kid": claim_kid or attacker.kid, "typ": "meshauth+jwt", "jwk": jwk}
    signing_input = f"{b64(enc(header))}.{b64(enc(world.claims()))}"
    return f"{signing_input}.{b64(attacker.sign(signing_input.encode()))}"


@cases(
    ("jwk-attacker-key", _attacker_jwk_token, "malformed"),
    ("jwk-attacker-key-legit-kid", lambda w: _attacker_jwk_token(w, claim_kid=w.key().kid), "malformed"),
    ("jwk-own-key", lambda w: w.token(w.header(jwk=w.key().public_jwk(iss="orders"))), "malformed"),
    ("jku", lambda w: w.token(w.header(jku="https://attacker.example/jwks.json")), "malformed"),
    ("x5u", lambda w: w.token(w.header(x5u="https://attacker.example/cert.pem")), "malformed"),
    ("x5c", lambda w: w.token(w.header(x5c=["MIIBszCCAVmgAwIBAgIU"])), "malformed"),
    ("x5t", lambda w: w.token(w.header(x5t=b64(b"\x00" * 20))), "malformed"),
    ("x5t#S256", lambda w: w.token(w.header(**{"x5t#S256": b64(b"\x00" * 32)})), "malformed"),
    ("crit", lambda w: w.token(w.header(crit=["exp"], exp=1)), "malformed"),
    ("crit-empty", lambda w: w.token(w.header(crit=[])), "malformed"),
    ("b64-false", lambda w: w.token(w.header(b64=False, crit=["b64"])), "malformed"),
    ("b64-false-alone", lambda w: w.token(w.header(b64=False)), "malformed"),
    ("b64-true", lambda w: w.token(w.header(b64=True)), "malformed"),
    ("zip", lambda w: w.token(w.header(zip="DEF")), "malformed"),
    ("cty", lambda w: w.token(w.header(cty="JWT")), "malformed"),
    ("enc", lambda w: w.token(w.header(enc="A256GCM")), "malformed"),
    ("jku-null", lambda w: w.token(w.header(jku=None)), "malformed"),
)
def test_forbidden_header_members(
    world: World, caplog: pytest.LogCaptureFixture, no_network: Callable[[], list[str]], build: Case, expected: str
) -> None:
    check(world, caplog, build(world), expected)
    assert no_network() == []


@pytest.mark.parametrize("member", ["Jku", "JWK", "X5U", "unknown", "kid2", "nonce"])
def test_unknown_header_members_are_ignored_and_never_used(
    world: World, no_network: Callable[[], list[str]], member: str
) -> None:
    # Member names are case-sensitive (RFC 7515 section 4): "Jku" is not "jku",
    # so it is an unknown member, ignored; the verifier must still not fetch it.
    token = world.token(world.header(**{member: "https://attacker.example/jwks.json"}))
    assert assert_accepted(world, token).caller == "orders"
    assert no_network() == []


# -- kid tricks ----------------------------------------------------------------------------


@cases(
    ("unknown-kid", lambda w: w.token(w.header(kid=SigningKey.generate().kid)), "unknown_kid"),
    ("path-traversal", lambda w: w.token(w.header(kid="../../dev/null")), "unknown_kid"),
    ("path-absolute", lambda w: w.token(w.header(kid="/etc/passwd")), "unknown_kid"),
    ("sql-injection", lambda w: w.token(w.header(kid="x' OR '1'='1' --")), "unknown_kid"),
    ("nul-byte", lambda w: w.token(w.header(kid=w.key().kid + "\x00")), "unknown_kid"),
    ("lone-surrogate", lambda w: w.token(w.header(kid="\ud800")), "unknown_kid"),
    ("unicode-lookalike", lambda w: w.token(w.header(kid="\u0391" + w.key().kid[1:])), "unknown_kid"),
    ("kid-prefix", lambda w: w.token(w.header(kid=w.key().kid[:-1])), "unknown_kid"),
    ("kid-256-chars", lambda w: w.token(w.header(kid="k" * 256)), "unknown_kid"),
    # Over 256 characters the verifier refuses the header outright.
    ("kid-257-chars", lambda w: w.token(w.header(kid="k" * 257)), "malformed"),
    ("kid-4000-chars", lambda w: w.token(w.header(kid="k" * 4000)), "malformed"),
    ("kid-empty", lambda w: w.token(w.header(kid="")), "malformed"),
    ("kid-missing", lambda w: w.token(w.header(kid=DROP)), "malformed"),
    ("kid-int", lambda w: w.token(w.header(kid=1)), "malformed"),
    ("kid-list", lambda w: w.token(w.header(kid=[w.key().kid])), "malformed"),
    ("kid-null", lambda w: w.token(w.header(kid=None)), "malformed"),
    ("kid-object", lambda w: w.token(w.header(kid={"kid": w.key().kid})), "malformed"),
    ("kid-bool", lambda w: w.token(w.header(kid=True)), "malformed"),
    # payments' own key, a valid signature, but iss claims to be orders.
    ("other-services-key", lambda w: w.token(w.header("payments"), w.claims(), signer="payments"), "issuer_mismatch"),
    (
        "other-services-key-delegated",
        lambda w: w.token(w.header("gateway"), w.delegated(), signer="gateway"),
        "issuer_mismatch",
    ),
    # orders' kid, but the signature is by payments' key.
    ("kid-of-one-key-signed-by-another", lambda w: w.token(w.header("orders"), signer="payments"), "bad_signature"),
)
def test_kid_tricks(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        pytest.param({"not_before": 100}, "key_expired", id="not-yet-valid-key"),
        pytest.param({"not_before": 31}, "key_expired", id="not-yet-valid-key-just-beyond-leeway"),
        pytest.param({"not_before": 30}, ACCEPT, id="not-yet-valid-key-within-leeway"),
        pytest.param({"expires": -100}, "key_expired", id="expired-key"),
        pytest.param({"expires": -31}, "key_expired", id="expired-key-just-beyond-leeway"),
        pytest.param({"expires": -30}, ACCEPT, id="expired-key-within-leeway"),
        pytest.param({"not_before": -100, "expires": 100}, ACCEPT, id="inside-window"),
    ],
)
def test_key_outside_its_validity_window(
    world: World, caplog: pytest.LogCaptureFixture, window: dict[str, int], expected: str
) -> None:
    keys = MemoryKeys()
    keys.add_key(world.key(), "orders", **{name: world.now + delta for name, delta in window.items()})
    verifier = Verifier("payments", keys, clock=world.clock)
    token = world.token()
    if expected == ACCEPT:
        assert_accepted(world, token, verifier=verifier)
    else:
        assert_rejected(world, caplog, token, expected, verifier=verifier)


# -- typ ---------------------------------------------------------------------------------------


@cases(
    ("typ-missing", lambda w: w.token(w.header(typ=DROP)), "wrong_type"),
    ("typ-JWT", lambda w: w.token(w.header(typ="JWT")), "wrong_type"),
    ("typ-at+jwt", lambda w: w.token(w.header(typ="at+jwt")), "wrong_type"),
    ("typ-response-on-service-verifier", lambda w: w.token(w.header(typ="meshauth-response+jwt")), "wrong_type"),
    ("typ-empty", lambda w: w.token(w.header(typ="")), "wrong_type"),
    ("typ-null", lambda w: w.token(w.header(typ=None)), "wrong_type"),
    ("typ-int", lambda w: w.token(w.header(typ=1)), "wrong_type"),
    ("typ-list", lambda w: w.token(w.header(typ=["meshauth+jwt"])), "wrong_type"),
    ("typ-trailing-space", lambda w: w.token(w.header(typ="meshauth+jwt ")), "wrong_type"),
    ("typ-double-prefix", lambda w: w.token(w.header(typ="application/application/meshauth+jwt")), "wrong_type"),
    ("typ-other-prefix", lambda w: w.token(w.header(typ="text/meshauth+jwt")), "wrong_type"),
    ("typ-params", lambda w: w.token(w.header(typ="meshauth+jwt; charset=utf-8")), "wrong_type"),
    ("typ-plain", lambda w: w.token(w.header(typ="meshauth+jwt")), ACCEPT),
    ("typ-application-prefix", lambda w: w.token(w.header(typ="application/meshauth+jwt")), ACCEPT),
    ("typ-upper", lambda w: w.token(w.header(typ="MESHAUTH+JWT")), ACCEPT),
    ("typ-mixed-prefix", lambda w: w.token(w.header(typ="Application/MeshAuth+JWT")), ACCEPT),
)
def test_typ_header(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_service_token_is_never_a_response_token(world: World) -> None:
    checker = ResponseVerifier("orders", world.mesh.keys, clock=world.clock)
    service_token = world.mesh.identity("payments").mint("orders")
    with pytest.raises(ResponseAuthError) as info:
        checker.verify_response(service_token, service="payments", nonce="n-1")
    assert info.value.reason == "wrong_type"
    assert_error_has_no_secret(service_token, info.value)
    with pytest.raises(ResponseAuthError) as ainfo:
        asyncio.run(checker.averify_response(service_token, service="payments", nonce="n-1"))
    assert ainfo.value.reason == "wrong_type"


def test_response_token_is_never_a_service_token(world: World, caplog: pytest.LogCaptureFixture) -> None:
    response = world.mesh.identity("orders").mint_response("payments", "n-1")
    assert_rejected(world, caplog, response, "wrong_type")
    checker = ResponseVerifier("payments", world.mesh.keys, clock=world.clock)
    assert checker.verify_response(response, service="orders", nonce="n-1").caller == "orders"


@pytest.mark.parametrize("typ", ["meshauth-response+jwt", "application/meshauth-response+jwt", "MESHAUTH-RESPONSE+JWT"])
def test_response_typ_variants_are_accepted(world: World, typ: str) -> None:
    claims = world.claims(aud="orders", exp=world.now + 30, nonce="n-1", status=200)
    token = world.token(world.header(typ=typ), claims)
    checker = ResponseVerifier("orders", world.mesh.keys, clock=world.clock)
    assert checker.verify_response(token, service="orders", nonce="n-1").caller == "orders"


# -- encoding: base64url and JSON ----------------------------------------------------------------


def _raw_payload(world: World, text: str) -> str:
    return world.token(raw_payload=text.encode("utf-8"))


def _claims_json(world: World, **members: Any) -> str:
    return json.dumps(world.claims(**members), separators=(",", ":"))


def _replace_last(text: str, old: str, new: str) -> str:
    head, _, tail = text.rpartition(old)
    return head + new + tail


def _dup_payload(world: World) -> str:
    text = _claims_json(world)
    return _raw_payload(world, text[:-1] + ',"aud":"billing"}')


def _header_json(world: World, **members: Any) -> str:
    return json.dumps(world.header(**members), separators=(",", ":"))


@cases(
    (
        "header-dup-alg-es256-then-none",
        lambda w: w.token(raw_header=('{"alg":"ES256","alg":"none",' + _header_json(w)[1:]).encode()),
        "malformed",
    ),
    (
        "header-dup-alg-none-then-es256",
        lambda w: w.token(raw_header=('{"alg":"none",' + _header_json(w)[1:]).encode()),
        "malformed",
    ),
    ("header-dup-kid", lambda w: w.token(raw_header=('{"kid":"x",' + _header_json(w)[1:]).encode()), "malformed"),
    (
        "header-dup-escaped-name",
        lambda w: w.token(raw_header=('{"\\u0061lg":"none",' + _header_json(w)[1:]).encode()),
        "malformed",
    ),
    ("payload-dup-aud", _dup_payload, "malformed"),
    ("payload-dup-iss", lambda w: _raw_payload(w, '{"iss":"billing",' + _claims_json(w)[1:]), "malformed"),
    (
        "payload-dup-in-act",
        lambda w: _raw_payload(w, _claims_json(w, sub="alice")[:-1] + ',"act":{"sub":"orders","sub":"gateway"}}'),
        "malformed",
    ),
    ("payload-nan", lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":NaN}'), "malformed"),
    ("payload-infinity", lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":Infinity}'), "malformed"),
    ("payload-minus-infinity", lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":-Infinity}'), "malformed"),
    (
        "payload-exp-nan",
        lambda w: _raw_payload(w, _replace_last(_claims_json(w), str(w.now + 300), "NaN")),
        "malformed",
    ),
    ("header-nan", lambda w: w.token(raw_header=(_header_json(w)[:-1] + ',"x":NaN}').encode()), "malformed"),
    # 1e400 is valid JSON (no NaN literal) that a float parser turns into inf.
    (
        "payload-exp-1e400",
        lambda w: _raw_payload(w, _replace_last(_claims_json(w), str(w.now + 300), "1e400")),
        "invalid_claim",
    ),
    ("payload-array", lambda w: _raw_payload(w, "[" + _claims_json(w) + "]"), "malformed"),
    ("payload-string", lambda w: _raw_payload(w, '"orders"'), "malformed"),
    ("payload-number", lambda w: _raw_payload(w, "1"), "malformed"),
    ("payload-true", lambda w: _raw_payload(w, "true"), "malformed"),
    ("payload-null", lambda w: _raw_payload(w, "null"), "malformed"),
    ("payload-empty-object", lambda w: _raw_payload(w, "{}"), "missing_claim"),
    ("header-array", lambda w: w.token(raw_header=b"[" + _header_json(w).encode() + b"]"), "malformed"),
    ("header-string", lambda w: w.token(raw_header=b'"ES256"'), "malformed"),
    ("header-empty-object", lambda w: w.token(raw_header=b"{}"), "malformed"),
    ("payload-trailing-garbage", lambda w: _raw_payload(w, _claims_json(w) + "x"), "malformed"),
    ("payload-two-objects", lambda w: _raw_payload(w, _claims_json(w) + "{}"), "malformed"),
    ("payload-trailing-nul", lambda w: _raw_payload(w, _claims_json(w) + "\x00"), "malformed"),
    ("header-trailing-garbage", lambda w: w.token(raw_header=(_header_json(w) + "]").encode()), "malformed"),
    ("payload-truncated", lambda w: _raw_payload(w, _claims_json(w)[:-1]), "malformed"),
    (
        "payload-raw-control-char",
        lambda w: _raw_payload(w, _claims_json(w, jti="a\x01b").replace("\\u0001", "\x01")),
        "malformed",
    ),
    ("payload-single-quotes", lambda w: _raw_payload(w, _claims_json(w).replace('"', "'")), "malformed"),
    ("payload-comment", lambda w: _raw_payload(w, "/**/" + _claims_json(w)), "malformed"),
    ("payload-utf8-bom", lambda w: w.token(raw_payload=b"\xef\xbb\xbf" + _claims_json(w).encode()), "malformed"),
    ("header-utf8-bom", lambda w: w.token(raw_header=b"\xef\xbb\xbf" + _header_json(w).encode()), "malformed"),
    ("payload-utf16-le", lambda w: w.token(raw_payload=_claims_json(w).encode("utf-16-le")), "malformed"),
    ("payload-utf16-be", lambda w: w.token(raw_payload=_claims_json(w).encode("utf-16-be")), "malformed"),
    ("payload-utf16-bom", lambda w: w.token(raw_payload=_claims_json(w).encode("utf-16")), "malformed"),
    ("payload-utf32", lambda w: w.token(raw_payload=_claims_json(w).encode("utf-32")), "malformed"),
    ("header-utf16", lambda w: w.token(raw_header=_header_json(w).encode("utf-16")), "malformed"),
    (
        "payload-invalid-utf8-byte",
        lambda w: w.token(raw_payload=_claims_json(w).encode()[:-1] + b',"x":"\xff"}'),
        "malformed",
    ),
    (
        "payload-overlong-utf8",
        lambda w: w.token(raw_payload=_claims_json(w).encode()[:-1] + b',"x":"\xc0\xaf"}'),
        "malformed",
    ),
    (
        "payload-cesu-surrogate",
        lambda w: w.token(raw_payload=_claims_json(w).encode()[:-1] + b',"x":"\xed\xa0\x80"}'),
        "malformed",
    ),
    (
        "payload-latin1",
        lambda w: w.token(raw_payload=json.dumps(w.claims(name="jos\xe9"), ensure_ascii=False).encode("latin-1")),
        "malformed",
    ),
    ("header-invalid-utf8", lambda w: w.token(raw_header=_header_json(w).encode()[:-1] + b',"x":"\xff"}'), "malformed"),
    (
        "payload-huge-integer-5000-digits",
        lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":' + "9" * 5000 + "}"),
        "malformed",
    ),
    (
        "header-huge-integer-5000-digits",
        lambda w: w.token(raw_header=(_header_json(w)[:-1] + ',"x":' + "9" * 5000 + "}").encode()),
        "malformed",
    ),
    # Within the int-parsing limit: parsed, then refused as a NumericDate.
    (
        "payload-exp-4000-digits",
        lambda w: _raw_payload(w, _replace_last(_claims_json(w), str(w.now + 300), "9" * 4000)),
        "invalid_claim",
    ),
    # Insignificant whitespace is valid JSON (RFC 8259), e.g. json.dumps defaults.
    ("payload-insignificant-whitespace", lambda w: _raw_payload(w, json.dumps(w.claims(), indent=1)), ACCEPT),
    ("header-insignificant-whitespace", lambda w: w.token(raw_header=json.dumps(w.header()).encode()), ACCEPT),
)
def test_json_encoding_attacks(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def _depth_payload(world: World, depth: int) -> dict[str, Any]:
    # The claims object is level 1, so the custom claim holds depth - 1 levels.
    claims = world.claims(custom=nested(depth - 1))
    assert json_depth(claims) == depth
    return claims


def _depth_header(world: World, depth: int) -> dict[str, Any]:
    header = world.header(custom=nested(depth - 1))
    assert json_depth(header) == depth
    return header


@cases(
    ("payload-depth-16", lambda w: w.token(claims=_depth_payload(w, 16)), ACCEPT),
    ("payload-depth-17", lambda w: w.token(claims=_depth_payload(w, 17)), "malformed"),
    ("header-depth-16", lambda w: w.token(_depth_header(w, 16)), ACCEPT),
    ("header-depth-17", lambda w: w.token(_depth_header(w, 17)), "malformed"),
    (
        "payload-arrays-depth-17",
        lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":' + "[" * 16 + "]" * 16 + "}"),
        "malformed",
    ),
    (
        "payload-arrays-depth-16",
        lambda w: _raw_payload(w, _claims_json(w)[:-1] + ',"x":' + "[" * 15 + "]" * 15 + "}"),
        ACCEPT,
    ),
    # Braces inside strings are not nesting.
    ("payload-braces-in-strings", lambda w: w.token(claims=w.claims(x="{[" * 100)), ACCEPT),
)
def test_nesting_depth(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


@pytest.mark.parametrize("where", ["header", "payload"])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_5000_levels_of_nesting_fail_closed(
    world: World, caplog: pytest.LogCaptureFixture, where: str, opener: str
) -> None:
    closer = "]" if opener == "[" else "}"
    deep = (opener * 5000 + "1" + closer * 5000).encode()
    verifier = Verifier("payments", world.mesh.keys, clock=world.clock, max_token_bytes=1 << 16)
    token = world.token(raw_header=deep) if where == "header" else world.token(raw_payload=deep)
    assert_rejected(world, caplog, token, "malformed", verifier=verifier)
    # With the default limit the same token is simply too large.
    assert_rejected(world, caplog, token, "too_large")


def _segment_with_partial_quantum(world: World, which: str) -> str:
    """A valid token whose header or payload segment length is 2 mod 4."""
    for pad in range(3):
        if which == "header":
            header = world.header(pad="p" * pad)
            if len(enc(header)) % 3 == 1:
                return world.token(header)
        else:
            claims = world.claims(pad="p" * pad)
            if len(enc(claims)) % 3 == 1:
                return world.token(claims=claims)
    raise AssertionError("unreachable: one of three lengths is 1 mod 3")


def test_noncanonical_base64_is_rejected(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # A lenient decoder maps both strings to the same bytes: one signature would
    # stand for several token strings (verified-cache and replay-cache bypass).
    token = world.token()
    assert len(token.rsplit(".", 1)[1]) % 4 == 2  # 64 bytes -> 86 characters, 4 unused bits
    assert_accepted(world, token)
    assert_rejected(world, caplog, noncanonical_signature(token), "malformed")
    for which, index in (("header", 0), ("payload", 1)):
        valid = _segment_with_partial_quantum(world, which)
        assert_accepted(world, valid)
        segments = valid.split(".")
        segments[index] = noncanonical(segments[index])
        assert_rejected(world, caplog, ".".join(segments), "malformed")


def _token_with_urlsafe_chars(world: World) -> str:
    # ES256 signatures are random: sign until one holds a '-' or '_'.
    for _ in range(200):
        token = world.token()
        if "-" in token or "_" in token:
            return token
    raise AssertionError("no token with '-' or '_' in 200 signatures")


@cases(
    ("padding-one", lambda w: w.token() + "=", "malformed"),
    ("padding-two", lambda w: w.token() + "==", "malformed"),
    ("padding-in-header", lambda w: w.token().replace(".", "=.", 1), "malformed"),
    ("standard-alphabet", lambda w: _token_with_urlsafe_chars(w).replace("-", "+").replace("_", "/"), "malformed"),
    ("space-inside", lambda w: splice(w.token(), 20, " "), "malformed"),
    ("leading-space", lambda w: " " + w.token(), "malformed"),
    ("trailing-newline", lambda w: w.token() + "\n", "malformed"),
    ("crlf-between-segments", lambda w: w.token().replace(".", ".\r\n", 1), "malformed"),
    ("tab-inside", lambda w: splice(w.token(), -5, "\t"), "malformed"),
    ("bearer-prefix", lambda w: "Bearer " + w.token(), "malformed"),
    (
        "segment-length-1-mod-4",
        lambda w: w.token().replace(".", "A.", 1),
        "malformed",
    ),
    ("non-ascii-letter", lambda w: splice(w.token(), 30, "\xe9", drop=1), "malformed"),
    ("fullwidth-letter", lambda w: splice(w.token(), 30, "\uff21", drop=1), "malformed"),
    ("arabic-indic-digit", lambda w: splice(w.token(), 30, "\u0663", drop=1), "malformed"),
    ("zero-width-space", lambda w: splice(w.token(), 30, "\u200b"), "malformed"),
    ("emoji", lambda w: w.token() + "\U0001f600", "malformed"),
    ("lone-surrogate", lambda w: w.token() + "\ud800", "malformed"),
)
def test_base64url_syntax(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


# -- structure and size ----------------------------------------------------------------------


def _sized_token(world: World, length: int) -> str:
    """A validly signed token of exactly ``length`` characters."""
    for header_pad in range(4):
        header = world.header(pad="p" * header_pad)
        base = len(world.token(header, world.claims(filler="")))
        # base64 turns 3 bytes into 4 characters; start just below the target.
        for filler in range(max(0, (length - base) * 3 // 4 - 4), length):
            token = world.token(header, world.claims(filler="f" * filler))
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError(f"cannot build a token of {length} characters")


@cases(
    ("empty-string", lambda w: "", "malformed"),
    ("two-segments", lambda w: w.token().rsplit(".", 1)[0], "malformed"),
    ("four-segments", lambda w: w.token() + "." + b64(b"extra"), "malformed"),
    ("five-segments-jwe-like", lambda w: ".".join(b64(bytes([i]) * 16) for i in range(5)), "malformed"),
    (
        "five-segments-jwe-header",
        lambda w: b64(enc({"alg": "dir", "enc": "A256GCM", "kid": w.key().kid})) + ".." + "AAAA.AAAA.AAAA",
        "malformed",
    ),
    ("only-dots", lambda w: "..", "malformed"),
    ("empty-header", lambda w: "." + w.token().split(".", 1)[1], "malformed"),
    ("empty-payload", lambda w: ".".join(w.token().split(".")[::2]).replace(".", "..", 1), "malformed"),
    ("empty-signature", lambda w: w.token().rsplit(".", 1)[0] + ".", "malformed"),
    ("8000-dots", lambda w: "." * 8000, "malformed"),
    ("one-segment", lambda w: w.token().replace(".", ""), "malformed"),
    ("exactly-8192-chars-valid", lambda w: _sized_token(w, 8192), ACCEPT),
    ("8193-chars-validly-signed", lambda w: _sized_token(w, 8193), "too_large"),
    ("8193-chars-garbage", lambda w: "A" * 8193, "too_large"),
    ("oversized-and-malformed", lambda w: "!! not base64 ..." * 1000, "too_large"),
    ("oversized-non-ascii", lambda w: "\xe9" * 9000, "too_large"),
    ("oversized-dots", lambda w: "." * 10_000, "too_large"),
)
def test_structure_and_size(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_10000_dots_within_a_larger_limit(world: World, caplog: pytest.LogCaptureFixture) -> None:
    verifier = Verifier("payments", world.mesh.keys, clock=world.clock, max_token_bytes=1 << 16)
    assert_rejected(world, caplog, "." * 10_000, "malformed", verifier=verifier)
    assert_rejected(world, caplog, ("A" * 10 + ".") * 900, "malformed", verifier=verifier)


def test_size_limit_is_checked_before_everything_else(world: World, caplog: pytest.LogCaptureFixture) -> None:
    verifier = Verifier("payments", world.mesh.keys, clock=world.clock, max_token_bytes=100)
    # A header with a forbidden member, alg none, an unknown kid: still too_large first.
    hostile = world.token(world.header(alg="none", kid="nope", jku="https://attacker.example/"))
    assert len(hostile) > 100
    assert_rejected(world, caplog, hostile, "too_large", verifier=verifier)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
        pytest.param(1.5, id="float"),
        pytest.param(object(), id="object"),
    ],
)
def test_non_string_inputs_are_malformed(world: World, caplog: pytest.LogCaptureFixture, value: Any) -> None:
    assert_rejected(world, caplog, value, "malformed")


@pytest.mark.parametrize("value", [pytest.param([], id="list"), pytest.param({}, id="dict")])
def test_unhashable_inputs_are_malformed(world: World, caplog: pytest.LogCaptureFixture, value: Any) -> None:
    # The verified-token cache is consulted before the type check, so these go
    # through the fail-closed catch-all; the outcome is still 'malformed'.
    assert_rejected(world, caplog, value, "malformed", defect_ok=True)


def test_bytes_of_a_valid_token_are_accepted(world: World, caplog: pytest.LogCaptureFixture) -> None:
    token = world.token()
    assert assert_accepted(world, token.encode("ascii")).caller == "orders"
    assert_rejected(world, caplog, b"A" * 8193, "too_large")
    assert_rejected(world, caplog, token.encode("ascii")[:-2] + b"\xc3\xa9", "malformed")


def test_memoryview_is_not_a_token(world: World, caplog: pytest.LogCaptureFixture) -> None:
    assert_rejected(world, caplog, memoryview(world.token().encode("ascii")), "malformed")


# The input type is checked and normalised before the verified-token cache is
# consulted (the token string is its key).


def test_bytearray_of_a_valid_token_is_accepted_like_bytes(world: World) -> None:
    # _parse() accepts bytes | bytearray on purpose, but _remember() then uses
    # the bytearray as a dict key: TypeError, masked as 'malformed'.
    token = world.token()
    assert assert_accepted(world, bytearray(token.encode("ascii"))).caller == "orders"


def test_bytearray_over_the_limit_is_too_large(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # Reported as 'malformed: token could not be processed (TypeError)'.
    assert_rejected(world, caplog, bytearray(b"A" * 8193), "too_large")


def test_memoryview_is_rejected_even_after_the_same_bytes_verified(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # memoryview(b) hashes and compares equal to b, so once the bytes token is
    # cached, a memoryview is accepted from the cache; on a cold cache it is
    # 'malformed: token must be a string'. The outcome depends on cache state.
    data = world.token().encode("ascii")
    world.verifier.verify(data)  # type: ignore[arg-type]  # bytes are accepted on purpose
    assert_rejected(world, caplog, memoryview(data), "malformed")


# -- signatures ------------------------------------------------------------------------------


def _flip_bit(world: World, token: str, byte: int) -> str:
    signature = bytearray(world.signature(token))
    signature[byte] ^= 0x01
    return world.with_signature(token, bytes(signature))


def _der_signature(world: World) -> str:
    token = world.token()
    r, s = ecdsa_parts(world.signature(token))
    return world.with_signature(token, encode_dss_signature(r, s))


def _ecdsa(world: World, r: int, s: int) -> str:
    return world.with_signature(world.token(), ecdsa_raw(r, s))


def _ledger_token(world: World) -> str:
    return world.token(world.header("ledger"), world.claims(iss="ledger", sub="ledger"), signer="ledger")


@cases(
    ("flipped-bit-first-byte", lambda w: _flip_bit(w, w.token(), 0), "bad_signature"),
    ("flipped-bit-last-byte", lambda w: _flip_bit(w, w.token(), 63), "bad_signature"),
    ("signature-by-another-key", lambda w: w.token(w.header("orders"), signer="billing"), "bad_signature"),
    ("signature-63-bytes", lambda w: w.with_signature(w.token(), w.signature(w.token())[:63]), "bad_signature"),
    ("signature-65-bytes", lambda w: w.with_signature(w.token(), w.signature(w.token()) + b"\x00"), "bad_signature"),
    ("signature-1-byte", lambda w: w.with_signature(w.token(), b"\x00"), "bad_signature"),
    ("signature-128-bytes", lambda w: w.with_signature(w.token(), w.signature(w.token()) * 2), "bad_signature"),
    ("signature-der-encoded", _der_signature, "bad_signature"),
    ("signature-zero", lambda w: w.with_signature(w.token(), bytes(64)), "bad_signature"),
    ("ecdsa-r0-s0", lambda w: _ecdsa(w, 0, 0), "bad_signature"),
    ("ecdsa-r1-s1", lambda w: _ecdsa(w, 1, 1), "bad_signature"),
    ("ecdsa-r-equals-n", lambda w: _ecdsa(w, P256_N, ecdsa_parts(w.signature(w.token()))[1]), "bad_signature"),
    ("ecdsa-s-equals-n", lambda w: _ecdsa(w, ecdsa_parts(w.signature(w.token()))[0], P256_N), "bad_signature"),
    ("ecdsa-all-ones", lambda w: w.with_signature(w.token(), b"\xff" * 64), "bad_signature"),
    (
        "signature-of-other-payload",
        lambda w: w.with_signature(w.token(), w.signature(w.token(claims=w.claims(aud="billing")))),
        "bad_signature",
    ),
    ("eddsa-flipped-bit", lambda w: _flip_bit(w, _ledger_token(w), 10), "bad_signature"),
    ("eddsa-zero", lambda w: w.with_signature(_ledger_token(w), bytes(64)), "bad_signature"),
    (
        "eddsa-63-bytes",
        lambda w: w.with_signature(_ledger_token(w), w.signature(_ledger_token(w))[:63]),
        "bad_signature",
    ),
)
def test_signature_attacks(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_eddsa_signature_is_not_malleable(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # RFC 8032 requires S < L; S + L encodes the "same" scalar and must fail.
    token = _ledger_token(world)
    assert_accepted(world, token)
    signature = world.signature(token)
    s = int.from_bytes(signature[32:], "little")
    assert s + ED25519_L < 2**256
    malleated = world.with_signature(token, signature[:32] + (s + ED25519_L).to_bytes(32, "little"))
    assert_rejected(world, caplog, malleated, "bad_signature")


def test_ecdsa_high_s_twin_verifies_but_cannot_be_replayed(world: World) -> None:
    """ECDSA signatures are malleable: (r, n - s) verifies as well as (r, s).

    meshauth accepts both (DESIGN does not require low-S, and rejecting high-S
    would refuse about half of the tokens other JOSE libraries mint). What
    matters is that the twin is a different token string and that the replay
    cache, keyed on iss + jti rather than the token string, rejects it.
    """
    token = world.token()
    r, s = ecdsa_parts(world.signature(token))
    twin = world.with_signature(token, ecdsa_raw(r, P256_N - s))
    assert twin != token
    assert assert_accepted(world, token).token_id == assert_accepted(world, twin).token_id

    replay = Verifier("payments", world.mesh.keys, clock=world.clock, replay_cache=MemoryReplayCache(clock=world.clock))
    assert replay.verify(token).caller == "orders"
    with pytest.raises(TokenReplayed):
        replay.verify(twin)
    replay_first_twin = Verifier(
        "payments", world.mesh.keys, clock=world.clock, replay_cache=MemoryReplayCache(clock=world.clock)
    )
    assert asyncio.run(replay_first_twin.averify(twin)).caller == "orders"
    with pytest.raises(TokenReplayed):
        asyncio.run(replay_first_twin.averify(token))


# -- claims ----------------------------------------------------------------------------------------


def _claim_token(**members: Any) -> Case:
    return lambda w: w.token(claims=w.claims(**members))


def _delegated_token(**members: Any) -> Case:
    return lambda w: w.token(claims=w.delegated(**members))


def _timed(**offsets: int | None) -> Case:
    """Claims with NumericDates relative to now (None drops the claim)."""

    def build(world: World) -> str:
        members = {name: DROP if delta is None else world.now + delta for name, delta in offsets.items()}
        return world.token(claims=world.claims(**members))

    return build


@cases(
    *[
        (f"missing-{name}", _claim_token(**{name: DROP}), "missing_claim")
        for name in ("iss", "sub", "aud", "iat", "exp", "jti")
    ],
    ("missing-all", lambda w: w.token(claims={"scope": "a"}), "missing_claim"),
    ("iss-int", _claim_token(iss=1), "invalid_claim"),
    ("iss-empty", _claim_token(iss=""), "invalid_claim"),
    ("iss-null", _claim_token(iss=None), "invalid_claim"),
    ("iss-list", _claim_token(iss=["orders"]), "invalid_claim"),
    ("iss-257-chars", _claim_token(iss="o" * 257), "invalid_claim"),
    ("sub-list", _claim_token(sub=["orders"]), "invalid_claim"),
    ("sub-int", _claim_token(sub=7), "invalid_claim"),
    ("sub-empty", _claim_token(sub=""), "invalid_claim"),
    ("sub-null", _claim_token(sub=None), "invalid_claim"),
    ("aud-int", _claim_token(aud=1), "invalid_claim"),
    ("aud-null", _claim_token(aud=None), "invalid_claim"),
    ("aud-object", _claim_token(aud={"payments": True}), "invalid_claim"),
    ("aud-list-of-two", _claim_token(aud=["payments", "billing"]), "wrong_audience"),
    ("aud-list-same-twice", _claim_token(aud=["payments", "payments"]), "wrong_audience"),
    ("aud-empty-list", _claim_token(aud=[]), "wrong_audience"),
    ("aud-list-with-int", _claim_token(aud=[1]), "invalid_claim"),
    ("aud-list-nested", _claim_token(aud=[["payments"]]), "invalid_claim"),
    ("aud-other-service", _claim_token(aud="billing"), "wrong_audience"),
    ("aud-other-case", _claim_token(aud="Payments"), "wrong_audience"),
    ("aud-one-element-other", _claim_token(aud=["billing"]), "wrong_audience"),
    ("aud-one-element-list", _claim_token(aud=["payments"]), ACCEPT),
    ("jti-empty", _claim_token(jti=""), "invalid_claim"),
    ("jti-257-chars", _claim_token(jti="j" * 257), "invalid_claim"),
    ("jti-256-chars", _claim_token(jti="j" * 256), ACCEPT),
    ("jti-int", _claim_token(jti=12345678901234567890), "invalid_claim"),
    ("jti-null", _claim_token(jti=None), "invalid_claim"),
    ("scope-int", _claim_token(scope=1), "invalid_claim"),
    ("scope-list", _claim_token(scope=["charges:write"]), "invalid_claim"),
    ("scope-empty-string", _claim_token(scope=""), ACCEPT),
    ("scope-string", _claim_token(scope="charges:read charges:write"), ACCEPT),
)
def test_claim_presence_and_types(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


_BAD_DATES: list[tuple[str, Any]] = [
    ("true", True),
    ("false", False),
    ("string", "1800000000"),
    ("float-1.5", 1.5),
    ("null", None),
    ("list", [1800000000]),
    ("negative", -1),
    ("over-2^53", 2**53 + 1),
]


def _date_token(name: str, value: Any) -> Case:
    return lambda w: w.token(claims=w.claims(**{name: value}))


def _float_date_token(name: str) -> Case:
    # json.dumps(float) writes "1800000000.0": a JSON number with a fraction part.
    def build(world: World) -> str:
        claims = world.claims(nbf=world.now) if name == "nbf" else world.claims()
        claims[name] = float(claims[name])
        text = json.dumps(claims, separators=(",", ":"))
        assert f'"{name}":{claims[name]!r}' in text and ".0" in text
        return world.token(raw_payload=text.encode())

    return build


@cases(
    *[
        (f"{name}-{label}", _date_token(name, value), "invalid_claim")
        for name in ("iat", "exp", "nbf")
        for label, value in _BAD_DATES
    ],
    *[(f"{name}-float-1.0", _float_date_token(name), "invalid_claim") for name in ("iat", "exp", "nbf")],
    # 2^53 is a valid NumericDate, rejected later for being in the future.
    ("nbf-2^53", _date_token("nbf", 2**53), "not_yet_valid"),
    ("nbf-zero", _date_token("nbf", 0), ACCEPT),
)
def test_numeric_dates(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


@cases(
    ("exp-before-iat", _timed(iat=0, exp=-1), "invalid_claim"),
    ("lifetime-equals-max", _timed(iat=-600, exp=300), ACCEPT),
    ("lifetime-max-plus-one", _timed(iat=-601, exp=300), "lifetime_too_long"),
    ("lifetime-huge", _timed(iat=-(10**6), exp=300), "lifetime_too_long"),
    ("iat-in-future-beyond-leeway", _timed(iat=31, exp=331), "not_yet_valid"),
    ("iat-in-future-within-leeway", _timed(iat=30, exp=330), ACCEPT),
    ("nbf-in-future-beyond-leeway", _timed(nbf=31), "not_yet_valid"),
    ("nbf-in-future-within-leeway", _timed(nbf=30), ACCEPT),
    ("nbf-in-past", _timed(nbf=-300), ACCEPT),
    ("exp-passed-beyond-leeway", _timed(iat=-400, exp=-30), "expired"),
    ("exp-passed-within-leeway", _timed(iat=-400, exp=-29), ACCEPT),
    ("exp-passed-long-ago", _timed(iat=-(10**6) - 300, exp=-(10**6)), "expired"),
)
def test_time_claims(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_expiry_boundary_with_the_clock(world: World, caplog: pytest.LogCaptureFixture) -> None:
    token = world.token()  # iat = now, exp = now + 300, leeway 30
    world.clock.advance(329)
    assert_accepted(world, token)  # also puts it in the verified cache
    world.clock.advance(1)
    assert_rejected(world, caplog, token, "expired")


@cases(
    ("sub-not-iss-without-act", _claim_token(sub="alice"), "invalid_claim"),
    ("act-with-sub-equal-iss", _claim_token(act={"sub": "orders"}), "invalid_claim"),
    ("act-outermost-not-iss", _delegated_token(act={"sub": "gateway"}), "invalid_claim"),
    (
        "act-outermost-not-iss-deeper",
        _delegated_token(act={"sub": "gateway", "act": {"sub": "orders"}}),
        "invalid_claim",
    ),
    ("act-string", _delegated_token(act="orders"), "invalid_claim"),
    ("act-list", _delegated_token(act=[{"sub": "orders"}]), "invalid_claim"),
    ("act-int", _delegated_token(act=1), "invalid_claim"),
    ("act-false", _delegated_token(act=False), "invalid_claim"),
    ("act-empty-object", _delegated_token(act={}), "invalid_claim"),
    (
        "act-level-without-sub",
        _delegated_token(act={"sub": "orders", "act": {"client_id": "gateway"}}),
        "invalid_claim",
    ),
    ("act-top-without-sub", _delegated_token(act={"act": {"sub": "orders"}}), "invalid_claim"),
    ("act-sub-empty", _delegated_token(act={"sub": "orders", "act": {"sub": ""}}), "invalid_claim"),
    ("act-sub-int", _delegated_token(act={"sub": "orders", "act": {"sub": 1}}), "invalid_claim"),
    ("act-nested-not-object", _delegated_token(act={"sub": "orders", "act": "gateway"}), "invalid_claim"),
    ("act-nested-list", _delegated_token(act={"sub": "orders", "act": [{"sub": "gateway"}]}), "invalid_claim"),
    (
        "act-loop-iss-twice",
        _delegated_token(act={"sub": "orders", "act": {"sub": "gateway", "act": {"sub": "orders"}}}),
        "invalid_claim",
    ),
    (
        "act-loop-adjacent",
        _delegated_token(act={"sub": "orders", "act": {"sub": "gateway", "act": {"sub": "gateway"}}}),
        "invalid_claim",
    ),
    (
        "act-depth-5",
        _delegated_token(
            act={"sub": "orders", "act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c", "act": {"sub": "d"}}}}}
        ),
        "invalid_claim",
    ),
    (
        "act-depth-4",
        _delegated_token(act={"sub": "orders", "act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}}),
        "invalid_claim",
    ),
    # Version 2: a service token never carries a user or an actor chain, however well formed.
    ("act-depth-1", _delegated_token(act={"sub": "orders"}), "invalid_claim"),
    ("iss-not-key-owner", _claim_token(iss="payments", sub="payments"), "issuer_mismatch"),
    ("iss-not-key-owner-delegated", _delegated_token(iss="billing", act={"sub": "billing"}), "issuer_mismatch"),
)
def test_delegation_claims(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


def test_act_null_is_an_invalid_claim(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # parse_actor_chain(None, ...) skips its loop and reads actors[0] of an
    # empty list; the catch-all reports the IndexError as 'malformed'.
    assert_rejected(world, caplog, world.token(claims=world.delegated(act=None)), "invalid_claim")


def test_act_null_fails_closed_meanwhile(world: World) -> None:
    # Whatever the reason code, a token with a null actor chain is never accepted.
    for result in verify_both(world.verifier, world.token(claims=world.delegated(act=None))):
        assert isinstance(result, TokenError)
        assert result.reason in {"malformed", "invalid_claim"}


def test_scope_null_is_an_invalid_claim(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # DESIGN: "scope, when present, is a string"; nbf: null is already rejected.
    assert_rejected(world, caplog, world.token(claims=world.claims(scope=None)), "invalid_claim")


def test_the_version_1_design_example_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # orders acting for alice "via the gateway" by its own assertion: RFC 8693 section 4.1 says nested
    # act is informational, so version 2 refuses any act (users travel in a gateway-issued Txn-Token).
    assert_rejected(world, caplog, world.token(claims=world.delegated()), "invalid_claim")
    with pytest.raises(TypeError):
        world.mesh.identity("orders").mint("payments", subject="alice", actors=("gateway",))  # type: ignore[call-arg]


# -- the order of the checks -------------------------------------------------------------------


def _bad_signature(world: World, token: str) -> str:
    return _flip_bit(world, token, 5)


@cases(
    ("bad-signature-and-expired", lambda w: _bad_signature(w, _timed(iat=-1000, exp=-900)(w)), "bad_signature"),
    ("bad-signature-and-wrong-audience", lambda w: _bad_signature(w, _claim_token(aud="billing")(w)), "bad_signature"),
    (
        "bad-signature-and-everything-wrong",
        lambda w: _bad_signature(w, w.token(claims={"iss": 1, "sub": [], "aud": 2, "exp": "x", "act": 3})),
        "bad_signature",
    ),
    ("bad-signature-and-issuer-mismatch", lambda w: _bad_signature(w, _claim_token(iss="billing")(w)), "bad_signature"),
    ("bad-signature-and-missing-claims", lambda w: _bad_signature(w, w.token(claims={"x": 1})), "bad_signature"),
    ("unknown-kid-and-bad-signature", lambda w: _bad_signature(w, w.token(w.header(kid="nope"))), "unknown_kid"),
    ("alg-mismatch-and-bad-signature", lambda w: _bad_signature(w, w.token(w.header(alg="EdDSA"))), "unsupported_alg"),
    ("disallowed-alg-and-unknown-kid", lambda w: w.token(w.header(alg="HS256", kid="nope")), "unsupported_alg"),
    ("wrong-typ-and-alg-none", lambda w: w.token(w.header(alg="none", typ="JWT")), "wrong_type"),
    (
        "forbidden-header-and-everything-wrong",
        lambda w: _bad_signature(
            w, w.token(w.header(alg="none", kid="nope", typ="JWT", jku="https://attacker.example/"), {"exp": 0})
        ),
        "malformed",
    ),
    (
        "malformed-payload-and-bad-signature",
        lambda w: _bad_signature(w, w.token(raw_payload=b'{"iss":"orders"')),
        "malformed",
    ),
    (
        "noncanonical-signature-and-everything-wrong",
        lambda w: noncanonical_signature(w.token(w.header(kid="nope"), {"exp": 0})),
        "malformed",
    ),
)
def test_check_order(world: World, caplog: pytest.LogCaptureFixture, build: Case, expected: str) -> None:
    check(world, caplog, build(world), expected)


# -- replay -------------------------------------------------------------------------------------


def _replay_verifier(world: World) -> Verifier:
    return Verifier("payments", world.mesh.keys, clock=world.clock, replay_cache=MemoryReplayCache(clock=world.clock))


def test_replay_cache_rejects_the_second_use(world: World, caplog: pytest.LogCaptureFixture) -> None:
    verifier = _replay_verifier(world)
    token = world.mesh.identity("orders").mint("payments")
    assert verifier.verify(token).caller == "orders"
    # The token is now in the verified cache too; that path must not bypass replay.
    error = assert_rejected(world, caplog, token, "replayed", verifier=verifier)
    assert error.kid == world.key().kid


def test_replay_cache_rejects_the_second_use_async(world: World) -> None:
    verifier = _replay_verifier(world)
    token = world.mesh.identity("orders").mint("payments")

    async def twice() -> None:
        await verifier.averify(token)
        with pytest.raises(TokenReplayed):
            await verifier.averify(token)

    asyncio.run(twice())


def test_replay_cache_accepts_distinct_jtis(world: World) -> None:
    verifier = _replay_verifier(world)
    orders = world.mesh.identity("orders")
    tokens = [orders.mint("payments") for _ in range(20)]
    assert len({verifier.verify(token).token_id for token in tokens}) == 20


def test_replay_key_is_issuer_and_jti(world: World, caplog: pytest.LogCaptureFixture) -> None:
    verifier = _replay_verifier(world)
    from_orders = world.token(claims=world.claims(jti="shared-jti"))
    from_billing = world.token(
        world.header("billing"), world.claims(iss="billing", sub="billing", jti="shared-jti"), signer="billing"
    )
    assert verifier.verify(from_orders).caller == "orders"
    assert verifier.verify(from_billing).caller == "billing"
    # A different token string with the same iss + jti is a replay.
    again = world.token(claims=world.claims(jti="shared-jti", scope="other"))
    assert_rejected(world, caplog, again, "replayed", verifier=verifier)


def test_rejected_tokens_do_not_burn_their_jti(world: World) -> None:
    verifier = _replay_verifier(world)
    wrong_audience = world.token(claims=world.claims(jti="once", aud="billing"))
    with pytest.raises(WrongAudience):
        verifier.verify(wrong_audience)
    assert verifier.verify(world.token(claims=world.claims(jti="once"))).token_id == "once"


# -- revocation and the verified-token cache -----------------------------------------------------


def test_revoked_key_stops_a_cached_token(world: World, caplog: pytest.LogCaptureFixture) -> None:
    token = world.token()
    assert_accepted(world, token)
    assert_accepted(world, token)  # served from the verified cache
    world.mesh.keys.revoke(world.key().kid)
    assert_rejected(world, caplog, token, "unknown_kid")
    # Registering the key again (a new record) makes the token good again.
    world.mesh.keys.add_key(world.key(), "orders")
    assert_accepted(world, token)


def test_re_registering_a_key_for_another_owner_stops_a_cached_token(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    token = world.token()
    assert_accepted(world, token)
    world.mesh.keys.add_key(world.key(), "billing")
    assert_rejected(world, caplog, token, "issuer_mismatch")


def test_cached_token_expires_with_the_clock(world: World, caplog: pytest.LogCaptureFixture) -> None:
    token = world.mesh.identity("orders").mint("payments")
    assert_accepted(world, token)
    world.clock.advance(300 + 30)
    assert_rejected(world, caplog, token, "expired")


def test_cached_token_stops_when_its_key_window_ends(world: World, caplog: pytest.LogCaptureFixture) -> None:
    keys = MemoryKeys()
    keys.add_key(world.key(), "orders", expires=world.now + 60)
    verifier = Verifier("payments", keys, clock=world.clock)
    token = world.token()
    assert_accepted(world, token, verifier=verifier)
    world.clock.advance(60 + 31)  # key expired beyond leeway; token itself still valid
    assert_rejected(world, caplog, token, "key_expired", verifier=verifier)


def test_one_caller_cannot_poison_the_cached_claims_of_the_next(world: World) -> None:
    # Principal.claims is a read-only proxy over the parsed payload, but nested
    # objects stay plain dicts/lists and the same Principal is served from the
    # verified cache to the next request carrying the token.
    token = world.token(claims=world.claims(groups=["staff"], ctx={"who": {"sub": "orders"}}))
    first = world.verifier.verify(token)
    with contextlib.suppress(TypeError):  # an immutable view would refuse this: fine
        first.claims["ctx"]["who"]["sub"] = "mallory"
    with contextlib.suppress(TypeError, AttributeError):
        first.claims["groups"].append("admin")
    again = world.verifier.verify(token)
    assert again.claims["ctx"] == {"who": {"sub": "orders"}}
    assert list(again.claims["groups"]) == ["staff"]


class _FlakyKeys(MemoryKeys):
    """A key source that starts failing with a plain exception when told to."""

    failing = False

    def get_key(self, kid: str) -> meshauth.KeyRecord | None:
        if self.failing:
            raise OSError("registry disk unreadable")
        return super().get_key(kid)

    async def aget_key(self, kid: str) -> meshauth.KeyRecord | None:
        return self.get_key(kid)


def test_key_source_failure_on_a_new_token_is_keys_unavailable(world: World) -> None:
    keys = _FlakyKeys()
    keys.add_key(world.key(), "orders")
    keys.failing = True
    verifier = Verifier("payments", keys, clock=world.clock)
    for result in verify_both(verifier, world.token()):
        assert isinstance(result, KeysUnavailable)
        assert not isinstance(result, TokenError)


def test_key_source_failure_on_a_cached_token_is_keys_unavailable(world: World) -> None:
    # The fast path calls keys.get_key() outside _lookup(), so a plain exception
    # from the source reaches the catch-all and becomes MalformedToken: an
    # outage reported as a bad token (DESIGN section 4 forbids that).
    keys = _FlakyKeys()
    keys.add_key(world.key(), "orders")
    verifier = Verifier("payments", keys, clock=world.clock)
    token = world.token()
    verifier.verify(token)
    keys.failing = True
    for result in verify_both(verifier, token):
        assert isinstance(result, KeysUnavailable), repr(result)


# -- secrets in errors: a summary over every reason ----------------------------------------------


def test_every_reason_is_covered_without_leaks(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """One representative per reason code, each checked for leaks in errors, audit and spans."""
    big = world.token(claims=world.claims(filler="f" * 9000))
    replay = _replay_verifier(world)
    replayed = world.token(claims=world.claims(jti="replayed-once"))
    replay.verify(replayed)
    retired = MemoryKeys()
    retired.add_key(world.key(), "orders", expires=world.now - 60)
    expired_key = Verifier("payments", retired, clock=world.clock)
    representatives = {
        "too_large": (big, world.verifier),
        "malformed": (world.token(world.header(jku="https://attacker.example/")), world.verifier),
        "wrong_type": (world.token(world.header(typ="JWT")), world.verifier),
        "unsupported_alg": (world.token(world.header(alg="HS256")), world.verifier),
        "unknown_kid": (world.token(world.header(kid="nope")), world.verifier),
        "key_expired": (world.token(), expired_key),
        "bad_signature": (_bad_signature(world, world.token()), world.verifier),
        "missing_claim": (world.token(claims=world.claims(jti=DROP)), world.verifier),
        "invalid_claim": (world.token(claims=world.claims(iat=1.5)), world.verifier),
        "issuer_mismatch": (world.token(claims=world.claims(iss="billing")), world.verifier),
        "wrong_audience": (world.token(claims=world.claims(aud="billing")), world.verifier),
        "expired": (world.token(claims=world.claims(iat=world.now - 900, exp=world.now - 600)), world.verifier),
        "not_yet_valid": (world.token(claims=world.claims(nbf=world.now + 600)), world.verifier),
        "lifetime_too_long": (world.token(claims=world.claims(exp=world.now + 3600)), world.verifier),
        "replayed": (replayed, replay),
    }
    assert set(representatives) == set(REASON_CLASS)
    for reason, (token, verifier) in representatives.items():
        assert_rejected(world, caplog, token, reason, verifier=verifier)
    # The leak checks above looked at real audit records and spans.
    audited = [r.meshauth["reason"] for r in caplog.records if r.name == "meshauth.audit"]  # type: ignore[attr-defined]
    assert set(REASON_CLASS) <= set(audited)
    reasons_in_spans = {(s.attributes or {}).get("meshauth.reason") for s in world.spans.get_finished_spans()}
    assert set(REASON_CLASS) - {"replayed", "key_expired"} <= reasons_in_spans  # those two: other verifiers


def test_the_leak_check_catches_leaks(world: World) -> None:
    token = world.token()
    header, payload, signature = token.split(".")
    for leaked in (token, header, payload, signature, f"found {signature[:70]}", payload[5:29]):
        with pytest.raises(AssertionError, match="leaked"):
            assert_no_leak(token, f"error: {leaked}")
    with pytest.raises(AssertionError, match="leaked"):
        assert_no_leak(token.encode(), {"detail": payload})
