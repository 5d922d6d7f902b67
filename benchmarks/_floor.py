"""A floor for the verify budgets: the least Python work any ES256 JWS verifier does.

Not a verifier: it checks only what every verifier must (split, base64url,
JSON, the key by ``kid``, the signature, audience, issuer and dates) and none of
what makes meshauth's checks strict (canonical base64url, duplicate members,
sizes, ``typ``, forbidden header members, claim types). No telemetry, no cache,
a slotted result object. Measured in the same rounds as meshauth, it shows how
much of a verify ratio any CPython implementation pays on the host: on a slow
interpreter build the floor alone may exceed a budget.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshauth._jws import raw_to_der  # the cheapest r||s -> DER conversion available

__all__ = ["bare_hops", "bare_verifications"]

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_PAD = ("", "===", "==", "=")


def _decode(segment: str) -> bytes:
    return binascii.a2b_base64((segment + _PAD[len(segment) & 3]).encode("ascii").translate(_TO_STANDARD))


class _Verified:
    __slots__ = ("audience", "caller", "claims", "expires_at", "token_id")

    def __init__(self, caller: str, audience: str, expires_at: int, token_id: str, claims: dict[str, Any]) -> None:
        self.caller = caller
        self.audience = audience
        self.expires_at = expires_at
        self.token_id = token_id
        self.claims = claims


def _bare_verify(keys: Mapping[str, ec.EllipticCurvePublicKey]) -> Callable[[str, str, float], _Verified]:
    headers: dict[str, str] = {}  # header segment -> kid, as a verifier with a header cache keeps

    def verify(token: str, audience: str, now: float) -> _Verified:
        header, payload, signature = token.split(".")
        kid = headers.get(header)
        if kid is None:
            kid = headers[header] = json.loads(_decode(header))["kid"]
        keys[kid].verify(
            raw_to_der(_decode(signature)), token[: len(header) + 1 + len(payload)].encode(), _ECDSA_SHA256
        )
        claims = json.loads(_decode(payload))
        if claims["aud"] != audience or claims["exp"] <= now - 30 or claims["iat"] > now + 30:
            raise ValueError("refused")
        return _Verified(claims["iss"], audience, claims["exp"], claims.get("jti", ""), claims)

    return verify


def bare_verifications(
    keys: Mapping[str, ec.EllipticCurvePublicKey], audience: str, tokens: Sequence[str], clock: Callable[[], float]
) -> Callable[[], None]:
    """Verify each of ``tokens`` the bare way (one batch)."""
    verify = _bare_verify(keys)

    def run() -> None:
        now = clock()
        for token in tokens:
            verify(token, audience, now)

    return run


def bare_hops(
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    audience: str,
    trust_domain: str,
    pairs: Sequence[tuple[str, str]],
    clock: Callable[[], float],
) -> Callable[[], None]:
    """Verify each (service token, Txn-Token) pair the bare way, then the binding (``tth``)."""
    verify = _bare_verify(keys)

    def run() -> None:
        now = clock()
        for token, txn_token in pairs:
            service = verify(token, audience, now)
            verify(txn_token, trust_domain, now)
            digest = hashlib.sha256(txn_token.encode("ascii")).digest()
            tth = binascii.b2a_base64(digest, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")
            if service.claims.get("tth") != tth:
                raise ValueError("not bound")

    return run
