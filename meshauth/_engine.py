"""One verification engine for every compact-JWS token meshauth accepts.

Each token kind is a :class:`Profile`, a frozen value; the checks run once, in
the fixed order of the design (section 2), each on data the previous step
vouched for:

1. size limit (before anything else is looked at);
2. strict compact-JWS syntax and base64url, strict JSON header and payload;
3. header members: forbidden ones refused (the profile may allow a few, such
   as ``x5t`` for identity providers), ``alg`` and ``kid`` present;
4. ``typ``; 5. ``alg`` among the profile's algorithms;
6. the key, by ``kid``, and its validity window; 7. ``alg`` equal to the key's;
8. the signature; 9. the claims (shared rules from the profile, then the
   profile's own rule), and last the replay cache.

Profiles today: service tokens (``meshauth._verify.service_profile``),
response tokens (``meshauth._mutual.response_profile``) and identity
providers' user tokens (``meshauth._idp_tokens.idp_profile``, one per
issuer). A Transaction Token (``txntoken+jwt``, audience = the trust domain,
its own claim rule for ``txn``/``tctx``) is one more :class:`Profile`.

The protocol is written once, in two halves around the one key lookup it
needs: :meth:`Engine.begin` (steps 1-5, and which key to look up) and
:meth:`Engine.finish` (steps 6-9 on the record found). :meth:`Engine.run` and
:meth:`Engine.arun` call both with a sync or async key source; only the lookup
differs. (A generator that yields the lookup reads the same, but resuming it and
catching its ``StopIteration`` costs more than every claim check on a new token.)

.. warning::
   The algorithm comes from the key record, never from the token. Tokens
   carrying ``jku``, ``jwk``, ``x5u``, ``x5c``, ``crit`` and similar header
   members are rejected outright; no URL or key from a token is used.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from ._cache import VerifiedTokens
from ._exceptions import (
    BadSignature,
    InvalidClaim,
    KeyExpired,
    KeysUnavailable,
    LifetimeTooLong,
    MalformedToken,
    MeshAuthError,
    MissingClaim,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongTokenType,
)
from ._jws import b64url_decode, b64url_decode_or_none, loads_object, split_compact, token_too_large
from ._keys import KeyRecord
from ._registry import KeySource

__all__ = [
    "FORBIDDEN_HEADER_MEMBERS",
    "MAX_LEEWAY",
    "MAX_NUMERIC_DATE",
    "Begun",
    "Engine",
    "Profile",
    "ago",
    "frozen_claims",
    "iso",
    "typ_of",
]

FORBIDDEN_HEADER_MEMBERS: Final = frozenset(
    {"jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "cty", "enc"}
)
MAX_NUMERIC_DATE: Final = 2**53
MAX_LEEWAY: Final = 300
MAX_KID_LENGTH: Final = 256
_HEADER_CACHE_SIZE: Final = 512
# Like COMPACT_RE, but the signature may be empty, so that an unsigned token
# ("alg": "none") is reported as unsupported_alg rather than malformed.
COMPACT_UNSIGNED_RE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

P = TypeVar("P")  # what a profile's claim rule returns: the principal

Verified = tuple[P, float, KeyRecord, KeySource]
"""A verified-token cache entry: the principal, usable until, the key record and its source."""

Begun = tuple["Profile[Any]", KeySource, str, "str | None", dict[str, Any], bytes, bytes]
"""What :meth:`Engine.begin` hands :meth:`Engine.finish`: profile, key source, ``alg``, ``kid``,
the (unverified) claims, the signing input and the signature."""


# -- words for people --------------------------------------------------------------


def iso(timestamp: float) -> str:
    """A NumericDate as ISO 8601 UTC, to the second (``2026-12-05T00:47:14Z``)."""
    try:
        return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:.0f} (out of range)"


def ago(seconds: float) -> str:
    """A duration in whole seconds, for messages."""
    return f"{int(abs(seconds))} s"  # whole seconds elapsed, never rounded up


def typ_of(value: Any) -> str | None:
    """A ``typ`` header value, lower case, without an ``application/`` prefix (RFC 7515 section 4.1.9)."""
    if not isinstance(value, str):
        return None
    typ = value.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_summary(source: KeySource, clock: Callable[[], float]) -> str:
    """The key set's size and age in words ("12 keys, read 40 s ago"), from its ``status()``."""
    report = getattr(source, "status", None)
    if report is None:
        return "a key set"
    try:
        status = report()
    except Exception:  # a summary for a message: never let it replace the real error
        return "a key set"
    keys = status.get("keys")
    words = f"{keys} key{'' if keys == 1 else 's'}" if isinstance(keys, int) else "a key set"
    age = status.get("age")
    loaded_at = status.get("loaded_at")
    if isinstance(age, int | float):
        words += f", fetched {ago(age)} ago"
    elif isinstance(loaded_at, int | float):
        words += f", read {ago(time.time() - loaded_at)} ago"
    return words


