"""SigningKey and KeyRecord: generation, PEM round trips, JWK export and parsing."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

import meshauth
from meshauth._keys import check_jwk, jwk_thumbprint, parse_jwk


@pytest.mark.parametrize(("alg", "kty", "crv"), [("ES256", "EC", "P-256"), ("EdDSA", "OKP", "Ed25519")])
def test_generate_and_export_public_jwk(alg: str, kty: str, crv: str) -> None:
    key = meshauth.SigningKey.generate(alg)
    jwk = key.public_jwk(iss="orders")
    assert key.alg == alg
    assert jwk["kty"] == kty and jwk["crv"] == crv
    assert jwk["alg"] == alg and jwk["use"] == "sig" and jwk["iss"] == "orders"
    assert jwk["kid"] == key.kid
    assert "d" not in jwk


def test_kid_is_the_rfc7638_thumbprint() -> None:
    key = meshauth.SigningKey.generate("ES256")
    jwk = key.public_jwk(iss="orders")
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    assert key.kid == expected == jwk_thumbprint(jwk)


def test_rfc7638_example_vector() -> None:
    # RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key.
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
@pytest.mark.parametrize("password", [None, "s3cret", b"bytes-secret"])
def test_pem_round_trip(alg: str, password: str | bytes | None) -> None:
    key = meshauth.SigningKey.generate(alg)
    pem = key.to_pem(password=password)
    assert pem.startswith(b"-----BEGIN ")
    assert (b"ENCRYPTED" in pem) == (password is not None)
    again = meshauth.SigningKey.from_pem(pem, password=password)
    assert again.kid == key.kid and again.alg == alg


def test_pem_errors_are_configuration_errors(tmp_path: pytest.TempPathFactory) -> None:
    key = meshauth.SigningKey.generate()
    encrypted = key.to_pem(password="pw")
    with pytest.raises(meshauth.ConfigurationError) as info:
        meshauth.SigningKey.from_pem(encrypted)
    assert info.value.reason == "invalid_key"
    with pytest.raises(meshauth.ConfigurationError):
        meshauth.SigningKey.from_pem(encrypted, password="wrong")
    with pytest.raises(meshauth.ConfigurationError):
        meshauth.SigningKey.from_pem(b"not a pem")
    with pytest.raises(meshauth.ConfigurationError) as info:
        meshauth.SigningKey.from_file("/nonexistent/key.pem")
    assert "/nonexistent/key.pem" in str(info.value)


def test_unsupported_keys_are_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(meshauth.ConfigurationError, match="unsupported private key type"):
        meshauth.SigningKey.from_pem(rsa_pem)
    with pytest.raises(meshauth.ConfigurationError, match="P-256"):
        meshauth.SigningKey(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(meshauth.ConfigurationError):
        meshauth.SigningKey.generate("RS256")


def test_repr_shows_no_key_material() -> None:
    key = meshauth.SigningKey.generate()
    text = repr(key)
    assert key.kid in text
    assert "PRIVATE" not in text and key.to_pem().decode() not in text


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_record_signature_check(alg: str) -> None:
    key = meshauth.SigningKey.generate(alg)
    record = parse_jwk(key.public_jwk(iss="orders"))
    signature = key.sign(b"payload")
    assert len(signature) == 64
    assert record.verify_signature(signature, b"payload")
    assert not record.verify_signature(signature, b"other")
    assert not record.verify_signature(signature[:-1], b"payload")
    assert not record.verify_signature(bytes(64), b"payload")


def test_record_validity_window() -> None:
    key = meshauth.SigningKey.generate()
    record = key.record("orders", not_before=100, expires=200)
    assert record.jwk["nbf"] == 100 and record.jwk["exp"] == 200
    assert not record.valid_at(50) and record.valid_at(80, leeway=30)
    assert record.valid_at(150)
    assert not record.valid_at(250) and record.valid_at(220, leeway=30)


def _jwk(**changes: object) -> dict[str, object]:
    jwk: dict[str, object] = meshauth.SigningKey.generate().public_jwk(iss="orders")
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (_jwk(d="AAAA"), "private key members"),
        (_jwk(alg="RS256"), "unsupported 'alg'"),
        (_jwk(alg="EdDSA"), "does not fit alg EdDSA"),
        (_jwk(crv="P-384"), "does not fit"),
        (_jwk(kty="RSA"), "does not fit"),
        (_jwk(iss=None), "'iss'"),
        (_jwk(iss=""), "'iss'"),
        (_jwk(kid=None), "'kid'"),
        (_jwk(kid=7), "'kid'"),
        (_jwk(use="enc"), "'use'"),
        (_jwk(key_ops=["sign"]), "key_ops"),
        (_jwk(nbf="soon"), "'nbf'"),
        (_jwk(exp=True), "'exp'"),
        (_jwk(x="AAAA"), "'x'"),
        (_jwk(y=5), "'y'"),
        ([], "not a JSON object"),
    ],
)
def test_bad_registry_entries_are_named(jwk: object, message: str) -> None:
    with pytest.raises(meshauth.ConfigurationError, match=message) as info:
        check_jwk(jwk, "registry.json: keys[3]")
    assert info.value.reason == "invalid_registry"
    assert "keys[3]" in str(info.value)


def test_point_not_on_curve_is_rejected() -> None:
    jwk = _jwk()
    y = base64.urlsafe_b64decode(str(jwk["y"]) + "=")
    jwk["y"] = base64.urlsafe_b64encode(bytes([y[0] ^ 1]) + y[1:]).rstrip(b"=").decode()
    with pytest.raises(meshauth.ConfigurationError, match="not a valid ES256 public key"):
        parse_jwk(jwk, "registry")


def test_raw_to_der_matches_cryptography() -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from hypothesis import given
    from hypothesis import strategies as st

    from meshauth._jws import raw_to_der

    edges = st.sampled_from([0, 1, 127, 128, 255, 256, 2**248 - 1, 2**248, 2**255 - 1, 2**255, 2**256 - 1])
    scalars = st.integers(min_value=0, max_value=2**256 - 1) | edges

    @given(r=scalars, s=scalars)
    def check(r: int, s: int) -> None:
        assert raw_to_der(r.to_bytes(32, "big") + s.to_bytes(32, "big")) == encode_dss_signature(r, s)

    check()


# -- names are never globs (DESIGN section 4) ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["orders*", "orders?", "[o]rders", "-orders", ".orders", "a b", "", "x" * 129, "caf\u00e9"]
)
def test_a_registry_key_for_a_name_that_is_not_a_service_name_is_refused(name: str) -> None:
    jwk = meshauth.SigningKey.generate().public_jwk(iss="orders")
    jwk["iss"] = name
    with pytest.raises(meshauth.ConfigurationError, match="a service name is") as info:
        meshauth.StaticKeys.from_jwks({"keys": [jwk]})
    assert info.value.reason == "invalid_registry"


@pytest.mark.parametrize("name", ["orders*", "a/b", "", 7])
def test_an_identity_needs_a_service_name(name: object) -> None:
    with pytest.raises(ValueError, match="a service name is"):
        meshauth.ServiceIdentity(name, meshauth.SigningKey.generate())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["orders", "orders-v2", "Orders.eu_1", "9lives", "x" * 128])
def test_service_names_that_load(name: str) -> None:
    key = meshauth.SigningKey.generate()
    keys = meshauth.StaticKeys.from_jwks({"keys": [key.public_jwk(iss=name)]})
    assert keys.get_key(key.kid) is not None
    assert meshauth.ServiceIdentity(name, key).name == name
