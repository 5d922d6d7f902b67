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

import logging
import time
from collections.abc import Callable, Mapping
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
    TokenReplayed,
)
from ._keys import ALGORITHMS, KeyRecord
from ._principal import Principal, make_principal
from ._registry import KeySource
from ._replay import ReplayCache
from ._telemetry import AUDIT_LOGGER, Telemetry, audit, fail_closed

__all__ = [
    "FORBIDDEN_HEADER_MEMBERS",
    "MAX_LEEWAY",
    "REQUIRED_CLAIMS",
    "RESPONSE_TOKEN_TYPE",
    "SERVICE_TOKEN_TYPE",
    "Verifier",
    "parse_actor_chain",
    "service_profile",
]

SERVICE_TOKEN_TYPE: Final = "meshauth+jwt"  # noqa: S105 - a media type, not a secret
RESPONSE_TOKEN_TYPE: Final = "meshauth-response+jwt"  # noqa: S105 - a media type
REQUIRED_CLAIMS: Final = ("iss", "sub", "aud", "iat", "exp", "jti")
MAX_JTI_LENGTH: Final = 256
_NO_SCOPES: Final[frozenset[str]] = frozenset()
_NOT_A_SERVICE_TOKEN: Final = {RESPONSE_TOKEN_TYPE: " (a response token is never accepted as a service token)"}


def _numeric_date(claims: Mapping[str, Any], name: str) -> int:
    """An integer NumericDate claim (the meshauth rule)."""
    return int(numeric_date(claims, name, integer=True))


def _typ_matches(value: Any, expected: str) -> bool:
    """Whether a ``typ`` header names ``expected`` (case-insensitive, ``application/`` allowed)."""
    return typ_of(value) == expected


def parse_actor_chain(act: Any, issuer: str, max_actors: int) -> tuple[str, ...]:
    """Flatten an RFC 8693 ``act`` claim into actor names, newest first.

    Raises ``InvalidClaim`` for a malformed, looping or too long chain and
    ``IssuerMismatch`` when the outermost actor is not the issuer.
    """
    actors: list[str] = []
    node = act
    while True:
        if not isinstance(node, dict):
            raise InvalidClaim("'act' must be an object", expected="object", actual=type(node).__name__)
        name = node.get("sub")
        if not isinstance(name, str) or not name:
            raise InvalidClaim(
                "every 'act' level needs a non-empty 'sub'", expected="string", actual=type(name).__name__
            )
        if name in actors:
            raise InvalidClaim("a service appears twice in the actor chain", expected="no repeats", actual=name)
        actors.append(name)
        if len(actors) > max_actors:
            raise InvalidClaim("the actor chain is too long", expected=f"<= {max_actors} actors", actual=">")
        if "act" not in node:
            break
        node = node["act"]  # present: must be another actor object, not null
    if actors[0] != issuer:
        raise IssuerMismatch(
            f"the outermost actor {actors[0][:64]!r} is not the issuer {issuer!r}", expected=issuer, actual=actors[0]
        )
    return tuple(actors)


def service_claims(audience: str, max_actors: int) -> Callable[[dict[str, Any], KeyRecord, Any], Principal]:
    """The service-token claim rule: ``iss`` owns the key, ``sub``/``act``, ``jti``, ``scope``.

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
        actors: tuple[str, ...] = ()
        if "act" in claims:
            if subject == issuer:
                raise InvalidClaim("'act' is only allowed on delegated tokens (sub != iss)")
            actors = parse_actor_chain(claims["act"], issuer, max_actors)
        elif subject != issuer:
            raise InvalidClaim("a delegated token (sub != iss) needs an 'act' claim", expected="act", actual="absent")
        return make_principal(
            issuer,
            subject,
            actors,
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
    audience: str, *, leeway: float = 30, max_lifetime: int = 900, max_token_bytes: int = 8192, max_actors: int = 4
) -> Profile[Principal]:
    """The profile of meshauth service tokens addressed to ``audience``."""
    return Profile(
        name="service",
        types=frozenset({SERVICE_TOKEN_TYPE}),
        algorithms=frozenset(ALGORITHMS),
        claims=service_claims(audience, max_actors),
        max_token_bytes=max_token_bytes,
        required_claims=REQUIRED_CLAIMS,
        audiences=frozenset({audience}),
        leeway=leeway,
        max_lifetime=max_lifetime,
        typ_refused_hint=_NOT_A_SERVICE_TOKEN,
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
        max_actors: int = 4,
        cache_size: int = 4096,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if not isinstance(audience, str) or not audience:
            raise ValueError("audience must be the non-empty name of this service")
        self.profile = self._profile(audience, leeway, max_lifetime, max_token_bytes, max_actors)
        super().__init__(max_token_bytes=max_token_bytes, clock=clock, cache_size=cache_size)
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.replay_cache = replay_cache
        self.max_actors = max_actors
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self.header_profile = self.profile
        self.selected = (self.profile, keys)

    def _profile(
        self, audience: str, leeway: float, max_lifetime: int, max_token_bytes: int, max_actors: int
    ) -> Profile[Principal]:
        return service_profile(
            audience, leeway=leeway, max_lifetime=max_lifetime, max_token_bytes=max_token_bytes, max_actors=max_actors
        )

    # -- public API -------------------------------------------------------------

    def verify(self, token: str, *, audit: bool = True) -> Principal:
        """Verify ``token`` and return who is calling (sync key lookup).

        ``audit=False`` skips this call's audit record, for callers (such as
        the middleware) that write one record per request themselves.
        """
        return self._verify(token, None, audit)

    async def averify(self, token: str, *, audit: bool = True) -> Principal:
        """Verify ``token``, letting an async key source fetch without blocking the loop."""
        return await self._averify(token, None, audit)

    def _verify(self, token: str, expect: Any, write_audit: bool) -> Principal:
        """One verification inside its span, metrics and audit record (``expect``: per-call profile inputs)."""
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            principal = self.run(token, expect)
        except BaseException as exc:
            error = self._rejected(span, exc, started, write_audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, write_audit)
        return principal

    async def _averify(self, token: str, expect: Any, write_audit: bool) -> Principal:
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            principal = await self.arun(token, expect)
        except BaseException as exc:
            error = self._rejected(span, exc, started, write_audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, write_audit)
        return principal

    # -- engine hooks -------------------------------------------------------------

    def select(self, claims: Mapping[str, Any], kid: str | None) -> tuple[Profile[Principal], KeySource]:
        return self.profile, self.keys

    def first_use(self, principal: Principal, record: KeyRecord, profile: Profile[Principal]) -> None:
        assert self.replay_cache is not None
        try:
            first_use = self.replay_cache.add(principal.caller, principal.token_id, principal.expires_at + self.leeway)
        except MeshAuthError:
            raise
        except Exception as exc:
            # Cannot tell whether the token was used before: refuse, as an outage.
            raise ReplayStoreUnavailable(f"replay cache failed: {type(exc).__name__}") from exc
        if not first_use:
            raise TokenReplayed(
                f"token id {principal.token_id[:64]!r} of {principal.caller!r} was already used: "
                "a token is accepted once with the replay cache on",
                actual=principal.token_id[:64],
                kid=principal.kid,
                caller=principal.caller,
            )

    # -- telemetry ---------------------------------------------------------------

    def _accepted(self, span: trace.Span, principal: Principal, started: float, write_audit: bool) -> None:
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
                actors=principal.actors,
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
