"""Interoperability with plain JOSE libraries: PyJWT and joserfc.

meshauth tokens are ordinary compact JWS/JWT, and its key registry is an
ordinary JWKS with extra members (``iss``, ``nbf``, ``exp``) that other
libraries ignore (DESIGN sections 2 and 3). These tests check both directions:
tokens minted by meshauth verify with PyJWT and joserfc against the registry
document, and tokens minted by those libraries from a key exported with
``SigningKey.to_pem()`` verify with meshauth.

joserfc warns (``SecurityWarning``) that the ``EdDSA`` algorithm name is
deprecated by RFC 9864 in favour of ``Ed25519``; the profile still mints
``EdDSA`` (DESIGN section 2), so that one warning is silenced where joserfc
handles EdDSA.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning

import meshauth
from meshauth import KeyRecord, ServiceIdentity, SigningKey, StaticKeys, Verifier
from meshauth.testing import FakeClock

ALGS = pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
REQUIRED = ["iss", "sub", "aud", "iat", "exp", "jti"]
KTY: dict[str, Literal["EC", "OKP"]] = {"ES256": "EC", "EdDSA": "OKP"}


@contextlib.contextmanager
def joserfc_eddsa_ok(alg: str) -> Iterator[None]:
    """Silence only joserfc's RFC 9864 deprecation warning for the EdDSA name."""
    with warnings.catch_warnings():
        if alg == "EdDSA":
            warnings.filterwarnings("ignore", message=".*EdDSA.*", category=SecurityWarning)
        yield


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    """An independent RFC 7638 SHA-256 thumbprint (required members, sorted, no spaces)."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def profile_claims(now: int, **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "orders",
        "sub": "orders",
        "aud": "payments",
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_urlsafe(16),
    }
    claims.update(extra)
    return claims


def registry_for(*entries: tuple[SigningKey, str]) -> dict[str, Any]:
    """The JWKS document a mesh would publish, via StaticKeys.to_jwks()."""
    return StaticKeys.from_jwks({"keys": [key.public_jwk(iss=owner) for key, owner in entries]}).to_jwks()


# -- meshauth -> PyJWT / joserfc --------------------------------------------------------------


@ALGS
def test_meshauth_tokens_verify_with_pyjwt(alg: str) -> None:
    key = SigningKey.generate(alg)
    other = SigningKey.generate("ES256")
    doc = registry_for((key, "orders"), (other, "payments"))
    assert all("iss" in entry and entry["use"] == "sig" for entry in doc["keys"])
    # PyJWT checks iat/exp against the real clock: mint at the real time.
    orders = ServiceIdentity("orders", key, clock=FakeClock(time.time()))
    txn = ServiceIdentity("gateway", other, clock=FakeClock(time.time())).issue_txn_token("alice")
    token = orders.mint("payments", scope="charges:write", txn_token=txn)

    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": key.kid, "typ": "meshauth+jwt"}  # nothing else is minted
    jwks = jwt.PyJWKSet.from_dict(doc)
    claims = jwt.decode(
        token,
        jwks[header["kid"]].key,
        algorithms=[alg],
        audience="payments",
        issuer="orders",
        options={"require": REQUIRED},
    )
    assert claims["sub"] == "orders" and "act" not in claims
    assert claims["tth"] == base64.urlsafe_b64encode(hashlib.sha256(txn.encode()).digest()).rstrip(b"=").decode()
    assert claims["scope"] == "charges:write"
    # A single entry through PyJWK, with the extra registry members present.
    single = jwt.PyJWK(key.public_jwk(iss="orders", nbf=0, exp=2**40))
    assert jwt.decode(token, single.key, algorithms=[alg], audience="payments") == claims


@ALGS
def test_meshauth_tokens_verify_with_joserfc(alg: str) -> None:
    key = SigningKey.generate(alg)
    other = SigningKey.generate("EdDSA")
    doc = registry_for((other, "billing"), (key, "orders"))
    clock = FakeClock()
    token = ServiceIdentity("orders", key, clock=clock).mint("payments")

    with joserfc_eddsa_ok(alg):
        keyset = jose_jwk.KeySet.import_key_set(doc)  # type: ignore[arg-type]
        decoded = jose_jwt.decode(token, keyset, algorithms=[alg])
    assert decoded.header == {"alg": alg, "kid": key.kid, "typ": "meshauth+jwt"}
    registry = jose_jwt.JWTClaimsRegistry(
        now=int(clock()),
        iss={"essential": True, "value": "orders"},
        aud={"essential": True, "value": "payments"},
        sub={"essential": True, "value": "orders"},
        jti={"essential": True},
        iat={"essential": True},
        exp={"essential": True},
    )
    registry.validate(decoded.claims)
    assert "act" not in decoded.claims


@ALGS
def test_registry_with_validity_window_members_loads_in_both_libraries(alg: str) -> None:
    key = SigningKey.generate(alg)
    doc = StaticKeys.from_jwks({"keys": [key.public_jwk(iss="orders", nbf=1_700_000_000, exp=1_900_000_000)]}).to_jwks()
    assert {"iss", "nbf", "exp"} <= set(doc["keys"][0])
    token = ServiceIdentity("orders", key, clock=FakeClock(time.time())).token_for("payments")
    assert jwt.decode(token, jwt.PyJWKSet.from_dict(doc)[key.kid].key, algorithms=[alg], audience="payments")
    with joserfc_eddsa_ok(alg):
        assert jose_jwt.decode(token, jose_jwk.KeySet.import_key_set(doc), algorithms=[alg])  # type: ignore[arg-type]


# -- PyJWT / joserfc -> meshauth --------------------------------------------------------------


def _verifier(key: SigningKey, clock: FakeClock, owner: str = "orders") -> Verifier:
    return Verifier("payments", StaticKeys.from_jwks({"keys": [key.public_jwk(iss=owner)]}), clock=clock)


@ALGS
def test_pyjwt_minted_tokens_verify_with_meshauth(alg: str) -> None:
    key = SigningKey.generate(alg)
    pem = key.to_pem()
    clock = FakeClock()
    claims = profile_claims(int(clock()), scope="charges:read charges:write")
    token = jwt.encode(claims, pem, algorithm=alg, headers={"kid": key.kid, "typ": "meshauth+jwt"})
    principal = _verifier(key, clock).verify(token)
    assert (principal.caller, principal.subject, principal.transaction) == ("orders", "orders", None)
    assert principal.scopes == {"charges:read", "charges:write"}
    assert principal.token_id == claims["jti"]
    assert dict(principal.claims) == claims


@ALGS
def test_pyjwt_with_an_encrypted_pem_and_a_one_element_audience(alg: str) -> None:
    key = SigningKey.generate(alg)
    private = serialization.load_pem_private_key(key.to_pem(password="s3cret"), password=b"s3cret")
    clock = FakeClock()
    claims = profile_claims(int(clock()), aud=["payments"])
    token = jwt.encode(claims, private, algorithm=alg, headers={"kid": key.kid, "typ": "meshauth+jwt"})  # type: ignore[arg-type]
    assert _verifier(key, clock).verify(token).audience == "payments"


@ALGS
def test_joserfc_minted_tokens_verify_with_meshauth(alg: str) -> None:
    key = SigningKey.generate(alg)
    clock = FakeClock()
    claims = profile_claims(int(clock()))
    with joserfc_eddsa_ok(alg):
        private = jose_jwk.import_key(key.to_pem(), KTY[alg])
        token = jose_jwt.encode({"alg": alg, "kid": key.kid, "typ": "meshauth+jwt"}, claims, private, algorithms=[alg])
    principal = _verifier(key, clock).verify(token)
    assert principal.caller == "orders"
    assert principal.alg == alg
    assert dict(principal.claims) == claims


@ALGS
def test_pyjwt_minted_txn_token_and_bound_service_token(alg: str) -> None:
    """Another implementation's gateway and service: PyJWT mints both tokens, meshauth verifies the hop."""
    key, gateway_key = SigningKey.generate(alg), SigningKey.generate(alg)
    keys = StaticKeys.from_jwks({"keys": [key.public_jwk(iss="orders"), gateway_key.public_jwk(iss="gateway")]})
    clock = FakeClock()
    now = int(clock())
    txn_claims = {"iss": "gateway", "aud": "meshauth", "iat": now, "exp": now + 300, "txn": "5f0c1c9e-uuid-ok"}
    txn_claims.update({"sub": "alice", "scope": "charges:write", "req_wl": "gateway", "tctx": {"groups": ["staff"]}})
    txn = jwt.encode(
        txn_claims, gateway_key.to_pem(), algorithm=alg, headers={"kid": gateway_key.kid, "typ": "txntoken+jwt"}
    )
    tth = base64.urlsafe_b64encode(hashlib.sha256(txn.encode()).digest()).rstrip(b"=").decode()
    token = jwt.encode(
        profile_claims(now, tth=tth), key.to_pem(), algorithm=alg, headers={"kid": key.kid, "typ": "meshauth+jwt"}
    )
    principal = Verifier("payments", keys, clock=clock).verify(token, txn)
    assert (principal.caller, principal.subject, principal.transaction) == ("orders", "alice", "5f0c1c9e-uuid-ok")
    assert principal.txn_issuer == "gateway" and principal.delegated and principal.scopes == {"charges:write"}


