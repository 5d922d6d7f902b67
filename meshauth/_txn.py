"""Transaction Tokens (DESIGN section 9): user context that travels unchanged across hops.

A profile of draft-ietf-oauth-transaction-tokens on meshauth keys: header
``typ`` ``txntoken+jwt``; claims ``iss`` (the issuing service, owner of the
key), ``aud`` (the trust domain), ``iat``, ``exp``, ``txn``, ``sub`` (the end
user), ``scope``, ``req_wl`` and optional ``rctx``/``tctx`` objects.

Only services a verifier lists in ``txn_issuers`` may issue one: a service
that merely forwards a Txn-Token cannot change a byte of it, and its own
service token binds the exact Txn-Token it forwards (``tth``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from ._engine import Engine, Profile, frozen_claims, nonempty_str
from ._exceptions import InvalidClaim, IssuerMismatch, MissingTxnToken, TxnMismatch, UntrustedTxnIssuer
from ._jws import b64url_encode
from ._keys import ALGORITHMS, KeyRecord
from ._registry import KeySource

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "MAX_TXN_LIFETIME",
    "TXN_TOKEN_HEADER",
    "TXN_TOKEN_TYPE",
    "Transaction",
    "TxnVerifier",
    "check_binding",
    "txn_hash",
    "txn_profile",
]

TXN_TOKEN_TYPE: Final = "txntoken+jwt"  # noqa: S105 - a media type, not a secret
TXN_TOKEN_HEADER: Final = "Txn-Token"  # noqa: S105 - a header name
DEFAULT_TRUST_DOMAIN: Final = "meshauth"
MAX_TXN_LIFETIME: Final = 300
TXN_REQUIRED_CLAIMS: Final = ("iss", "aud", "iat", "exp", "txn", "sub")
_NOT_A_TXN_TOKEN: Final = {
    "meshauth+jwt": " (a service token is never accepted as a Txn-Token)",
    "meshauth-response+jwt": " (a response token is never accepted as a Txn-Token)",
}


def txn_hash(txn_token: str) -> str:
    """``tth``: base64url(SHA-256(the ASCII Txn-Token)), unpadded."""
    return b64url_encode(hashlib.sha256(txn_token.encode("ascii")).digest())


class Transaction(NamedTuple):
    """A verified Txn-Token: what a principal inside the transaction carries (a tuple: cheap to build)."""

    issuer: str
    subject: str
    transaction: str
    scopes: frozenset[str]
    context: Mapping[str, Any]
    request_context: Mapping[str, Any]
    requesting_workload: str | None
    tth: str
    token: str
    """The Txn-Token as received, for forwarding unchanged."""


_EMPTY: Final[Mapping[str, Any]] = frozen_claims({})


def _object_claim(claims: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``tctx`` / ``rctx``: absent, or a JSON object (frozen: the verification is shared through the cache)."""
    value = claims.get(name)
    if value is None and name not in claims:
        return _EMPTY
    if type(value) is not dict:
        raise InvalidClaim(f"'{name}' must be a JSON object", expected="object", actual=type(value).__name__)
    return frozen_claims(value)


def txn_claims(txn_issuers: frozenset[str]) -> Callable[[dict[str, Any], KeyRecord, Any], Transaction]:
    """The Txn-Token claim rule: ``iss`` owns the key and is a trusted issuer; ``txn``, ``sub``, ``scope``."""

    def check(claims: dict[str, Any], record: KeyRecord, token: Any) -> Transaction:
        issuer = nonempty_str(claims, "iss", 256)
        subject = nonempty_str(claims, "sub")
        transaction = nonempty_str(claims, "txn", 256)
        scope = claims.get("scope", "")
        if type(scope) is not str:
            raise InvalidClaim(
                "'scope' must be a space-separated string", expected="string", actual=type(scope).__name__
            )
        workload = claims.get("req_wl")
        if workload is not None and type(workload) is not str:
            raise InvalidClaim("'req_wl' must be a string", expected="string", actual=type(workload).__name__)
        if issuer != record.owner:
            raise IssuerMismatch(
                f"the Txn-Token's 'iss' says {issuer[:64]!r} but key {record.kid[:16]} belongs to {record.owner!r}",
                expected=record.owner,
                actual=issuer[:64],
            )
        if issuer not in txn_issuers:
            raise UntrustedTxnIssuer(
                f"the Txn-Token was issued by {issuer!r}, which this service does not trust to assert users "
                f"(txn_issuers: {sorted(txn_issuers)!r})",
                expected=sorted(txn_issuers),
                actual=issuer,
            )
        return Transaction(
            issuer,
            subject,
            transaction,
            frozenset(scope.split()),
            _object_claim(claims, "tctx"),
            _object_claim(claims, "rctx"),
            workload,
            txn_hash(token),
            token,
        )

    return check


def txn_profile(
    trust_domain: str,
    txn_issuers: frozenset[str],
    *,
    leeway: float = 30,
    max_lifetime: int = MAX_TXN_LIFETIME,
    max_token_bytes: int = 8192,
) -> Profile[Transaction]:
    """The profile of Txn-Tokens for ``trust_domain``, issued by one of ``txn_issuers``."""
    return Profile(
        name="transaction",
        types=frozenset({TXN_TOKEN_TYPE}),
        algorithms=frozenset(ALGORITHMS),
        claims=txn_claims(txn_issuers),
        max_token_bytes=max_token_bytes,
        required_claims=TXN_REQUIRED_CLAIMS,
        audiences=frozenset({trust_domain}),
        leeway=leeway,
        max_lifetime=max_lifetime,
        typ_refused_hint=_NOT_A_TXN_TOKEN,
    )


class TxnVerifier(Engine[Transaction]):
    """The engine for one verifier's Txn-Tokens; a Txn-Token seen before is answered from its cache."""

    def __init__(
        self, profile: Profile[Transaction], keys: KeySource, *, clock: Callable[[], float], cache_size: int
    ) -> None:
        super().__init__(max_token_bytes=profile.max_token_bytes, clock=clock, cache_size=cache_size)
        self.profile = profile
        self.header_profile = profile
        self.selected = (profile, keys)

    def verify_txn(self, txn_token: object) -> Transaction:
        """Verify a Txn-Token (sync key lookup); the token string is the claim rule's ``expect``."""
        token = txn_token if type(txn_token) is str else self._coerce(txn_token)
        return self.run(token, token)

    async def averify_txn(self, txn_token: object) -> Transaction:
        token = txn_token if type(txn_token) is str else self._coerce(txn_token)
        return await self.arun(token, token)


def check_binding(tth: Any, txn: Transaction | None) -> None:
    """The service token's ``tth`` against the Txn-Token that came with it (after both verified)."""
    if txn is None:
        if tth is not None:
            raise MissingTxnToken(
                "the service token is bound to a Txn-Token ('tth') but the request carries no Txn-Token header: "
                "the caller must forward the Txn-Token it received",
                expected="a Txn-Token header",
                actual="none",
            )
        return
    if tth is None:
        raise TxnMismatch(
            "a Txn-Token came with a service token that is not bound to it (no 'tth'): the caller must mint its "
            "token with token_for(..., txn_token=...)",
            expected="'tth' in the service token",
            actual="absent",
        )
    if tth != txn.tth:
        raise TxnMismatch(
            "the service token's 'tth' does not match the Txn-Token sent: the Txn-Token was swapped or altered",
            expected="tth of the Txn-Token sent",
            actual="another digest" if isinstance(tth, str) else type(tth).__name__,
        )
