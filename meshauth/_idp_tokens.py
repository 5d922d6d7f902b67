"""End users' tokens from identity providers (IdPs): the IdP profile on the engine.

An IdP signs with its own keys (often RSA), writes ``typ: JWT``, ``at+jwt`` or
no ``typ`` at all, and puts audience, groups and scopes in claims that differ
from one provider to the next. Each configured issuer becomes one
:class:`~meshauth._engine.Profile`; the engine runs the same checks, in the
same order, as for service tokens. What differs is data:

* header: ``x5t`` and ``x5t#S256`` are allowed (and ignored); a token without
  ``kid`` is accepted only when the issuer's key set holds exactly one key;
* the unverified ``iss`` selects the configured issuer (its key set, its
  algorithms, its size limit); nothing else in the payload is trusted before
  the signature;
* dates may be fractional (RFC 7519), there is no lifetime limit;
* ``audience`` is a string or a list, read from ``audience_claim`` (``aud``,
  or ``client_id`` for Cognito access tokens), any element may match;
* ``groups_claim`` is a dotted path (``realm_access.roles``), ``scope_claims``
  name the claims holding scopes (``scope``, ``scp``, ``permissions``) and
  ``require`` pins exact claim values (``{"token_use": "access"}``).

.. warning::
   The algorithm is chosen by configuration and key, never by the token. A URL
   or key found in a token is never used.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import Any, Final, Protocol

from opentelemetry import metrics, trace

from ._engine import Engine, Profile, frozen_claims, nonempty_str
from ._exceptions import InvalidClaim, IssuerMismatch, MissingClaim
from ._idp_keys import IDP_ALGORITHMS
from ._keys import KeyRecord
from ._registry import KeySource
from ._telemetry import Telemetry, fail_closed

__all__ = [
    "DEFAULT_IDP_TOKEN_BYTES",
    "IDP_TOKEN_ALGORITHMS",
    "IssuerOptions",
    "UserPrincipal",
    "UserTokenVerifier",
    "idp_profile",
]

IDP_TOKEN_ALGORITHMS: Final = IDP_ALGORITHMS
DEFAULT_IDP_TOKEN_BYTES: Final = 16384
_USER_TOKEN_TYPES: Final = frozenset({"jwt", "at+jwt"})
_SERVICE_TYPES_HINT: Final = {
    "meshauth+jwt": " (service tokens are not accepted here)",
    "meshauth-response+jwt": " (response tokens are not accepted here)",
}
_CERTIFICATE_HINTS: Final = frozenset({"x5t", "x5t#S256"})


@dataclasses.dataclass(frozen=True, slots=True)
class UserPrincipal:
    """An end user, as proven by a verified IdP token.

    ``groups`` come from the issuer's ``groups_claim``; ``scopes`` from its
    ``scope_claims`` together (space-separated strings or lists).
    """

    issuer: str
    subject: str
    audience: str
    groups: frozenset[str]
    scopes: frozenset[str]
    token_id: str | None
    expires_at: float
    kid: str
    alg: str
    claims: Mapping[str, Any] = dataclasses.field(hash=False, compare=False, repr=False)


class IssuerOptions(Protocol):
    """What the IdP profile reads from an issuer's configuration (the gateway's ``IssuerConfig``)."""

    @property
    def issuer(self) -> str: ...
    @property
    def audience(self) -> str | Sequence[str]: ...
    @property
    def algorithms(self) -> Sequence[str]: ...
    @property
    def leeway(self) -> float: ...
    @property
    def audience_claim(self) -> str: ...
    @property
    def groups_claim(self) -> str: ...
    @property
    def scope_claims(self) -> Sequence[str]: ...
    @property
    def require(self) -> Mapping[str, Any]: ...
    @property
    def max_token_bytes(self) -> int: ...


def _claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``realm_access.roles``); a literal name with dots wins; ``None`` if absent."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _strings(value: Any, name: str, *, split: bool) -> frozenset[str]:
    if name == "scope" and not isinstance(value, str):  # RFC 8693 section 4.2: one space-separated string
        raise InvalidClaim("'scope' must be a space-separated string", actual=type(value).__name__)
    if isinstance(value, str):
        return frozenset(value.split()) if split else frozenset({value})
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise InvalidClaim(f"'{name}' must be a string or a list of strings", actual=type(value).__name__)


def _check_required(claims: Mapping[str, Any], require: Mapping[str, Any]) -> None:
    for name, wanted in require.items():
        allowed = list(wanted) if isinstance(wanted, list | tuple) else [wanted]
        if name not in claims:
            raise MissingClaim(
                f"the issuer's tokens must carry '{name}' = {' or '.join(map(repr, allowed))}; this one has none "
                "(an ID token sent as an access token?)",
                expected=allowed[0] if len(allowed) == 1 else allowed,
                actual="absent",
            )
        found = claims[name]
        if found not in allowed or type(found) is bool:
            shown = repr(found)[:64] if isinstance(found, str | int | float) else type(found).__name__
            raise InvalidClaim(
                f"'{name}' is {shown}, this gateway accepts {' or '.join(map(repr, allowed))} "
                "(an ID token sent as an access token?)",
                expected=allowed[0] if len(allowed) == 1 else allowed,
                actual=shown,
            )


def idp_claims(options: IssuerOptions) -> Callable[[dict[str, Any], KeyRecord, Any], UserPrincipal]:
    """The claim rule of one issuer: ``iss``, ``sub``, ``require``, groups and scopes."""
    audiences = _audiences(options.audience)

    def check(claims: dict[str, Any], record: KeyRecord, expect: Any) -> UserPrincipal:
        if claims["iss"] != options.issuer:  # selected by it: a defect if it differs
            raise IssuerMismatch("'iss' is not the configured issuer", expected=options.issuer)
        subject = nonempty_str(claims, "sub")
        _check_required(claims, options.require)
        groups_value = _claim_at(claims, options.groups_claim)
        groups = _strings(groups_value, options.groups_claim, split=False) if groups_value is not None else frozenset()
        scopes: frozenset[str] = frozenset()
        for name in options.scope_claims:
            if name in claims:
                scopes |= _strings(claims[name], name, split=True)
        if any(not scope or any(ch.isspace() for ch in scope) for scope in scopes):
            raise InvalidClaim("scopes must be non-empty strings without spaces")
        audience = claims[options.audience_claim]
        found = audience if isinstance(audience, list) else [audience]
        jti = claims.get("jti")
        return UserPrincipal(
            issuer=options.issuer,
            subject=subject,
            audience=next(value for value in found if value in audiences),
            groups=groups,
            scopes=scopes,
            token_id=jti if isinstance(jti, str) and jti else None,
            expires_at=float(claims["exp"]),
            kid=record.kid,
            alg=record.alg,
            claims=frozen_claims(claims),
        )

    return check


def _audiences(audience: str | Sequence[str]) -> frozenset[str]:
    return frozenset({audience}) if isinstance(audience, str) else frozenset(audience)


def idp_profile(options: IssuerOptions) -> Profile[UserPrincipal]:
    """The profile of one identity provider's user tokens (see the module docstring)."""
    bad = [alg for alg in options.algorithms if alg not in IDP_TOKEN_ALGORITHMS]
    if bad:
        raise ValueError(f"unsupported algorithms {bad!r} for issuer {options.issuer!r}")
    return Profile(
        name="user",
        types=_USER_TOKEN_TYPES,
        typ_required=False,
        algorithms=frozenset(options.algorithms),
        claims=idp_claims(options),
        allowed_header_members=_CERTIFICATE_HINTS,
        kid_required=False,
        max_token_bytes=options.max_token_bytes,
        integer_dates=False,
        required_claims=("iss", "sub", "exp", options.audience_claim),
        audiences=_audiences(options.audience),
        audience_claim=options.audience_claim,
        single_audience=False,
        leeway=options.leeway,
        max_lifetime=None,
        typ_refused_hint=_SERVICE_TYPES_HINT,
        issuer=options.issuer,
    )


