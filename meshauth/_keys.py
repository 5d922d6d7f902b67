"""Signing keys and public key records.

A :class:`SigningKey` is a service's own private key; a :class:`KeyRecord` is
one public key bound to one algorithm and one owner: an entry of the shared
registry (ES256 or EdDSA, owned by a service) or a key of an identity
provider (RSA, EC P-256 or Ed25519, owned by the issuer; see
``meshauth._idp_keys``). Keys are parsed once and kept as ``cryptography``
objects.

.. warning::
   The algorithm used to verify a token always comes from the :class:`KeyRecord`
   (the registry), never from the token's header. A header ``alg`` that differs
   from the record's is rejected, which rules out algorithm-confusion attacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ._exceptions import ConfigurationError
from ._jws import b64url_decode, b64url_encode, der_to_raw, raw_to_der
from ._names import service_name_problem

__all__ = ["ALGORITHMS", "RSA_ALGORITHMS", "KeyRecord", "SigningKey", "check_jwk", "jwk_thumbprint", "parse_jwk"]

ALGORITHMS: Final = ("ES256", "EdDSA")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
ServicePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PublicKey = ServicePublicKey | rsa.RSAPublicKey

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_RSA_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# Members that only a private JWK carries (RFC 7518 section 6); their presence in
# a registry means somebody published a secret.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_KTY_FOR_ALG = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public EC, OKP or RSA JWK, base64url."""
    if jwk.get("kty") == "EC":
        members = {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    elif jwk.get("kty") == "RSA":
        members = {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}
    else:
        members = {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return b64url_encode(hashlib.sha256(canonical).digest())


def _public_members(public_key: ServicePublicKey) -> dict[str, str]:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}


def _rsa_verifier(alg: str, public_key: rsa.RSAPublicKey) -> Callable[[bytes, bytes], bool]:
    hash_algorithm = _RSA_HASHES[alg[2:]]()
    # RFC 7518 section 3.5: the PSS salt is as long as the hash output.
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg.startswith("RS")
        else padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)
    )
    size = (public_key.key_size + 7) // 8
    rsa_verify = public_key.verify

    def verify_rsa(signature: bytes, data: bytes) -> bool:
        if len(signature) != size:
            return False
        try:
            rsa_verify(signature, data, pad, hash_algorithm)
        except InvalidSignature:
            return False
        return True

    return verify_rsa