# -- the profile -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Profile(Generic[P]):
    """One kind of token: the data that tells the engine what to accept.

    ``claims`` is the profile's own claim rule, run after the shared ones
    (required members, dates, lifetime, audience): it gets the payload, the key
    record and the per-call ``expect`` value of the driver, and returns the
    principal (or raises a :class:`~meshauth.TokenError`).
    """

    name: str
    types: frozenset[str]
    """Accepted ``typ`` values, lower case without ``application/``."""
    algorithms: frozenset[str]
    claims: Callable[[dict[str, Any], KeyRecord, Any], P]
    typ_required: bool = True
    allowed_header_members: frozenset[str] = frozenset()
    """Members of :data:`FORBIDDEN_HEADER_MEMBERS` tolerated (and ignored) by this profile."""
    kid_required: bool = True
    max_token_bytes: int = 8192
    integer_dates: bool = True
    """NumericDate rule: JSON integers only (meshauth tokens), or any finite number (RFC 7519)."""
    required_claims: tuple[str, ...] = ("iss", "sub", "aud", "iat", "exp", "jti")
    audiences: frozenset[str] = frozenset()
    audience_claim: str = "aud"
    single_audience: bool = True
    """``aud`` names exactly one audience (meshauth), or any element may match (identity providers)."""
    leeway: float = 30
    max_lifetime: int | None = 900
    typ_refused_hint: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Extra words for a refused ``typ`` (e.g. a service token sent where a user token belongs)."""
    issuer: str | None = None
    """The configured identity provider (IdP profiles): named on every refusal after it was selected."""
    required: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY} seconds, got {self.leeway!r}")
        if self.max_lifetime is not None and self.max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        if self.max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be positive")
        object.__setattr__(self, "required", frozenset(self.required_claims))

    @property
    def forbidden(self) -> frozenset[str]:
        return FORBIDDEN_HEADER_MEMBERS - self.allowed_header_members


# -- header and payload ----------------------------------------------------------------


def decode_header(header_b64: str, profile: Profile[Any]) -> tuple[str, str | None]:
    """Strictly decode a JOSE header segment and apply the profile's header rules: ``(alg, kid)``."""
    header = loads_object(b64url_decode(header_b64, "header", checked=True), "header")
    forbidden = profile.forbidden.intersection(header)
    if forbidden:
        raise MalformedToken(
            "the header carries a member this token kind must not have",
            expected=f"none of {', '.join(sorted(profile.forbidden))}",
            actual=sorted(forbidden),
        )
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise MalformedToken("the header has no 'alg'", expected="string", actual=type(alg).__name__)
    kid = header.get("kid")
    if kid is not None or profile.kid_required:
        if not isinstance(kid, str) or not kid:
            raise MalformedToken("the header has no 'kid'", expected="string", actual=type(kid).__name__)
        if len(kid) > MAX_KID_LENGTH:
            raise MalformedToken(
                "the header 'kid' is too long", expected=f"<= {MAX_KID_LENGTH} characters", actual=len(kid)
            )
    if "typ" in header or profile.typ_required:
        typ = typ_of(header.get("typ"))
        if typ not in profile.types:
            raw = header.get("typ")
            found = _clip(raw) if isinstance(raw, str) else ("nothing" if raw is None else type(raw).__name__)
            raise WrongTokenType(
                f"this is not a {profile.name} token{profile.typ_refused_hint.get(typ or '', '')}",
                expected=" or ".join(sorted(profile.types)),
                actual=found,
                kid=kid,
            )
    if alg not in profile.algorithms:
        # "none", HS256 (an HMAC keyed with a public key) and the rest.
        raise UnsupportedAlgorithm(
            f"algorithm not allowed for {profile.name} tokens",
            expected=sorted(profile.algorithms),
            actual=_clip(alg, 32),
            kid=kid,
        )
    return alg, kid


