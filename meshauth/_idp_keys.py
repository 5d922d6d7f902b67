"""Identity providers' key sets: :class:`IdPKeyParser`.

An identity provider (IdP) publishes a plain JWKS: RSA keys (most of them),
EC P-256 or Ed25519, often without ``alg``, often with ``x5c``/``x5t``
certificate members, sometimes with encryption keys beside the signing keys.
:class:`IdPKeyParser` turns such a document into a :class:`~meshauth.KeySet`
of :class:`~meshauth.KeyRecord` values owned by the issuer, each bound to one
algorithm:

* the key's own ``alg`` when it names one (it must fit the key type and be
  among the parser's ``algorithms``);
* otherwise the first of ``algorithms`` that fits the key type (RSA keys
  without ``alg`` verify ``RS256`` with the default order).

Keys meshauth cannot or must not use are skipped and described in
:attr:`KeySet.problems`: ``use`` other than ``sig``, ``key_ops`` without
``verify``, an algorithm unfit for the key or not allowed, unknown key types
and curves, RSA keys outside 2048-8192 bits, bad base64url, a ``kid`` listed
twice (neither key is used). A private member (``d``, ``p``, ...) in any key
refuses the whole document: a published secret is not a skippable key.

.. warning::
   The algorithm a token is checked with comes from this record, never from the
   token: a key bound to RS256 does not verify a PS256 (or HS256) token.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm as _CryptoUnsupported
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ._exceptions import ConfigurationError, MeshAuthError
from ._jws import b64url_decode
from ._keys import _PRIVATE_MEMBERS, RSA_ALGORITHMS, KeyRecord, PublicKey
from ._keyset import KeySet, parse_registry_document, refuse_private_members

__all__ = ["IDP_ALGORITHMS", "MAX_RSA_BITS", "MIN_RSA_BITS", "IdPKeyParser", "parse_idp_jwk"]

logger = logging.getLogger("meshauth")

# In order of preference for a key without "alg": RS256 is what OpenID Connect defaults to.
IDP_ALGORITHMS: Final = (*RSA_ALGORITHMS, "ES256", "EdDSA")
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
_KTY_ALGORITHMS: Final = {"RSA": frozenset(RSA_ALGORITHMS), "EC": frozenset({"ES256"}), "OKP": frozenset({"EdDSA"})}
_MAX_KID: Final = 256


class _Skipped(Exception):
    """A key of the document that is not used; the message says why."""


def _b64_member(jwk: Mapping[str, Any], member: str, where: str) -> bytes:
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise _Skipped(f"{where}: {member!r} must be a base64url string")
    try:
        return b64url_decode(value, member)
    except MeshAuthError:
        raise _Skipped(f"{where}: {member!r} is not base64url") from None


def _public_key(jwk: Mapping[str, Any], kty: str, where: str) -> PublicKey:
    try:
        if kty == "RSA":
            n = int.from_bytes(_b64_member(jwk, "n", where), "big")
            e = int.from_bytes(_b64_member(jwk, "e", where), "big")
            if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
                raise _Skipped(f"{where}: RSA key of {n.bit_length()} bits (expected {MIN_RSA_BITS} to {MAX_RSA_BITS})")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "EC":
            if jwk.get("crv") != "P-256":
                raise _Skipped(f"{where}: EC keys must be on P-256 (found crv {str(jwk.get('crv'))[:16]!r})")
            x, y = _b64_member(jwk, "x", where), _b64_member(jwk, "y", where)
            if len(x) != 32 or len(y) != 32:
                raise _Skipped(f"{where}: P-256 coordinates are 32 bytes")
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
        if jwk.get("crv") != "Ed25519":
            raise _Skipped(f"{where}: OKP keys must be Ed25519 (found crv {str(jwk.get('crv'))[:16]!r})")
        return ed25519.Ed25519PublicKey.from_public_bytes(_b64_member(jwk, "x", where))
    except (ValueError, _CryptoUnsupported):
        raise _Skipped(f"{where}: not a valid {kty} public key") from None


def _bound_alg(jwk: Mapping[str, Any], kty: str, algorithms: tuple[str, ...], where: str) -> str:
    fitting = _KTY_ALGORITHMS[kty]
    pinned = jwk.get("alg")
    if pinned is None:
        for alg in algorithms:
            if alg in fitting:
                return alg
        raise _Skipped(f"{where}: no allowed algorithm ({', '.join(algorithms)}) fits a {kty} key")
    if pinned not in fitting:
        raise _Skipped(f"{where}: 'alg' {str(pinned)[:16]!r} does not fit key type {kty}")
    if pinned not in algorithms:
        raise _Skipped(f"{where}: 'alg' {pinned} is not among the allowed algorithms ({', '.join(algorithms)})")
    return str(pinned)


def parse_idp_jwk(jwk: Any, where: str, *, issuer: str, algorithms: tuple[str, ...] = IDP_ALGORITHMS) -> KeyRecord:
    """One public JWK of an IdP as a :class:`KeyRecord` owned by ``issuer``.

    Raises :class:`~meshauth.ConfigurationError` (reason ``unusable_key``) for a
    key that is skipped, naming the key and why.
    """
    try:
        return _parse(jwk, where, issuer, algorithms)
    except _Skipped as exc:
        raise ConfigurationError(str(exc), reason="unusable_key") from None


def _parse(jwk: Any, where: str, issuer: str, algorithms: tuple[str, ...]) -> KeyRecord:
    if not isinstance(jwk, Mapping):
        raise _Skipped(f"{where} is not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID:
        raise _Skipped(f"{where}: 'kid' must be a non-empty string of at most {_MAX_KID} characters")
    where = f"{where} (kid {kid[:64]!r})"
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise _Skipped(f"{where} carries private key members")
    use = jwk.get("use", "sig")
    if use != "sig":
        raise _Skipped(f"{where}: not a signing key (use {str(use)[:16]!r})")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _Skipped(f"{where}: 'key_ops' does not allow 'verify'")
    kty = jwk.get("kty")
    if kty not in _KTY_ALGORITHMS:
        raise _Skipped(f"{where}: unsupported key type {str(kty)[:16]!r}")
    alg = _bound_alg(jwk, kty, algorithms, where)
    public_key = _public_key(jwk, kty, where)
    return KeyRecord(kid, alg, issuer, public_key, jwk=dict(jwk))


@dataclasses.dataclass(frozen=True, slots=True)
class IdPKeyParser:
    """How to read one identity provider's JWKS (a frozen value given as ``parser=``).

    >>> import meshauth
    >>> parser = meshauth.IdPKeyParser("https://login.example.com", algorithms=("RS256", "ES256"))
    >>> document = {"keys": [{"kty": "RSA", "kid": "enc-1", "use": "enc", "n": "AQAB", "e": "AQAB"}]}
    >>> keys = meshauth.StaticKeys.from_jwks(document, source="idp", parser=parser)
    >>> len(keys), keys.problems
    (0, ["idp: keys[0] (kid 'enc-1'): not a signing key (use 'enc')"])

    ``issuer`` becomes each record's ``owner``; ``algorithms`` are the ones
    the issuer is trusted to sign with, in order of preference for keys
    without ``alg``. Unusable keys are skipped (see the module docstring)
    whether or not ``strict`` is asked for; a document that is not a JWKS, or
    holds a private member, is refused.
    """

    issuer: str
    algorithms: tuple[str, ...] = IDP_ALGORITHMS
    reason: str = "invalid_jwks"
    kind: str = "JWKS"

    def __post_init__(self) -> None:
        unknown = [alg for alg in self.algorithms if alg not in IDP_ALGORITHMS]
        if unknown or not self.algorithms:
            raise ConfigurationError(
                "unsupported IdP algorithms",
                reason="invalid_configuration",
                expected=list(IDP_ALGORITHMS),
                actual=unknown or [],
            )

    def parse(self, document: bytes | str | Mapping[str, Any], source: str, *, strict: bool = False) -> KeySet:
        """The usable keys by ``kid``; skipped ones in ``problems``. ``strict`` changes nothing here."""
        doc = parse_registry_document(document, source, self.reason)
        refuse_private_members(doc, source)
        records: dict[str, KeyRecord] = {}
        problems: list[str] = []
        twice: set[str] = set()
        for index, jwk in enumerate(doc["keys"]):
            try:
                record = _parse(jwk, f"{source}: keys[{index}]", self.issuer, self.algorithms)
            except _Skipped as exc:
                problems.append(str(exc))
                continue
            if record.kid in records or record.kid in twice:
                twice.add(record.kid)
                records.pop(record.kid, None)
                problems.append(f"{source}: kid {record.kid[:64]!r} appears twice; neither key is used")
                continue
            records[record.kid] = record
        for problem in problems:  # once per new document: an unchanged one is not parsed again
            logger.warning("meshauth IdP key set: skipping a key: %s", problem)
        return KeySet(records.values(), source=source, problems=problems)