class UserTokenVerifier(Engine[UserPrincipal]):
    """Checks end users' IdP tokens against the configured issuers.

    Every call returns a :class:`UserPrincipal` or raises a
    :class:`~meshauth.TokenError` with a design reason code (``issuer`` set to
    the configured issuer the token was judged against, once known), or
    :class:`~meshauth.KeysUnavailable` when an issuer's key set cannot be had.
    A token that verified once is answered from a bounded cache until it
    expires (plus leeway) or its issuer stops serving the key it was signed
    with. Each call is one ``meshauth.verify`` span and one point on the
    ``meshauth.verify.*`` metrics; the gateway writes the audit record.
    """

    def __init__(
        self,
        issuers: Iterable[IssuerOptions],
        keys: Mapping[str, KeySource],
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        configured = {options.issuer: options for options in issuers}
        missing = [name for name in configured if name not in keys]
        if missing:
            raise ValueError(f"no key source for issuers {missing!r}")
        self.profiles = {name: (idp_profile(options), keys[name]) for name, options in configured.items()}
        limit = max((profile.max_token_bytes for profile, _ in self.profiles.values()), default=DEFAULT_IDP_TOKEN_BYTES)
        super().__init__(max_token_bytes=limit, clock=clock, cache_size=cache_size)
        self.keys = dict(keys)
        # The header rules before an issuer is known: every issuer's algorithms.
        algorithms = frozenset(alg for profile, _ in self.profiles.values() for alg in profile.algorithms)
        first = next(iter(self.profiles.values()))[0] if self.profiles else idp_profile(_NoIssuer())
        self.header_profile = dataclasses.replace(first, algorithms=algorithms or first.algorithms)
        self.telemetry = Telemetry(tracer_provider, meter_provider)

    def select(self, claims: Mapping[str, Any], kid: str | None) -> tuple[Profile[UserPrincipal], KeySource]:
        iss = claims.get("iss")
        if iss is None:
            raise MissingClaim("the token names no issuer", expected="iss", actual="absent", kid=kid)
        if not isinstance(iss, str):
            raise InvalidClaim("'iss' must be a string", expected="string", actual=type(iss).__name__, kid=kid)
        selected = self.profiles.get(iss)
        if selected is None:
            raise IssuerMismatch(
                f"the token's issuer {iss[:64]!r} is not configured here",
                expected=sorted(self.profiles),
                actual=iss[:64],
                kid=kid,
            )
        return selected

    async def averify(self, token: str) -> UserPrincipal:
        """Verify ``token``; see the module docstring for the rules."""
        started = perf_counter()
        span = self.telemetry.start_span("meshauth.verify")
        try:
            principal = await self.arun(token)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                span.end()
                raise
            error = fail_closed(exc)
            self.telemetry.rejected(span, error, started, audience=None, caller=error.issuer)
            raise error from error.__cause__
        self.telemetry.accepted(
            span, started, principal.issuer, principal.subject, principal.audience, principal.kid, principal.alg
        )
        return principal


@dataclasses.dataclass(frozen=True)
class _NoIssuer:
    """Issuer options for a verifier with no issuer configured (it refuses every token)."""

    issuer: str = "-"
    audience: str = "-"
    algorithms: tuple[str, ...] = ("RS256",)
    leeway: float = 30
    audience_claim: str = "aud"
    groups_claim: str = "groups"
    scope_claims: tuple[str, ...] = ("scope", "scp")
    require: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_token_bytes: int = DEFAULT_IDP_TOKEN_BYTES