def numeric_date(claims: Mapping[str, Any], name: str, integer: bool) -> float:
    """A NumericDate claim, checked by the profile's rule; ``InvalidClaim`` otherwise."""
    value = claims[name]
    # bool is an int subclass and floats may be NaN or huge: only plain
    # numbers in 0..2^53 (integers, for meshauth tokens) are dates here.
    allowed = (int,) if integer else (int, float)
    if type(value) not in allowed or not 0 <= value <= MAX_NUMERIC_DATE:
        raise InvalidClaim(
            f"'{name}' must be {'an integer' if integer else 'a'} NumericDate (seconds since 1970)",
            expected=f"{'integer' if integer else 'number'} in 0..2^53",
            actual=value if type(value) in (int, float) else type(value).__name__,
        )
    return value  # type: ignore[no-any-return]


def nonempty_str(claims: Mapping[str, Any], name: str, limit: int = 1024) -> str:
    """A claim that must be a non-empty string of at most ``limit`` characters."""
    value = claims[name]
    if type(value) is str and 0 < len(value) <= limit:
        return value  # the common case, without building any words
    if not isinstance(value, str) or not value:
        raise InvalidClaim(f"'{name}' must be a non-empty string", expected="string", actual=type(value).__name__)
    if len(value) > limit:
        raise InvalidClaim(f"'{name}' is too long", expected=f"<= {limit} characters", actual=len(value))
    return value


def _freeze(value: Any) -> Any:
    if type(value) is dict:
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if type(value) is list:
        return tuple(_freeze(item) for item in value)
    return value


def frozen_claims(claims: dict[str, Any]) -> Mapping[str, Any]:
    """A read-only view of the claims, nested objects and arrays included.

    A verified principal is shared through the verified-token cache, so one
    request must not be able to change what the next one sees.
    """
    for value in claims.values():
        if type(value) is dict or type(value) is list:
            return _freeze(claims)  # type: ignore[no-any-return]
    return MappingProxyType(claims)


# -- the shared claim rules ----------------------------------------------------------------


def check_audience(profile: Profile[Any], claims: Mapping[str, Any]) -> str:
    """The audience the token is for, one of ``profile.audiences``; ``WrongAudience`` otherwise."""
    name = profile.audience_claim
    found = claims[name]
    if type(found) is str and found in profile.audiences:
        return found  # the common case, without building any words
    values = found if type(found) is list else [found]
    wanted = sorted(profile.audiences)
    expected = " or ".join(repr(audience) for audience in wanted)
    expected_value: str | list[str] = wanted[0] if len(wanted) == 1 else wanted
    if profile.single_audience and len(values) != 1:
        raise WrongAudience(
            f"'{name}' must name exactly one audience, {expected}; it names {len(values)}",
            expected=expected_value,
            actual=f"{len(values)} audiences",
        )
    if not all(isinstance(item, str) for item in values):
        raise InvalidClaim(f"'{name}' must be a string or a list of strings", actual=type(found).__name__)
    for value in values:
        if value in profile.audiences:
            return value  # type: ignore[no-any-return]
    shown = repr(_clip(values[0])) if len(values) == 1 else f"{len(values)} audiences"
    raise WrongAudience(
        f"the token is for {shown}, not for {expected}: the caller must ask for a token for {expected}",
        expected=expected_value,
        actual=_clip(values[0]) if len(values) == 1 else f"{len(values)} audiences",
    )


