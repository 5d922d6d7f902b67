"""The hostile-token suite over every token profile of the engine.

The same attacks run against service tokens (:class:`meshauth.Verifier`),
response tokens (:class:`meshauth.ResponseVerifier`), Transaction Tokens (beside a
service token bound to them) and end users' IdP tokens
(``UserTokenVerifier``, with RS256, PS256 and ES256 keys), through both the
sync and the async driver where the profile has both. Every token is built
here, byte by byte, and signed with the real private key, so a refusal is the
profile's rule and not a broken signature.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import meshauth
from meshauth import IdPKeyParser, StaticKeys
from meshauth.gateway import IssuerConfig, UserTokenVerifier
from meshauth.testing import FakeClock, Mesh

IDP = "https://login.example.com"
API = "api://orders"
NONCE = "n0nce-for-this-request-0001"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode(value: Any) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def rsa_signer(key: rsa.RSAPrivateKey, alg: str) -> Callable[[bytes], bytes]:
    pad = padding.PKCS1v15() if alg == "RS256" else _PSS
    return lambda data: key.sign(data, pad, hashes.SHA256())


def ec_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


@dataclasses.dataclass
class Target:
    """One profile under attack: a good header and payload, its signer, and how to verify."""

    name: str
    header: dict[str, Any]
    claims: dict[str, Any]
    sign: Callable[[bytes], bytes]
    verifiers: list[Callable[[str], Any]]
    public_pem: bytes
    alg: str
    swapped_alg: str  # another algorithm the same key material could be asked for
    sign_swapped: Callable[[bytes], bytes]
    limit: int
    idp: bool = False

    def token(self, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None, **changes: Any) -> str:
        head = dict(self.header if header is None else header)
        body = {**(self.claims if claims is None else claims), **changes}
        body = {name: value for name, value in body.items() if value is not _DROP}
        signing_input = f"{encode(head)}.{encode(body)}"
        return f"{signing_input}.{b64(self.sign(signing_input.encode()))}"

    def raw(self, header_segment: str, payload_segment: str, signer: Callable[[bytes], bytes] | None = None) -> str:
        signing_input = f"{header_segment}.{payload_segment}"
        return f"{signing_input}.{b64((signer or self.sign)(signing_input.encode()))}"


_DROP = object()


def outcome(verify: Callable[[str], Any], token: str) -> str:
    """``accepted`` or the refusal's reason; anything but a meshauth error fails the test."""
    error: meshauth.MeshAuthError | None = None
    try:
        verify(token)
    except meshauth.MeshAuthError as exc:
        error = exc
    if error is None:
        return "accepted"
    assert isinstance(error, meshauth.TokenError | meshauth.ResponseAuthError), repr(error)
    signature = token.rsplit(".", maxsplit=1)[-1]
    assert token not in str(error) and (len(signature) < 8 or signature not in str(error))
    return error.reason


def _service(clock: FakeClock) -> Target:
    mesh = Mesh(["orders", "payments"], clock=clock)
    key = mesh.signing_keys["orders"]
    now = int(clock())
    verifier = mesh.verifier("payments", cache_size=0)
    other = meshauth.SigningKey.generate("EdDSA")
    return Target(
        name="service",
        header={"alg": "ES256", "kid": key.kid, "typ": "meshauth+jwt"},
        claims={"iss": "orders", "sub": "orders", "aud": "payments", "iat": now, "exp": now + 300, "jti": "j" * 22},
        sign=key.sign,
        verifiers=[verifier.verify, lambda t: asyncio.run(verifier.averify(t))],
        public_pem=key.public_jwk(iss="orders")["x"].encode(),
        alg="ES256",
        swapped_alg="EdDSA",
        sign_swapped=other.sign,
        limit=8192,
    )


def _transaction(clock: FakeClock) -> Target:
    """The Txn-Token profile, verified as it arrives: beside a service token of orders bound to it (tth)."""
    mesh = Mesh(["orders", "payments", "gateway"], clock=clock)
    key = mesh.signing_keys["gateway"]
    orders = mesh.identity("orders")
    now = int(clock())
    verifier = mesh.verifier("payments", cache_size=0)
    other = meshauth.SigningKey.generate("EdDSA")

    def verify(token: str) -> Any:
        return verifier.verify(orders.mint("payments", txn_token=token), token)

    async def averify(token: str) -> Any:
        return await verifier.averify(orders.mint("payments", txn_token=token), token)

    return Target(
        name="transaction",
        header={"alg": "ES256", "kid": key.kid, "typ": "txntoken+jwt"},
        claims={
            "iss": "gateway",
            "aud": "meshauth",
            "iat": now,
            "exp": now + 300,
            "txn": "t" * 22,
            "sub": "alice",
            "scope": "orders:read",
            "req_wl": "gateway",
            "tctx": {"groups": ["staff"]},
        },
        sign=key.sign,
        verifiers=[verify, lambda t: asyncio.run(averify(t))],
        public_pem=key.public_jwk(iss="gateway")["x"].encode(),
        alg="ES256",
        swapped_alg="EdDSA",
        sign_swapped=other.sign,
        limit=8192,
    )


