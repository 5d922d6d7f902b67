"""Identity providers' keys: KeyRecord for RSA/EC/Ed25519, and IdPKeyParser."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import meshauth
from meshauth import JWKSFile, KeyRecord, StaticKeys
from meshauth._idp_keys import IDP_ALGORITHMS, IdPKeyParser, parse_idp_jwk
from meshauth._jws import b64url_encode

ISSUER = "https://login.example.com"
DATA = b"header.payload"
HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **members: Any) -> dict[str, Any]:
    return {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, **members}


def sign(alg: str, key: Any, data: bytes = DATA) -> bytes:
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), HASHES[alg[2:]])
    if alg.startswith("PS"):
        digest = HASHES[alg[2:]]
        return key.sign(data, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest)
    if alg == "ES256":
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return key.sign(data)


@pytest.mark.parametrize("alg", IDP_ALGORITHMS)
def test_every_idp_algorithm_verifies_with_its_bound_key(alg: str, rsa_key: rsa.RSAPrivateKey) -> None:
    private: Any
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k", "alg": alg}
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = {**jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k", "alg": alg}
    else:
        private, jwk = rsa_key, rsa_jwk(rsa_key, "k", alg=alg)
    record = parse_idp_jwk(jwk, "idp", issuer=ISSUER)
    assert (record.kid, record.alg, record.owner) == ("k", alg, ISSUER)
    signature = sign(alg, private)
    assert record.verify(signature, DATA) is True
    assert record.verify(signature, DATA + b"x") is False
    assert record.verify(signature[:-1], DATA) is False
    assert record.verify(b"", DATA) is False


def test_the_algorithm_is_the_keys_not_the_signers(rsa_key: rsa.RSAPrivateKey) -> None:
    rs256 = parse_idp_jwk(rsa_jwk(rsa_key, "k", alg="RS256"), "idp", issuer=ISSUER)
    assert rs256.verify(sign("PS256", rsa_key), DATA) is False  # a PS256 signature is not RS256
    assert rs256.verify(sign("RS384", rsa_key), DATA) is False
    # Without "alg", the first allowed algorithm that fits the key type is bound.
    bare = rsa_jwk(rsa_key, "k")
    assert parse_idp_jwk(bare, "idp", issuer=ISSUER).alg == "RS256"
    assert parse_idp_jwk(bare, "idp", issuer=ISSUER, algorithms=("ES256", "PS256")).alg == "PS256"
    with pytest.raises(ValueError, match="does not fit"):
        KeyRecord("k", "ES256", ISSUER, rsa_key.public_key())
    with pytest.raises(ValueError, match="does not fit"):
        KeyRecord("k", "HS256", ISSUER, rsa_key.public_key())


@pytest.mark.parametrize(
    ("bits", "usable"), [(1024, False), (2047, False), (2048, True), (8192, True), (8193, False), (16384, False)]
)
def test_rsa_sizes(bits: int, usable: bool) -> None:
    n = (1 << (bits - 1)) | 1  # an odd modulus of exactly this many bits: enough to check the bound
    jwk = {"kty": "RSA", "kid": "k", "n": b64url_encode(n.to_bytes((bits + 7) // 8, "big")), "e": "AQAB"}
    keys = IdPKeyParser(ISSUER).parse({"keys": [jwk]}, "idp")
    assert ("k" in keys) is usable
    if not usable:
        assert f"RSA key of {bits} bits (expected 2048 to 8192)" in keys.problems[0]


def test_skipped_keys_are_noted_and_certificate_members_allowed(
    rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    good = rsa_jwk(rsa_key, "good", use="sig", x5c=["MIIB"], x5t="abc", **{"x5t#S256": "def"})
    document = {
        "keys": [
            good,
            rsa_jwk(rsa_key, "enc", use="enc"),
            rsa_jwk(rsa_key, "wrong-alg", alg="ES256"),
            rsa_jwk(rsa_key, "not-allowed", alg="RS512"),
            rsa_jwk(rsa_key, "ops", key_ops=["encrypt"]),
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac"},
            {"kid": "no-kty"},
        ]
    }
    keys = StaticKeys.from_jwks(document, source="idp", parser=IdPKeyParser(ISSUER, algorithms=("RS256", "ES256")))
    assert keys.keyset.kids() == ["good"] and keys.get_key("good").alg == "RS256"
    problems = "\n".join(keys.problems)
    assert len(keys.problems) == 7
    for fragment in (
        "kid 'enc'): not a signing key (use 'enc')",
        "kid 'wrong-alg'): 'alg' 'ES256' does not fit key type RSA",
        "kid 'not-allowed'): 'alg' RS512 is not among the allowed algorithms (RS256, ES256)",
        "kid 'ops'): 'key_ops' does not allow 'verify'",
        "kid 'p384'): EC keys must be on P-256",
        "kid 'hmac'): unsupported key type 'oct'",
        "kid 'no-kty'): unsupported key type 'None'",
    ):
        assert fragment in problems
    logged = [record.getMessage() for record in caplog.records if record.name == "meshauth"]
    assert len(logged) == 7 and all(line.startswith("meshauth IdP key set: skipping a key: idp:") for line in logged)


def test_private_members_refuse_the_whole_idp_document(rsa_key: rsa.RSAPrivateKey) -> None:
    leaked = {**rsa_jwk(rsa_key, "leak"), "d": "AQAB"}
    with pytest.raises(meshauth.ConfigurationError, match="private key members") as caught:
        IdPKeyParser(ISSUER).parse({"keys": [rsa_jwk(rsa_key, "good"), leaked]}, "idp")
    assert caught.value.reason == "private_key_members"


def test_idp_key_file_with_the_parser(tmp_path: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "idp.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(rsa_key, "k1"), rsa_jwk(rsa_key, "k2", use="enc")]}))
    keys = JWKSFile(path, parser=IdPKeyParser(ISSUER))
    assert keys.get_key("k1").owner == ISSUER and keys.get_key("k2") is None
    assert len(keys.keyset.problems) == 1
    path.write_text("[]")
    with pytest.raises(meshauth.ConfigurationError, match="JWKS document") as caught:
        JWKSFile(path, parser=IdPKeyParser(ISSUER))
    assert caught.value.reason == "invalid_jwks"
    with pytest.raises(meshauth.ConfigurationError, match="cannot read JWKS file"):
        JWKSFile(tmp_path / "absent.json", parser=IdPKeyParser(ISSUER))


def test_registry_parsing_stays_strict(rsa_key: rsa.RSAPrivateKey) -> None:
    # The service registry takes ES256/EdDSA keys with an owning service only.
    with pytest.raises(meshauth.ConfigurationError, match="unsupported 'alg'"):
        StaticKeys.from_jwks({"keys": [rsa_jwk(rsa_key, "k", alg="RS256", iss="orders")]})
    key = meshauth.SigningKey.generate()
    jwk = key.public_jwk(iss="orders")
    del jwk["iss"]
    with pytest.raises(meshauth.ConfigurationError, match="'iss'"):
        StaticKeys.from_jwks({"keys": [jwk]})


def test_parser_options_are_checked() -> None:
    with pytest.raises(meshauth.ConfigurationError, match="unsupported IdP algorithms"):
        IdPKeyParser(ISSUER, algorithms=("HS256",))
    with pytest.raises(meshauth.ConfigurationError):
        IdPKeyParser(ISSUER, algorithms=())
    parser = IdPKeyParser(ISSUER)
    with pytest.raises(AttributeError):
        parser.issuer = "other"  # type: ignore[misc]