def check_dates(profile: Profile[Any], claims: Mapping[str, Any], now: float) -> tuple[float, float | None]:
    """``exp`` and ``iat``, checked against ``now`` with the profile's leeway and lifetime."""
    integer = profile.integer_dates
    exp = claims["exp"]
    iat = claims.get("iat")
    # Plain integers in range (every meshauth token) skip the general rule's call.
    if type(exp) is not int or not 0 <= exp <= MAX_NUMERIC_DATE:
        exp = numeric_date(claims, "exp", integer)
    if iat is not None and (type(iat) is not int or not 0 <= iat <= MAX_NUMERIC_DATE):
        iat = numeric_date(claims, "iat", integer)
    elif iat is None and "iat" in claims:
        iat = numeric_date(claims, "iat", integer)  # null: refused
    nbf = numeric_date(claims, "nbf", integer) if "nbf" in claims else None
    leeway = profile.leeway
    if iat is not None:
        if exp < iat:
            raise InvalidClaim(
                f"'exp' ({iso(exp)}) is before 'iat' ({iso(iat)})", expected=f">= {iat:.0f}", actual=f"{exp:.0f}"
            )
        if profile.max_lifetime is not None and exp - iat > profile.max_lifetime:
            raise LifetimeTooLong(
                f"the token lives {exp - iat:.0f} s, more than the {profile.max_lifetime} s this verifier allows: "
                "mint shorter-lived tokens",
                expected=f"<= {profile.max_lifetime} s",
                actual=f"{exp - iat:.0f} s",
            )
    if now >= exp + leeway:
        raise TokenExpired(
            f"the token expired {iso(exp)}, {ago(now - exp)} ago (now {iso(now)}, leeway {leeway:g} s)",
            expected=f"exp after {iso(now - leeway)}",
            actual=f"exp {iso(exp)}",
        )
    if iat is not None and iat > now + leeway:
        raise TokenNotYetValid(
            f"issued {ago(iat - now)} in the future ({iso(iat)}, now {iso(now)}): the caller's clock is ahead "
            f"of this host (leeway {leeway:g} s); check NTP",
            expected=f"iat before {iso(now + leeway)}",
            actual=f"iat {iso(iat)}",
        )
    if nbf is not None and nbf > now + leeway:
        raise TokenNotYetValid(
            f"not valid before {iso(nbf)}, {ago(nbf - now)} from now (now {iso(now)}, leeway {leeway:g} s): "
            "the caller's clock is ahead of this host or the token is not meant for use yet",
            expected=f"nbf before {iso(now + leeway)}",
            actual=f"nbf {iso(nbf)}",
        )
    return exp, iat


def check_key_window(record: KeyRecord, now: float, leeway: float) -> None:
    """``KeyExpired`` when ``now`` is outside the key's ``nbf``/``exp`` window (plus leeway)."""
    if record.valid_at(now, leeway):
        return
    kid = _clip(record.kid, 16)
    if record.expires is not None and now >= record.expires + leeway:
        raise KeyExpired(
            f"key {kid} of {record.owner!r} expired {iso(record.expires)} ({ago(now - record.expires)} ago, "
            f"leeway {leeway:g} s): the caller signs with a retired key",
            expected=f"key exp after {iso(now - leeway)}",
            actual=f"key exp {iso(record.expires)}",
            kid=record.kid,
        )
    not_before = record.not_before if record.not_before is not None else now
    raise KeyExpired(
        f"key {kid} of {record.owner!r} is not valid before {iso(not_before)} (in {ago(not_before - now)}, "
        f"leeway {leeway:g} s): the caller uses a key published for later",
        expected=f"key nbf before {iso(now + leeway)}",
        actual=f"key nbf {iso(not_before)}",
        kid=record.kid,
    )