def _response(clock: FakeClock) -> Target:
    mesh = Mesh(["orders", "payments"], clock=clock)
    key = mesh.signing_keys["payments"]
    now = int(clock())
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=clock)
    other = meshauth.SigningKey.generate("EdDSA")

    def verify(token: str) -> Any:
        return checker.verify_response(token, service="payments", nonce=NONCE)

    def averify(token: str) -> Any:
        fresh = meshauth.ResponseVerifier("orders", mesh.keys, clock=clock)  # accepted once per verifier
        return asyncio.run(fresh.averify_response(token, service="payments", nonce=NONCE))

    return Target(
        name="response",
        header={"alg": "ES256", "kid": key.kid, "typ": "meshauth-response+jwt"},
        claims={
            "iss": "payments",
            "sub": "payments",
            "aud": "orders",
            "iat": now,
            "exp": now + 30,
            "jti": "r" * 22,
            "nonce": NONCE,
            "status": 200,
        },
        sign=key.sign,
        verifiers=[averify, verify],  # the sync one last: it remembers accepted tokens
        public_pem=key.public_jwk(iss="payments")["x"].encode(),
        alg="ES256",
        swapped_alg="EdDSA",
        sign_swapped=other.sign,
        limit=8192,
    )


def _idp(clock: FakeClock, alg: str) -> Target:
    now = int(clock())
    if alg == "ES256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
        numbers = private.public_key().public_numbers()
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.x.to_bytes(32, "big")),
            "y": b64(numbers.y.to_bytes(32, "big")),
        }
        sign, swapped, sign_swapped = ec_signer(private), "RS256", rsa_signer(_RSA, "RS256")
    else:
        private = _RSA
        numbers = private.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(numbers.n.to_bytes(256, "big")), "e": b64(numbers.e.to_bytes(3, "big"))}
        swapped = "PS256" if alg == "RS256" else "RS256"
        sign, sign_swapped = rsa_signer(private, alg), rsa_signer(private, swapped)
    jwk.update({"kid": "k1", "alg": alg, "use": "sig"})
    keys = StaticKeys.from_jwks({"keys": [jwk]}, source="idp", parser=IdPKeyParser(IDP, (alg, swapped)))
    config = IssuerConfig(IDP, "unused", API, (alg, swapped))
    verifier = UserTokenVerifier([config], {IDP: keys}, clock=clock, cache_size=0)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Target(
        name=f"idp-{alg}",
        header={"alg": alg, "kid": "k1", "typ": "JWT"},
        claims={"iss": IDP, "sub": "alice", "aud": API, "iat": now, "exp": now + 600, "scope": "orders:read"},
        sign=sign,
        verifiers=[lambda t: asyncio.run(verifier.averify(t)), verifier.run],
        public_pem=pem,
        alg=alg,
        swapped_alg=swapped,
        sign_swapped=sign_swapped,
        limit=16384,
        idp=True,
    )


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PROFILES = ["service", "response", "transaction", "idp-RS256", "idp-PS256", "idp-ES256"]


@pytest.fixture(params=PROFILES)
def target(request: pytest.FixtureRequest) -> Target:
    clock = FakeClock()
    name: str = request.param
    if name == "service":
        return _service(clock)
    if name == "response":
        return _response(clock)
    if name == "transaction":
        return _transaction(clock)
    return _idp(clock, name.split("-")[1])


def _hs256(t: Target) -> str:
    header = {**t.header, "alg": "HS256"}
    signing_input = f"{encode(header)}.{encode(t.claims)}"
    return f"{signing_input}.{b64(hmac.new(t.public_pem, signing_input.encode(), hashlib.sha256).digest())}"


