"""Service tokens: the meshauth service-token profile and :class:`Verifier`.

The checks themselves are the engine's (``meshauth._engine``), run in the fixed
order of the design; this module holds what is particular to service tokens:
the profile (``typ`` ``meshauth+jwt``, ES256/EdDSA, integer dates, one
audience, a lifetime limit), the claim rule (``iss`` owns the key, ``sub``,
``act``, ``jti``, ``scope``), the replay cache and the telemetry around a call.

.. warning::
   The algorithm comes from the registry's key record, never from the token.
   Tokens carrying ``jku``, ``jwk``, ``x5u``, ``x5c``, ``crit`` and similar
   header members are rejected outright; no URL or key from a token is used.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from time import perf_counter
from typing import Any, Final

from opentelemetry import metrics, trace

from ._engine import (
    FORBIDDEN_HEADER_MEMBERS,
    MAX_LEEWAY,
    Engine,
    Profile,
    frozen_claims,
    nonempty_str,
    numeric_date,
    typ_of,
)
from ._exceptions import (
    InvalidClaim,
    IssuerMismatch,
    MeshAuthError,
    ReplayStoreUnavailable,
    TokenError,
    TokenReplayed,
)
from ._keys import ALGORITHMS, KeyRecord
from ._principal import Principal, in_transaction, make_principal
from ._registry import KeySource
from ._replay import ReplayCache
from ._telemetry import AUDIT_LOGGER, Telemetry, audit, fail_closed
from ._txn import (
    DEFAULT_TRUST_DOMAIN,
    MAX_TXN_LIFETIME,
    TXN_TOKEN_HEADER,
    TXN_TOKEN_TYPE,
    Transaction,
    TxnVerifier,
    check_binding,
    txn_profile,
)

__all__ = [
    "FORBIDDEN_HEADER_MEMBERS",
    "MAX_LEEWAY",
    "REQUIRED_CLAIMS",
    "RESPONSE_TOKEN_TYPE",
    "SERVICE_TOKEN_TYPE",
    "Verifier",
    "service_profile",
]

SERVICE_TOKEN_TYPE: Final = "meshauth+jwt"  # noqa: S105 - a media type, not a secret
RESPONSE_TOKEN_TYPE: Final = "meshauth-response+jwt"  # noqa: S105 - a media type
REQUIRED_CLAIMS: Final = ("iss", "sub", "aud", "iat", "exp", "jti")
MAX_JTI_LENGTH: Final = 256
_NO_SCOPES: Final[frozenset[str]] = frozenset()
_NOT_A_SERVICE_TOKEN: Final = {
    RESPONSE_TOKEN_TYPE: " (a response token is never accepted as a service token)",
    TXN_TOKEN_TYPE: " (a Txn-Token goes in the Txn-Token header, never as a service token)",
}
_TTH_LENGTH: Final = 43  # unpadded base64url of 32 bytes


def _numeric_date(claims: Mapping[str, Any], name: str) -> int:
    """An integer NumericDate claim (the meshauth rule)."""
    return int(numeric_date(claims, name, integer=True))


def _typ_matches(value: Any, expected: str) -> bool:
    """Whether a ``typ`` header names ``expected`` (case-insensitive, ``application/`` allowed)."""
    return typ_of(value) == expected


def service_claims(audience: str) -> Callable[[dict[str, Any], KeyRecord, Any], Principal]:
    """The service-token claim rule: ``iss`` owns the key, ``sub`` = ``iss``, no ``act``, ``jti``, ``scope``, ``tth``.

    Runs after the engine's shared rules (required claims, audience, dates).
    """

    def check(claims: dict[str, Any], record: KeyRecord, expect: Any) -> Principal:
        issuer = claims["iss"]
        subject = claims["sub"]
        jti = claims["jti"]
        if type(issuer) is not str or not 0 < len(issuer) <= 256:
            nonempty_str(claims, "iss", 256)
        if type(subject) is not str or not 0 < len(subject) <= 1024:
            nonempty_str(claims, "sub")
        if type(jti) is not str or not 0 < len(jti) <= MAX_JTI_LENGTH:
            nonempty_str(claims, "jti", MAX_JTI_LENGTH)
        scope = claims.get("scope")
        if type(scope) is not str and "scope" in claims:
            raise InvalidClaim(
                "'scope' must be a space-separated string", expected="string", actual=type(scope).__name__
            )
        if issuer != record.owner:
            raise IssuerMismatch(
                f"'iss' says {issuer[:64]!r} but key {record.kid[:16]} belongs to {record.owner!r}",
                expected=record.owner,
                actual=issuer[:64],
            )
        if subject != issuer:
            raise InvalidClaim(
                f"'sub' must equal 'iss' in a service token; a user travels in a Txn-Token ({TXN_TOKEN_HEADER})",
                expected=issuer,
                actual=subject[:64],
            )
        if "act" in claims:
            raise InvalidClaim(
                "a service token must not carry 'act': delegation is a Txn-Token, not a self-asserted actor chain",
                expected="no 'act'",
                actual="act",
            )
        tth = claims.get("tth")
        if tth is not None and (type(tth) is not str or len(tth) != _TTH_LENGTH):
            raise InvalidClaim("'tth' must be a base64url SHA-256 digest", expected="43 characters", actual="other")
        return make_principal(
            issuer,
            audience,
            frozenset(scope.split()) if scope else _NO_SCOPES,
            jti,
            claims["iat"],
            claims["exp"],
            record.kid,
            record.alg,
            frozen_claims(claims),
        )

    return check


def service_profile(
    audience: str, *, leeway: float = 30, max_lifetime: int = 900, max_token_bytes: int = 8192
) -> Profile[Principal]:
    """The profile of meshauth service tokens addressed to ``audience``."""
    return Profile(
        name="service",
        types=frozenset({SERVICE_TOKEN_TYPE}),
        algorithms=frozenset(ALGORITHMS),
        claims=service_claims(audience),
        max_token_bytes=max_token_bytes,
        required_claims=REQUIRED_CLAIMS,
        audiences=frozenset({audience}),
        leeway=leeway,
        max_lifetime=max_lifetime,
        typ_refused_hint=_NOT_A_SERVICE_TOKEN,
    )


def _bind(principal: Principal, txn: Transaction | None) -> Principal:
    """The service principal inside the verified transaction, once ``tth`` binds the two."""
    try:
        check_binding(principal.claims.get("tth"), txn)
    except TokenError as exc:
        exc.caller, exc.kid = principal.caller, principal.kid
        raise
    if txn is None:
        return principal
    return in_transaction(principal, txn.subject, txn.scopes, txn.transaction, txn.issuer, txn.context, txn.token)


@contextlib.contextmanager
def _asking_replay_store() -> Iterator[None]:
    """A store that fails cannot tell whether the token was used before: refuse, as an outage."""
    try:
        yield
    except MeshAuthError:
        raise
    except Exception as exc:
        raise ReplayStoreUnavailable(f"replay cache failed: {type(exc).__name__}") from exc


def _refuse_replay(principal: Principal, first_use: bool) -> None:
    if not first_use:
        raise TokenReplayed(
            f"token id {principal.token_id[:64]!r} of {principal.caller!r} was already used: "
            "a token is accepted once with the replay cache on",
            actual=principal.token_id[:64],
            kid=principal.kid,
            caller=principal.caller,
        )


class Verifier(Engine[Principal]):
    """Checks inbound tokens for one service against a key registry.

    >>> import meshauth
    >>> from meshauth.testing import FakeClock
    >>> clock = FakeClock()
    >>> key = meshauth.SigningKey.generate()
    >>> keys = meshauth.StaticKeys.from_jwks({"keys": [key.public_jwk(iss="orders")]})
    >>> orders = meshauth.ServiceIdentity("orders", key, clock=clock)
    >>> verifier = meshauth.Verifier("payments", keys, clock=clock)
    >>> verifier.verify(orders.token_for("payments")).caller
    'orders'

    No network call happens per request: keys come from ``keys`` (a
    :class:`~meshauth.StaticKeys`, :class:`~meshauth.JWKSFile`,
    :class:`~meshauth.JWKSEndpoint` or anything with ``get_key``/``aget_key``).
    A token that verified once is answered from a bounded cache, keyed by the
    exact token string, until it expires or its key leaves the registry.

    Every call either returns a :class:`~meshauth.Principal` or raises a
    :class:`~meshauth.TokenError` (bad token) or an
    :class:`~meshauth.Unavailable` (registry or replay store unavailable);
    nothing else.

    .. warning::
       The verification algorithm is the one bound to the key in the registry.
       The token's ``alg`` header is only compared with it, never trusted.
    """

    token_type: str = SERVICE_TOKEN_TYPE
    span_name: str = "meshauth.verify"

    def __init__(
        self,
        audience: str,
        keys: KeySource,
        *,
        leeway: float = 30,
        max_lifetime: int = 900,
        clock: Callable[[], float] = time.time,
        replay_cache: ReplayCache | None = None,
        max_token_bytes: int = 8192,
        cache_size: int = 4096,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        txn_issuers: Iterable[str] = ("gateway",),
        max_txn_lifetime: int = MAX_TXN_LIFETIME,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if not isinstance(audience, str) or not audience:
            raise ValueError("audience must be the non-empty name of this service")
        if not isinstance(trust_domain, str) or not trust_domain:
            raise ValueError("trust_domain must be a non-empty string")
        if isinstance(txn_issuers, str):
            raise TypeError("txn_issuers is a collection of service names, not a string")
        self.profile = self._profile(audience, leeway, max_lifetime, max_token_bytes)
        super().__init__(max_token_bytes=max_token_bytes, clock=clock, cache_size=cache_size)
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.replay_cache = replay_cache
        self.trust_domain = trust_domain
        self.txn_issuers = frozenset(txn_issuers)
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self.header_profile = self.profile
        self.selected = (self.profile, keys)
        self._txn = TxnVerifier(
            txn_profile(
                trust_domain,
                self.txn_issuers,
                leeway=leeway,
                max_lifetime=max_txn_lifetime,
                max_token_bytes=max_token_bytes,
            ),
            keys,
            clock=clock,
            cache_size=cache_size,
        )

    def _profile(self, audience: str, leeway: float, max_lifetime: int, max_token_bytes: int) -> Profile[Principal]:
        return service_profile(audience, leeway=leeway, max_lifetime=max_lifetime, max_token_bytes=max_token_bytes)

    # -- public API -------------------------------------------------------------

    def verify(self, token: str, txn_token: str | None = None, *, audit: bool = True) -> Principal:
        """Verify ``token`` (and the request's Txn-Token, if any) and return who is calling.

        The service token is checked first, then ``txn_token`` (signed by a
        service in ``txn_issuers``, for this trust domain), then the binding
        (``tth``). ``audit=False`` skips this call's audit record, for callers
        (such as the middleware) that write one record per request themselves.
        """
        return self._verify(token, None, audit, txn_token)

    async def averify(self, token: str, txn_token: str | None = None, *, audit: bool = True) -> Principal:
        """Like :meth:`verify`, letting an async key source fetch without blocking the loop."""
        return await self._averify(token, None, audit, txn_token)

    def _verify(self, token: str, expect: Any, write_audit: bool, txn_token: object = None) -> Principal:
        """One verification inside its span, metrics and audit record (``expect``: per-call profile inputs)."""
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            principal = self.run(token, expect)
            if (txn_token is not None or "tth" in principal.claims) and self.token_type == SERVICE_TOKEN_TYPE:
                try:
                    txn = None if txn_token is None else self._txn.verify_txn(txn_token)
                except TokenError as exc:
                    exc.caller = principal.caller  # the verified caller, not the Txn-Token's issuer
                    raise
                principal = _bind(principal, txn)
        except BaseException as exc:
            error = self._rejected(span, exc, started, write_audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, write_audit)
        return principal

    async def _averify(self, token: str, expect: Any, write_audit: bool, txn_token: object = None) -> Principal:
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            principal = await self.arun(token, expect)
            if (txn_token is not None or "tth" in principal.claims) and self.token_type == SERVICE_TOKEN_TYPE:
                try:
                    txn = None if txn_token is None else await self._txn.averify_txn(txn_token)
                except TokenError as exc:
                    exc.caller = principal.caller  # the verified caller, not the Txn-Token's issuer
                    raise
                principal = _bind(principal, txn)
        except BaseException as exc:
            error = self._rejected(span, exc, started, write_audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, write_audit)
        return principal

    def clear_cache(self) -> None:
        """Forget every verified token, Txn-Tokens included (e.g. after revoking a key out of band)."""
        super().clear_cache()
        self._txn.clear_cache()

    # -- engine hooks -------------------------------------------------------------

    def select(self, claims: Mapping[str, Any], kid: str | None) -> tuple[Profile[Principal], KeySource]:
        return self.profile, self.keys

    def first_use(self, principal: Principal) -> None:
        assert self.replay_cache is not None
        with _asking_replay_store():
            first = self.replay_cache.add(principal.caller, principal.token_id, principal.expires_at + self.leeway)
        _refuse_replay(principal, first)

    async def afirst_use(self, principal: Principal) -> None:
        aadd = getattr(self.replay_cache, "aadd", None)
        if aadd is None:  # an in-process store answers at once
            self.first_use(principal)
            return
        with _asking_replay_store():
            first = await aadd(principal.caller, principal.token_id, principal.expires_at + self.leeway)
        _refuse_replay(principal, first)

    # -- telemetry ---------------------------------------------------------------

    def _accepted(self, span: trace.Span, principal: Principal, started: float, write_audit: bool) -> None:
        if principal.transaction is not None and span.is_recording():
            span.set_attribute("meshauth.transaction", principal.transaction)
            span.set_attribute("meshauth.txn_issuer", principal.txn_issuer or "")
        self.telemetry.accepted(
            span, started, principal.caller, principal.subject, self.audience, principal.kid, principal.alg
        )
        if write_audit and AUDIT_LOGGER.isEnabledFor(logging.INFO):
            audit(
                "verify",
                "accepted",
                "ok",
                span=span,
                caller=principal.caller,
                subject=principal.subject,
                transaction=principal.transaction,
                txn_issuer=principal.txn_issuer,
                audience=self.audience,
                kid=principal.kid,
                jti=principal.token_id,
            )

    def _rejected(self, span: trace.Span, exc: BaseException, started: float, write_audit: bool) -> MeshAuthError:
        if not isinstance(exc, Exception):
            span.end()
            raise exc  # KeyboardInterrupt, CancelledError: not ours to translate
        error = fail_closed(exc)
        self.telemetry.rejected(span, error, started, audience=self.audience, caller=error.caller)
        if write_audit:
            audit(
                "verify",
                "rejected",
                error.reason,
                span=span,
                audience=self.audience,
                kid=error.kid[:256] if error.kid else None,
                caller=error.caller,
                detail=error.detail,
            )
        return error