# -- the engine -------------------------------------------------------------------------------


class Engine(Generic[P]):
    """Runs the checks of a :class:`Profile` on compact-JWS tokens (see the module docstring).

    Subclasses pick the profile and key source for a token (:meth:`select`) and
    wrap :meth:`run` / :meth:`arun` in their telemetry. A token that verified
    once is answered from a bounded cache, keyed by the exact token string,
    until it is no longer usable or its key source stops serving that record.
    """

    max_token_bytes: int
    clock: Callable[[], float]
    header_profile: Profile[P]
    """The profile whose header rules apply before the payload is read (set by subclasses)."""
    selected: tuple[Profile[P], KeySource] | None = None
    """The one profile and key source of an engine with a single token kind; else :meth:`select` chooses."""
    replay_cache: Any = None
    """A replay cache (service tokens): with one, a cached verification never answers again."""

    def __init__(self, *, max_token_bytes: int, clock: Callable[[], float], cache_size: int) -> None:
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        self.cache_size = cache_size
        # exact token string -> (principal, usable until, key record, key source)
        self._cache: VerifiedTokens[Verified[P]] = VerifiedTokens(cache_size, clock)
        self._verified = self._cache.entries  # read directly on the hot path
        # header segment -> (alg, kid) for headers that passed the strict checks
        self._headers: dict[str, tuple[str, str | None]] = {}

    # -- what subclasses decide -----------------------------------------------------

    def select(self, claims: Mapping[str, Any], kid: str | None) -> tuple[Profile[P], KeySource]:
        """The profile and key source for a token (the payload is not verified yet)."""
        raise NotImplementedError

    def first_use(self, principal: P) -> None:
        """With a replay cache: refuse a token already accepted once (runs after every other check)."""

    async def afirst_use(self, principal: P) -> None:
        """:meth:`first_use` for the async driver (a networked replay store must not block the loop)."""
        self.first_use(principal)

    # -- drivers ---------------------------------------------------------------------------

    def run(self, token: str, expect: Any = None) -> P:
        """Verify ``token`` with a sync key lookup."""
        if type(token) is not str:
            token = self._coerce(token)
        entry = self._verified.get(token)
        if (
            entry is not None
            and self.replay_cache is None
            and self.clock() < entry[1]
            and _lookup(entry[3], entry[2].kid) is entry[2]
        ):
            return entry[0]
        begun = self.begin(token)
        principal, entry = self.finish(expect, begun, _lookup(begun[1], begun[3]))
        if self.replay_cache is not None:
            self.first_use(principal)
        self._cache.put(token, entry)
        return principal

    async def arun(self, token: str, expect: Any = None) -> P:
        """Verify ``token``, letting an async key source fetch without blocking the loop."""
        if type(token) is not str:
            token = self._coerce(token)
        entry = self._verified.get(token)
        if (
            entry is not None
            and self.replay_cache is None
            and self.clock() < entry[1]
            and await _alookup(entry[3], entry[2].kid) is entry[2]
        ):
            return entry[0]
        begun = self.begin(token)
        principal, entry = self.finish(expect, begun, await _alookup(begun[1], begun[3]))
        if self.replay_cache is not None:
            await self.afirst_use(principal)
        self._cache.put(token, entry)
        return principal

    # -- the protocol ------------------------------------------------------------------------

    def begin(self, token: str) -> Begun:
        """Steps 1-5 (see :meth:`parse`), and the profile and key source that judge the rest."""
        (alg, kid), claims, signing_input, signature = self.parse(token)
        profile, source = self.selected or self.select(claims, kid)
        if profile is not self.header_profile:  # chosen by the payload: its own limits apply too
            try:
                _check_selected(profile, token, alg, kid)
            except TokenError as exc:
                exc.issuer = profile.issuer
                raise
        return profile, source, alg, kid, claims, signing_input, signature

    def finish(self, expect: Any, begun: Begun, record: KeyRecord | None) -> tuple[P, Verified[P]]:
        """Steps 6-9 on the key record the driver looked up, up to the replay check the driver makes last.

        Returns the principal and the verified-token cache entry the driver stores once the replay
        check (if any) passed.
        """
        profile, source, alg, kid, claims, signing_input, signature = begun
        try:
            record = self.check_key(profile, source, alg, kid, record, claims)
            if not record.verify_signature(signature, signing_input):
                raise BadSignature(
                    f"the signature does not verify with key {_clip(record.kid, 16)} of {record.owner!r}",
                    kid=record.kid,
                )
            try:
                principal, usable_until = self.check_claims(profile, claims, record, expect)
            except TokenError as exc:
                exc.kid = record.kid
                iss = claims.get("iss")
                if type(iss) is str and iss == record.owner:
                    exc.caller = iss
                raise
        except TokenError as exc:
            exc.issuer = profile.issuer
            raise
        return principal, (principal, usable_until, record, source)

    def parse(self, token: str) -> tuple[tuple[str, str | None], dict[str, Any], bytes, bytes]:
        """Steps 1-5: size, syntax, strict base64url and JSON, header rules; nothing verified yet."""
        if len(token) > self.max_token_bytes:
            raise token_too_large(len(token), self.max_token_bytes)
        # Fast path for the common case: a header already seen and validated,
        # and two segments that decode strictly (no '+', '/' or '=' anywhere,
        # so the standard-alphabet strict decoder accepts base64url only).
        # Anything unusual falls through to the exact checks below.
        segments = token.split(".")
        if len(segments) == 3 and "+" not in token and "/" not in token and "=" not in token:
            header = self._headers.get(segments[0])
            if header is not None:
                payload_bytes = b64url_decode_or_none(segments[1])
                signature = b64url_decode_or_none(segments[2])
                if payload_bytes is not None and signature is not None:
                    signing_input = token[: len(segments[0]) + 1 + len(segments[1])].encode("ascii")
                    return header, loads_object(payload_bytes, "payload"), signing_input, signature
        profile = self.header_profile
        header_b64, payload_b64, signature_b64 = split_compact(token, self.max_token_bytes, COMPACT_UNSIGNED_RE)
        header = self._headers.get(header_b64)
        if header is None:
            header = decode_header(header_b64, profile)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[header_b64] = header
        if not signature_b64:
            raise MalformedToken("the signature segment is empty", kid=header[1])
        payload = loads_object(b64url_decode(payload_b64, "payload", checked=True), "payload")
        signature = b64url_decode(signature_b64, "signature", checked=True)
        return header, payload, token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii"), signature

    def check_key(  # noqa: PLR0917 - positional on purpose: this runs on every new token
        self,
        profile: Profile[P],
        source: KeySource,
        alg: str,
        kid: str | None,
        record: KeyRecord | None,
        claims: Mapping[str, Any],
    ) -> KeyRecord:
        """Steps 6-7: the key exists, is inside its window, and is bound to the header's ``alg``."""
        if record is None:
            iss = claims.get("iss")
            claimed = f"; the token claims to come from {_clip(iss)!r} (unverified)" if isinstance(iss, str) else ""
            if kid is None:
                raise UnknownKey(
                    f"the token names no 'kid' and the key set ({_source_summary(source, self.clock)}) does not "
                    f"hold exactly one key usable with {alg}{claimed}",
                    expected="a 'kid' header",
                    actual="no kid",
                )
            raise UnknownKey(
                f"no key {_clip(kid)!r} in {_source_summary(source, self.clock)}{claimed}: the caller's key is "
                "not published (yet), or was revoked",
                actual=_clip(kid),
                kid=kid,
            )
        if not record.valid_at(self.clock(), profile.leeway):
            check_key_window(record, self.clock(), profile.leeway)
        if alg != record.alg:
            raise UnsupportedAlgorithm(
                f"the header says {_clip(alg, 32)} but key {_clip(record.kid, 16)} is bound to {record.alg}",
                expected=record.alg,
                actual=_clip(alg, 32),
                kid=record.kid,
            )
        return record

    def check_claims(
        self, profile: Profile[P], claims: dict[str, Any], record: KeyRecord, expect: Any
    ) -> tuple[P, float]:
        """Step 9: the profile's shared claim rules, then its own; the principal and how long it is usable."""
        if not claims.keys() >= profile.required:
            missing = [name for name in profile.required_claims if name not in claims]
            raise MissingClaim(
                f"required claims are absent: {', '.join(missing)}",
                expected=missing,
                actual="absent",
            )
        audience = claims[profile.audience_claim]
        if type(audience) is not str or audience not in profile.audiences:
            check_audience(profile, claims)
        exp, _ = check_dates(profile, claims, self.clock())
        principal = profile.claims(claims, record, expect)
        usable_until = exp + profile.leeway
        if record.expires is not None:
            usable_until = min(usable_until, record.expires + profile.leeway)
        return principal, usable_until

    def _coerce(self, token: object) -> str:
        """Accept bytes-like tokens as ASCII text; anything else is malformed."""
        if isinstance(token, bytes | bytearray):
            if len(token) > self.max_token_bytes:
                raise token_too_large(len(token), self.max_token_bytes)
            try:
                return bytes(token).decode("ascii")
            except UnicodeDecodeError:
                raise MalformedToken("token is not ASCII") from None
        raise MalformedToken("token must be a string", expected="str", actual=type(token).__name__)

    def clear_cache(self) -> None:
        """Forget every verified token (e.g. after revoking a key out of band)."""
        self._cache.clear()
        self._headers.clear()