@ALGS
def test_pyjwt_default_typ_jwt_is_rejected(alg: str) -> None:
    """A documented difference: PyJWT writes ``typ: JWT``; meshauth wants ``meshauth+jwt``.

    Explicit typing (RFC 8725 section 3.11) keeps an ordinary JWT, e.g. an
    OAuth access token signed by the same key, from passing as a service token.
    """
    key = SigningKey.generate(alg)
    clock = FakeClock()
    verifier = _verifier(key, clock)
    for headers in ({"kid": key.kid}, {"kid": key.kid, "typ": "JWT"}):
        token = jwt.encode(profile_claims(int(clock())), key.to_pem(), algorithm=alg, headers=headers)
        assert jwt.get_unverified_header(token)["typ"] == "JWT"
        with pytest.raises(meshauth.WrongTokenType) as info:
            verifier.verify(token)
        assert info.value.reason == "wrong_type"


def test_pyjwt_high_s_signatures_are_accepted() -> None:
    """PyJWT (via cryptography) does not normalise ECDSA ``s``; about half its tokens are high-S.

    meshauth must accept them, which is why it does not enforce low-S.
    """
    key = SigningKey.generate("ES256")
    clock = FakeClock()
    verifier = _verifier(key, clock)
    for _ in range(64):
        token = jwt.encode(
            profile_claims(int(clock())),
            key.to_pem(),
            algorithm="ES256",
            headers={"kid": key.kid, "typ": "meshauth+jwt"},
        )
        s = int.from_bytes(b64decode(token.rsplit(".", 1)[1])[32:], "big")
        if s > P256_N // 2:
            assert verifier.verify(token).caller == "orders"
            return
    pytest.fail("no high-S signature in 64 PyJWT tokens (probability 2**-64)")