def _non_canonical(t: Target) -> str:
    payload = encode(t.claims)
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(payload[-1])
    if len(payload) % 4 in (2, 3):  # flip an unused low bit: same bytes, another string
        payload = payload[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
    else:
        payload += "="
    return t.raw(encode(t.header), payload)


def _swap_payload(t: Target) -> str:
    header, _, signature = t.token().split(".")
    return f"{header}.{encode({**t.claims, 'sub': 'mallory'})}.{signature}"


# Each attack: (name, build(target) -> token, expected reason; "accepted" for the control cases).
ATTACKS: list[tuple[str, Callable[[Target], str], str]] = [
    ("control", lambda t: t.token(), "accepted"),
    ("alg-none", lambda t: f"{encode({**t.header, 'alg': 'none'})}.{encode(t.claims)}.", "unsupported_alg"),
    ("alg-None-signed", lambda t: t.token({**t.header, "alg": "None"}), "unsupported_alg"),
    ("hs256-public-key-as-secret", _hs256, "unsupported_alg"),
    (
        "alg-swap-same-key-material",
        lambda t: t.raw(encode({**t.header, "alg": t.swapped_alg}), encode(t.claims), t.sign_swapped),
        "unsupported_alg",
    ),
    ("alg-lowercase", lambda t: t.token({**t.header, "alg": t.alg.lower()}), "unsupported_alg"),
    ("jku", lambda t: t.token({**t.header, "jku": "https://attacker.example/jwks"}), "malformed"),
    ("jwk", lambda t: t.token({**t.header, "jwk": {"kty": "oct", "k": "AAAA"}}), "malformed"),
    ("x5u", lambda t: t.token({**t.header, "x5u": "https://attacker.example/cert"}), "malformed"),
    ("x5c", lambda t: t.token({**t.header, "x5c": ["MIIB"]}), "malformed"),
    ("crit", lambda t: t.token({**t.header, "crit": ["exp"], "exp": 1}), "malformed"),
    ("kid-unknown", lambda t: t.token({**t.header, "kid": "nope"}), "unknown_kid"),
    ("kid-traversal", lambda t: t.token({**t.header, "kid": "../../etc/passwd"}), "unknown_kid"),
    ("kid-number", lambda t: t.token({**t.header, "kid": 1}), "malformed"),
    ("kid-too-long", lambda t: t.token({**t.header, "kid": "k" * 300}), "malformed"),
    (
        "duplicate-header-member",
        lambda t: t.raw(b64(json.dumps(t.header)[:-1].encode() + b', "alg": "none"}'), encode(t.claims)),
        "malformed",
    ),
    (
        "duplicate-claim",
        lambda t: t.raw(encode(t.header), b64(json.dumps(t.claims)[:-1].encode() + b', "sub": "mallory"}')),
        "malformed",
    ),
    ("non-canonical-base64url", _non_canonical, "malformed"),
    ("four-segments", lambda t: t.token() + ".x", "malformed"),
    (
        "nan-date",
        lambda t: t.raw(encode(t.header), b64(json.dumps(t.claims)[:-1].encode() + b', "nbf": NaN}')),
        "malformed",
    ),
    ("exp-string", lambda t: t.token(exp="tomorrow"), "invalid_claim"),
    ("exp-bool", lambda t: t.token(exp=True), "invalid_claim"),
    ("exp-huge", lambda t: t.token(exp=2**60), "invalid_claim"),
    ("expired", lambda t: t.token(iat=t.claims["iat"] - 3020, exp=t.claims["iat"] - 3000), "expired"),
    (
        "issued-in-the-future",
        lambda t: t.token(iat=t.claims["iat"] + 3600, exp=t.claims["iat"] + 3630),
        "not_yet_valid",
    ),
    ("oversized", lambda t: t.token(padding="x" * t.limit), "too_large"),
    ("tampered", lambda t: t.token()[:-8] + ("A" * 8 if not t.token().endswith("A" * 8) else "B" * 8), "bad_signature"),
    ("sub-swapped-after-signing", _swap_payload, "bad_signature"),
]


@pytest.mark.parametrize(("attack", "build", "expected"), ATTACKS, ids=[name for name, _, _ in ATTACKS])
def test_hostile_tokens_on_every_profile(
    target: Target, attack: str, build: Callable[[Target], str], expected: str
) -> None:
    token = build(target)
    for verify in target.verifiers:
        assert outcome(verify, token) == expected, f"{target.name}: {attack}"


def test_certificate_hints_are_ignored_for_identity_providers_only(target: Target) -> None:
    # Entra ID v1 puts x5t beside kid; only the IdP profile accepts (and ignores) it.
    hinted = {**target.header, "x5t": "bm90LWEtdGh1bWJwcmludA", "x5t#S256": "bm90LWEtdGh1bWJwcmludA"}
    expected = "accepted" if target.idp else "malformed"
    for verify in target.verifiers:
        assert outcome(verify, target.token(hinted)) == expected


def test_token_kinds_never_cross(target: Target) -> None:
    # A service token is not a response token or a Txn-Token, and none is a user token (nor the reverse).
    for typ in ("meshauth+jwt", "meshauth-response+jwt", "txntoken+jwt", "JWT", "at+jwt"):
        token = target.token({**target.header, "typ": typ})
        own = (
            typ.lower() in {t for t in (target.header["typ"].lower(), "jwt", "at+jwt")}
            if target.idp
            else typ == target.header["typ"]
        )
        for verify in target.verifiers:
            assert outcome(verify, token) == ("accepted" if own else "wrong_type"), (target.name, typ)


def test_a_missing_kid_needs_a_one_key_set(target: Target) -> None:
    header = {name: value for name, value in target.header.items() if name != "kid"}
    # The IdP key sets here hold one key: accepted there; meshauth tokens always need kid.
    expected = "accepted" if target.idp else "malformed"
    for verify in target.verifiers:
        assert outcome(verify, target.token(header)) == expected