def _check_selected(profile: Profile[Any], token: str, alg: str, kid: str | None) -> None:
    """The size and algorithm rules of a profile chosen after the header was read (one issuer's)."""
    if len(token) > profile.max_token_bytes:
        raise token_too_large(len(token), profile.max_token_bytes)
    if alg not in profile.algorithms:
        raise UnsupportedAlgorithm(
            f"algorithm not allowed for {profile.name} tokens", expected=sorted(profile.algorithms), actual=alg, kid=kid
        )


# -- key lookups: the only part the two drivers do differently ----------------------------


def _sole_key(source: KeySource) -> KeyRecord | None:
    """The key set's only key, or ``None`` when it holds none or several (a token without ``kid``)."""
    keyset = getattr(source, "keyset", None)
    if keyset is None:
        return None
    records = list(keyset)
    return records[0] if len(records) == 1 else None


def _lookup(source: KeySource, kid: str | None) -> KeyRecord | None:
    """The source's record for ``kid``; a failing source is an outage, not a bad token."""
    try:
        if kid is None:
            source.get_key("")  # loads the set when it was never read; "" is never a kid
            return _sole_key(source)
        return source.get_key(kid)
    except MeshAuthError:
        raise
    except Exception as exc:
        raise KeysUnavailable(f"key source failed: {type(exc).__name__}") from exc


async def _alookup(source: KeySource, kid: str | None) -> KeyRecord | None:
    try:
        if kid is None:
            await source.aget_key("")
            return _sole_key(source)
        return await source.aget_key(kid)
    except MeshAuthError:
        raise
    except Exception as exc:
        raise KeysUnavailable(f"key source failed: {type(exc).__name__}") from exc