@ALGS
def test_pyjwt_rejects_what_meshauth_rejects_for_the_wrong_key(alg: str) -> None:
    # Sanity check of the setup: the libraries agree on a bad signature.
    key, impostor = SigningKey.generate(alg), SigningKey.generate(alg)
    clock = FakeClock(time.time())
    token = ServiceIdentity("orders", impostor, clock=clock).mint("payments")
    forged = token.split(".")
    forged[0] = (
        base64.urlsafe_b64encode(
            json.dumps({"alg": alg, "kid": key.kid, "typ": "meshauth+jwt"}, separators=(",", ":")).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    forged_token = ".".join(forged)
    with pytest.raises(meshauth.BadSignature):
        _verifier(key, clock).verify(forged_token)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged_token, jwt.PyJWK(key.public_jwk(iss="orders")).key, algorithms=[alg], audience="payments")


# -- key ids ----------------------------------------------------------------------------------


@ALGS
def test_kid_is_the_rfc7638_thumbprint(alg: str) -> None:
    key = SigningKey.generate(alg)
    public = key.public_jwk(iss="orders")
    assert public["kid"] == key.kid
    with joserfc_eddsa_ok(alg):
        assert jose_jwk.import_key(public).thumbprint() == key.kid
        assert jose_jwk.import_key(key.to_pem(), KTY[alg]).thumbprint() == key.kid
    # PyJWT has no thumbprint API: hash PyJWT's own JWK encoding of the key independently.
    pyjwt_jwk = jwt.PyJWK(public).Algorithm.to_jwk(key.public_key, as_dict=True)
    assert not hasattr(jwt.PyJWK, "thumbprint") or jwt.PyJWK(public).thumbprint() == key.kid  # type: ignore[attr-defined]
    assert rfc7638_thumbprint(pyjwt_jwk) == key.kid
    assert rfc7638_thumbprint(public) == key.kid


def test_kid_matches_the_rfc8037_known_answer() -> None:
    # RFC 8037 appendix A.2/A.3: the Ed25519 example key and its JWK thumbprint.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    public = ed25519.Ed25519PublicKey.from_public_bytes(b64decode(x))
    record = KeyRecord.from_public_key(public, "orders")
    assert record.jwk["x"] == x
    assert record.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