def _verifier_for(alg: str, public_key: PublicKey) -> Callable[[bytes, bytes], bool]:
    """A closure that checks a JWS-form signature over ``data`` and never raises.

    Raises ``ValueError`` when ``alg`` does not fit the key's type.
    """
    if alg in RSA_ALGORITHMS and isinstance(public_key, rsa.RSAPublicKey):
        return _rsa_verifier(alg, public_key)
    if alg == "ES256" and isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise ValueError("ES256 needs a P-256 key")
        ec_verify = public_key.verify

        def verify_es256(signature: bytes, data: bytes) -> bool:
            if len(signature) != 64:
                return False
            try:
                ec_verify(raw_to_der(signature), data, _ECDSA_SHA256)
            except InvalidSignature:
                return False
            return True

        return verify_es256
    if alg == "EdDSA" and isinstance(public_key, ed25519.Ed25519PublicKey):
        ed_verify = public_key.verify

        def verify_eddsa(signature: bytes, data: bytes) -> bool:
            if len(signature) != 64:
                return False
            try:
                ed_verify(signature, data)
            except InvalidSignature:
                return False
            return True

        return verify_eddsa
    raise ValueError(f"algorithm {alg[:16]!r} does not fit a {type(public_key).__name__}")


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class KeyRecord:
    """One public key, bound to one algorithm and one owner.

    A registry key is owned by a service (ES256 or EdDSA); an identity
    provider's key by its issuer (RS256/384/512, PS256/384/512 with 2048 to
    8192 bits, ES256 on P-256, EdDSA on Ed25519). The algorithm is part of
    the record: a token is only ever checked with ``alg``, whatever its header
    says. Building a record whose ``alg`` does not fit ``public_key`` raises
    ``ValueError``.

    Records compare by identity: a registry reload that keeps a key produces a
    new record only when the key's entry changed.
    """

    kid: str
    alg: str
    owner: str
    public_key: PublicKey = dataclasses.field(repr=False)
    not_before: int | None = None
    expires: int | None = None
    jwk: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    verify_signature: Callable[[bytes, bytes], bool] = dataclasses.field(
        default=None,
        repr=False,  # type: ignore[assignment]
    )

    def __post_init__(self) -> None:
        if self.verify_signature is None:
            object.__setattr__(self, "verify_signature", _verifier_for(self.alg, self.public_key))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` (JWS form) over ``data`` verifies with this key and ``alg``; never raises."""
        return self.verify_signature(signature, data)

    @classmethod
    def from_public_key(
        cls,
        public_key: ServicePublicKey,
        owner: str,
        *,
        not_before: int | None = None,
        expires: int | None = None,
    ) -> KeyRecord:
        """Build a record (and its registry JWK) from a ``cryptography`` public key."""
        members = _public_members(public_key)
        alg = "ES256" if members["kty"] == "EC" else "EdDSA"
        kid = jwk_thumbprint(members)
        jwk: dict[str, Any] = {**members, "kid": kid, "alg": alg, "use": "sig", "iss": owner}
        if not_before is not None:
            jwk["nbf"] = not_before
        if expires is not None:
            jwk["exp"] = expires
        return cls(kid, alg, owner, public_key, not_before, expires, jwk)

    def valid_at(self, now: float, leeway: float = 0) -> bool:
        """Whether the key may be used at ``now`` (its optional ``nbf``/``exp`` window)."""
        if self.not_before is not None and now < self.not_before - leeway:
            return False
        return not (self.expires is not None and now > self.expires + leeway)


def _is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**53


def check_jwk(jwk: Any, where: str) -> tuple[str, str, str]:
    """Structural checks of one registry entry, without building the key object.

    Returns ``(kid, alg, owner)``. Raises :class:`ConfigurationError` naming the
    key and the member at fault.
    """
    if not isinstance(jwk, Mapping):
        raise ConfigurationError(
            f"{where} is not a JSON object", reason="invalid_registry", expected="object", actual=type(jwk).__name__
        )
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigurationError(
            f"{where}: 'kid' must be a non-empty string",
            reason="invalid_registry",
            expected="string",
            actual=type(kid).__name__,
        )
    where = f"{where} (kid {kid[:64]!r})"
    private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
    if private:
        raise ConfigurationError(
            f"{where} carries private key members",
            reason="invalid_registry",
            expected="public members only",
            actual=private,
        )
    alg = jwk.get("alg")
    if alg not in _KTY_FOR_ALG:
        raise ConfigurationError(
            f"{where}: unsupported 'alg'", reason="invalid_registry", expected=list(ALGORITHMS), actual=alg
        )
    kty, crv = _KTY_FOR_ALG[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        raise ConfigurationError(
            f"{where}: key type does not fit alg {alg}",
            reason="invalid_registry",
            expected=f"kty={kty} crv={crv}",
            actual=f"kty={jwk.get('kty')!r} crv={jwk.get('crv')!r}",
        )
    owner = jwk.get("iss")
    problem = service_name_problem(owner)
    if problem is not None or not isinstance(owner, str):
        # A name with glob characters could match other services in a policy.
        raise ConfigurationError(f"{where}: 'iss' (owning service): {problem}", reason="invalid_registry")
    _check_use_and_window(jwk, where)
    _check_coordinates(jwk, where, ("x", "y") if kty == "EC" else ("x",))
    return kid, alg, owner


def _check_use_and_window(jwk: Mapping[str, Any], where: str) -> None:
    """``use``/``key_ops`` allow verifying; ``nbf``/``exp`` are integer NumericDates."""
    if jwk.get("use", "sig") != "sig":
        raise ConfigurationError(
            f"{where}: 'use' must be 'sig'", reason="invalid_registry", expected="sig", actual=jwk.get("use")
        )
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ConfigurationError(
            f"{where}: 'key_ops' must allow 'verify'", reason="invalid_registry", expected=["verify"], actual=ops
        )
    for member in ("nbf", "exp"):
        if member in jwk and not _is_int(jwk[member]):
            raise ConfigurationError(
                f"{where}: '{member}' must be an integer NumericDate",
                reason="invalid_registry",
                expected="integer",
                actual=jwk[member],
            )


def _check_coordinates(jwk: Mapping[str, Any], where: str, members: tuple[str, ...]) -> None:
    """Each public coordinate is a base64url string of 32 bytes (P-256 and Ed25519)."""
    for member in members:
        value = jwk.get(member)
        if not isinstance(value, str):
            raise ConfigurationError(
                f"{where}: '{member}' must be a base64url string",
                reason="invalid_registry",
                expected="string",
                actual=type(value).__name__,
            )
        try:
            size = len(b64url_decode(value, member))
        except Exception:
            size = -1
        if size != 32:
            raise ConfigurationError(
                f"{where}: '{member}' is not a 32-byte base64url value",
                reason="invalid_registry",
                expected=32,
                actual=size,
            )


def parse_jwk(jwk: Mapping[str, Any], where: str = "key") -> KeyRecord:
    """Validate one registry entry and build its :class:`KeyRecord`."""
    kid, alg, owner = check_jwk(jwk, where)
    x = b64url_decode(jwk["x"])
    public_key: PublicKey
    try:
        if alg == "ES256":
            point = b"\x04" + x + b64url_decode(jwk["y"])
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        else:
            public_key = ed25519.Ed25519PublicKey.from_public_bytes(x)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(
            f"{where} (kid {kid[:64]!r}): not a valid {alg} public key", reason="invalid_registry"
        ) from exc
    public = {k: v for k, v in jwk.items()}
    return KeyRecord(kid, alg, owner, public_key, jwk.get("nbf"), jwk.get("exp"), public)


class SigningKey:
    """A service's own private signing key (ES256 or EdDSA).

    >>> key = SigningKey.generate("ES256")
    >>> key.alg, len(key.kid)
    ('ES256', 43)
    >>> key.public_jwk(iss="orders")["iss"]
    'orders'

    The ``kid`` is the RFC 7638 thumbprint of the public key, so the same key
    always has the same id in every registry.
    """

    __slots__ = ("_private", "_sign", "alg", "kid", "public_key")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ConfigurationError(
                    "only P-256 EC keys are supported",
                    reason="invalid_key",
                    expected="secp256r1",
                    actual=private_key.curve.name,
                )
            self.alg: str = "ES256"
            ec_sign = private_key.sign

            def sign(data: bytes) -> bytes:
                return der_to_raw(ec_sign(data, _ECDSA_SHA256))
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.alg = "EdDSA"
            sign = private_key.sign
        else:
            raise ConfigurationError(
                "unsupported private key type",
                reason="invalid_key",
                expected="EC P-256 or Ed25519",
                actual=type(private_key).__name__,
            )
        self._private = private_key
        self._sign = sign
        self.public_key: ServicePublicKey = private_key.public_key()
        self.kid: str = jwk_thumbprint(_public_members(self.public_key))

    @classmethod
    def generate(cls, alg: str = "ES256") -> SigningKey:
        """A fresh random key for ``"ES256"`` (default) or ``"EdDSA"``."""
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate())
        raise ConfigurationError("unsupported algorithm", reason="invalid_key", expected=list(ALGORITHMS), actual=alg)

    @classmethod
    def from_pem(cls, data: bytes | str, password: bytes | str | None = None) -> SigningKey:
        """Load a PKCS#8 (or SEC1) PEM private key, optionally encrypted."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            private_key = serialization.load_pem_private_key(data, password=password)
        except TypeError as exc:
            # cryptography raises TypeError for a missing or superfluous password.
            raise ConfigurationError(str(exc), reason="invalid_key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigurationError(
                "not a readable PEM private key (or wrong password)", reason="invalid_key"
            ) from None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise ConfigurationError(
                "unsupported private key type",
                reason="invalid_key",
                expected="EC P-256 or Ed25519",
                actual=type(private_key).__name__,
            )
        return cls(private_key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], password: bytes | str | None = None) -> SigningKey:
        """Load a PEM private key from a file; errors name the file."""
        try:
            with open(path, "rb") as handle:
                data = handle.read(1 << 20)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read key file {os.fspath(path)!r}: {exc.strerror}", reason="invalid_key"
            ) from None
        try:
            return cls.from_pem(data, password)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{os.fspath(path)}: {exc.detail}", reason="invalid_key") from None

    def to_pem(self, password: bytes | str | None = None) -> bytes:
        """PKCS#8 PEM, encrypted with the best available scheme when a password is given."""
        if isinstance(password, str):
            password = password.encode("utf-8")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    def public_jwk(self, iss: str, *, nbf: int | None = None, exp: int | None = None) -> dict[str, Any]:
        """The registry entry for this key, owned by service ``iss``."""
        return dict(self.record(iss, not_before=nbf, expires=exp).jwk)

    def record(self, owner: str, *, not_before: int | None = None, expires: int | None = None) -> KeyRecord:
        """The :class:`KeyRecord` a registry holds for this key."""
        return KeyRecord.from_public_key(self.public_key, owner, not_before=not_before, expires=expires)

    def sign(self, data: bytes) -> bytes:
        """A JWS signature (raw ``r || s`` for ES256) over ``data``."""
        return self._sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg!r}, kid={self.kid!r})"
