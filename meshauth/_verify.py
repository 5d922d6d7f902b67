"""Token verification: the rules of the meshauth service-token profile.

The checks run in a fixed order, each on data the previous step vouched for:

1. size limit (before anything else is looked at);
2. strict compact-JWS syntax and base64url, strict JSON header and payload;
3. header: forbidden members, ``typ``, ``alg`` in the allowed set;
4. ``kid`` lookup in the registry and the key's validity window;
5. header ``alg`` equal to the algorithm bound to the key;
6. the signature;
7. the claims: required members and types, issuer = key owner, actor chain,
   audience, time, lifetime, and finally the replay cache.

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
from types import MappingProxyType
from typing import Any, Final

from opentelemetry import metrics, trace

from ._cache import VerifiedTokens
from ._exceptions import (
    BadSignature,
    InvalidClaim,
    IssuerMismatch,
    KeysUnavailable,
    LifetimeTooLong,
    MalformedToken,
    MeshAuthError,
    MissingClaim,
    ReplayStoreUnavailable,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongTokenType,
)
from ._jws import b64url_decode, b64url_decode_or_none, loads_object, split_compact, token_too_large
from ._keys import ALGORITHMS, KeyRecord
from ._principal import Principal, make_principal
from ._registry import KeySource
from ._replay import ReplayCache
from ._telemetry import AUDIT_LOGGER, Telemetry, audit, fail_closed

__all__ = ["RESPONSE_TOKEN_TYPE", "SERVICE_TOKEN_TYPE", "Verifier"]

SERVICE_TOKEN_TYPE: Final = "meshauth+jwt"  # noqa: S105 - a media type, not a secret
RESPONSE_TOKEN_TYPE: Final = "meshauth-response+jwt"  # noqa: S105 - a media type

FORBIDDEN_HEADER_MEMBERS: Final = frozenset(
    {"jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "cty", "enc"}
)
REQUIRED_CLAIMS: Final = ("iss", "sub", "aud", "iat", "exp", "jti")
MAX_NUMERIC_DATE: Final = 2**53
MAX_JTI_LENGTH: Final = 256
MAX_LEEWAY: Final = 300
_HEADER_CACHE_SIZE: Final = 512
_NO_SCOPES: Final[frozenset[str]] = frozenset()


def decode_header(header_b64: str) -> dict[str, Any]:
    """Strictly decode a JOSE header segment; one carrying a forbidden member is malformed."""
    header = loads_object(b64url_decode(header_b64, "header", checked=True), "header")
    forbidden = FORBIDDEN_HEADER_MEMBERS.intersection(header)
    if forbidden:
        raise MalformedToken(
            "header carries a forbidden member",
            expected="none of jku, jwk, x5u, x5c, crit, ...",
            actual=sorted(forbidden),
        )
    return header


def header_alg(header: Mapping[str, Any]) -> str:
    """The header's ``alg``, a non-empty string (whether it is allowed is the caller's rule)."""
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise MalformedToken("header has no 'alg'", expected="string", actual=type(alg).__name__)
    return alg


def header_kid(header: Mapping[str, Any]) -> str:
    """The header's ``kid``, a non-empty string of at most 256 characters."""
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise MalformedToken("header has no 'kid'", expected="string", actual=type(kid).__name__)
    if len(kid) > 256:
        raise MalformedToken("header 'kid' is too long", expected="<= 256 characters", actual=len(kid))
    return kid


def _typ_matches(value: Any, expected: str) -> bool:
    if not isinstance(value, str):
        return False
    typ = value.lower()
    if typ.startswith("application/"):
        typ = typ[len("application/") :]
    return typ == expected


def _numeric_date(claims: Mapping[str, Any], name: str) -> int:
    value = claims[name]
    # bool is an int subclass and floats may be fractions or NaN: only a plain
    # JSON integer in 0..2^53 is a NumericDate here.
    if type(value) is not int or not 0 <= value <= MAX_NUMERIC_DATE:
        raise InvalidClaim(
            f"'{name}' must be an integer NumericDate",
            expected="integer in 0..2^53",
            actual=value if type(value) in (int, float) else type(value).__name__,
        )
    return value


def _nonempty_str(claims: Mapping[str, Any], name: str, limit: int = 1024) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise InvalidClaim(f"'{name}' must be a non-empty string", expected="string", actual=type(value).__name__)
    if len(value) > limit:
        raise InvalidClaim(f"'{name}' is too long", expected=f"<= {limit} characters", actual=len(value))
    return value


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
        raise IssuerMismatch("the outermost actor is not the issuer", expected=issuer, actual=actors[0])
    return tuple(actors)


def _freeze(value: Any) -> Any:
    if type(value) is dict:
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if type(value) is list:
        return tuple(_freeze(item) for item in value)
    return value


def _frozen_claims(claims: dict[str, Any]) -> Mapping[str, Any]:
    """A read-only view of the claims, nested objects and arrays included.

    A verified Principal is shared through the verified-token cache, so one
    request must not be able to change what the next one sees. Nested objects
    become read-only mappings and arrays become tuples.
    """
    for value in claims.values():
        if type(value) is dict or type(value) is list:
            return _freeze(claims)  # type: ignore[no-any-return]
    return MappingProxyType(claims)


class Verifier:
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
    :class:`~meshauth.TokenError` (bad token) or
    :class:`~meshauth.KeysUnavailable` (registry unreadable); nothing else.

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
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY} seconds, got {leeway!r}")
        if max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive")
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.clock = clock
        self.replay_cache = replay_cache
        self.max_token_bytes = max_token_bytes
        self.max_actors = max_actors
        self.cache_size = cache_size
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        # exact token string -> (principal, usable-until, key record it verified with)
        self._cache: VerifiedTokens[tuple[Principal, float, KeyRecord]] = VerifiedTokens(cache_size, clock)
        self._verified = self._cache.entries  # read directly on the hot path
        # header segment -> (alg, kid) for headers that passed the strict checks
        self._headers: dict[str, tuple[str, str]] = {}

    # -- public API -------------------------------------------------------------

    def verify(self, token: str, *, audit: bool = True) -> Principal:
        """Verify ``token`` and return who is calling (sync key lookup).

        ``audit=False`` skips this call's audit record, for callers (such as
        the middleware) that write one record per request themselves.
        """
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            if type(token) is not str:
                token = self._coerce(token)
            # Fast path: this exact token verified before, is still inside its
            # time window and its key record is still the registry's.
            entry = self._verified.get(token)
            if (
                entry is not None
                and self.replay_cache is None
                and self.clock() < entry[1]
                and self._key_for(entry[0].kid) is entry[2]
            ):
                principal = entry[0]
            else:
                header, payload, signing_input, signature = self._parse(token)
                record = self._lookup(header, self._key_for(header[1]))
                principal = self._finish(
                    token, header, claims=payload, signing_input=signing_input, signature=signature, record=record
                )
        except BaseException as exc:
            error = self._rejected(span, exc, started, audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, audit)
        return principal

    async def averify(self, token: str, *, audit: bool = True) -> Principal:
        """Verify ``token``, letting an async key source fetch without blocking the loop."""
        started = perf_counter()
        span = self.telemetry.start_span(self.span_name)
        try:
            if type(token) is not str:
                token = self._coerce(token)
            entry = self._verified.get(token)
            if (
                entry is not None
                and self.replay_cache is None
                and self.clock() < entry[1]
                and await self._akey_for(entry[0].kid) is entry[2]
            ):
                principal = entry[0]
            else:
                header, payload, signing_input, signature = self._parse(token)
                record = self._lookup(header, await self._akey_for(header[1]))
                principal = self._finish(
                    token, header, claims=payload, signing_input=signing_input, signature=signature, record=record
                )
        except BaseException as exc:
            error = self._rejected(span, exc, started, audit)
            raise error from error.__cause__
        self._accepted(span, principal, started, audit)
        return principal

    def _key_for(self, kid: str) -> KeyRecord | None:
        """The registry's record for ``kid``; a failing source is an outage, not a bad token."""
        try:
            return self.keys.get_key(kid)
        except MeshAuthError:
            raise
        except Exception as exc:
            raise KeysUnavailable(f"key source failed: {type(exc).__name__}") from exc

    async def _akey_for(self, kid: str) -> KeyRecord | None:
        try:
            return await self.keys.aget_key(kid)
        except MeshAuthError:
            raise
        except Exception as exc:
            raise KeysUnavailable(f"key source failed: {type(exc).__name__}") from exc

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
        caller = getattr(error, "caller", None)  # set only once the signature verified
        self.telemetry.rejected(span, error, started, audience=self.audience, caller=caller)
        if write_audit:
            audit(
                "verify",
                "rejected",
                error.reason,
                span=span,
                audience=self.audience,
                kid=error.kid[:256] if error.kid else None,
                caller=caller,
                detail=error.detail,
            )
        return error

    # -- the checks ----------------------------------------------------------------

    def _parse(self, token: str) -> tuple[tuple[str, str], dict[str, Any], bytes, bytes]:
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
        header_b64, payload_b64, signature_b64 = split_compact(token, self.max_token_bytes)
        header = self._headers.get(header_b64)
        if header is None:
            header = self._parse_header(header_b64)
        payload = loads_object(b64url_decode(payload_b64, "payload", checked=True), "payload")
        signature = b64url_decode(signature_b64, "signature", checked=True)
        return header, payload, token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii"), signature

    def _parse_header(self, header_b64: str) -> tuple[str, str]:
        header = decode_header(header_b64)
        alg = header_alg(header)
        kid = header_kid(header)
        if "typ" not in header or not _typ_matches(header["typ"], self.token_type):
            typ = header.get("typ")
            raise WrongTokenType(
                "this is not the expected kind of token",
                expected=self.token_type,
                actual=typ if isinstance(typ, str) else type(typ).__name__,
                kid=kid,
            )
        if alg not in ALGORITHMS:
            raise UnsupportedAlgorithm(
                "algorithm not allowed for meshauth tokens", expected=list(ALGORITHMS), actual=alg[:32], kid=kid
            )
        if len(self._headers) >= _HEADER_CACHE_SIZE:
            self._headers.clear()
        self._headers[header_b64] = (alg, kid)
        return alg, kid

    def _lookup(self, header: tuple[str, str], record: KeyRecord | None) -> KeyRecord:
        alg, kid = header
        if record is None:
            raise UnknownKey("no key with this kid in the registry", actual=kid[:64], kid=kid)
        if not record.valid_at(self.clock(), self.leeway):
            raise UnknownKey(
                "the key is outside its validity window",
                expected=f"nbf={record.not_before} exp={record.expires}",
                actual="now",
                kid=kid,
            )
        if alg != record.alg:
            raise UnsupportedAlgorithm(
                "header alg differs from the algorithm bound to the key", expected=record.alg, actual=alg, kid=kid
            )
        return record

    def _finish(
        self,
        token: str,
        header: tuple[str, str],
        *,
        claims: dict[str, Any],
        signing_input: bytes,
        signature: bytes,
        record: KeyRecord,
    ) -> Principal:
        if not record.verify_signature(signature, signing_input):
            raise BadSignature("signature does not verify with the registered key", kid=record.kid)
        try:
            principal, usable_until = self._check_claims(claims, record)
        except TokenError as exc:
            exc.kid = record.kid
            iss = claims.get("iss")
            if isinstance(iss, str) and iss == record.owner:
                exc.caller = iss  # type: ignore[attr-defined]
            raise
        if self.replay_cache is not None:
            self._check_replay(principal)
        self._remember(token, principal, usable_until, record)
        return principal

    def _check_claims(self, claims: dict[str, Any], record: KeyRecord) -> tuple[Principal, float]:
        try:
            issuer = claims["iss"]
            subject = claims["sub"]
            jti = claims["jti"]
            iat = claims["iat"]
            exp = claims["exp"]
            audience = claims["aud"]
        except KeyError:
            missing = [name for name in REQUIRED_CLAIMS if name not in claims]
            raise MissingClaim("required claims are absent", expected=list(REQUIRED_CLAIMS), actual=missing) from None
        if type(issuer) is not str or not 0 < len(issuer) <= 256:
            _nonempty_str(claims, "iss", 256)
        if type(subject) is not str or not 0 < len(subject) <= 1024:
            _nonempty_str(claims, "sub")
        if type(jti) is not str or not 0 < len(jti) <= MAX_JTI_LENGTH:
            _nonempty_str(claims, "jti", MAX_JTI_LENGTH)
        # bool is an int subclass and floats may be fractions or NaN: only a
        # plain JSON integer in 0..2^53 is a NumericDate here.
        if type(iat) is not int or not 0 <= iat <= MAX_NUMERIC_DATE:
            _numeric_date(claims, "iat")
        if type(exp) is not int or not 0 <= exp <= MAX_NUMERIC_DATE:
            _numeric_date(claims, "exp")
        nbf = _numeric_date(claims, "nbf") if "nbf" in claims else None
        scope = claims.get("scope")
        if "scope" in claims and not isinstance(scope, str):
            raise InvalidClaim(
                "'scope' must be a space-separated string", expected="string", actual=type(scope).__name__
            )
        if issuer != record.owner:
            raise IssuerMismatch("'iss' is not the owner of the signing key", expected=record.owner, actual=issuer[:64])
        actors: tuple[str, ...] = ()
        if "act" in claims:
            if subject == issuer:
                raise InvalidClaim("'act' is only allowed on delegated tokens (sub != iss)")
            actors = parse_actor_chain(claims["act"], issuer, self.max_actors)
        elif subject != issuer:
            raise InvalidClaim("a delegated token (sub != iss) needs an 'act' claim", expected="act", actual="absent")
        if type(audience) is list:
            if len(audience) != 1:
                raise WrongAudience(
                    "'aud' must name exactly one service", expected=self.audience, actual=f"{len(audience)} audiences"
                )
            audience = audience[0]
        if not isinstance(audience, str):
            raise InvalidClaim("'aud' must be a string", expected="string", actual=type(audience).__name__)
        if audience != self.audience:
            raise WrongAudience("the token is for another service", expected=self.audience, actual=audience[:64])
        now = self.clock()
        leeway = self.leeway
        if exp < iat:
            raise InvalidClaim("'exp' is before 'iat'", expected=f">= {iat}", actual=exp)
        if exp - iat > self.max_lifetime:
            raise LifetimeTooLong(
                "the token lives too long", expected=f"<= {self.max_lifetime} s", actual=f"{exp - iat} s"
            )
        if now >= exp + leeway:
            raise TokenExpired(
                "the token has expired", expected=f"before {exp} (+{leeway:g} s leeway)", actual=f"now {int(now)}"
            )
        if iat > now + leeway:
            raise TokenNotYetValid(
                "'iat' lies in the future", expected=f"<= now {int(now)} (+{leeway:g} s leeway)", actual=iat
            )
        if nbf is not None and nbf > now + leeway:
            raise TokenNotYetValid(
                "'nbf' lies in the future", expected=f"<= now {int(now)} (+{leeway:g} s leeway)", actual=nbf
            )
        self._check_extra_claims(claims)
        usable_until = exp + leeway
        if record.expires is not None:
            usable_until = min(usable_until, record.expires + leeway)
        principal = make_principal(
            issuer,
            subject,
            actors,
            self.audience,
            frozenset(scope.split()) if scope else _NO_SCOPES,
            jti,
            iat,
            exp,
            record.kid,
            record.alg,
            _frozen_claims(claims),
        )
        return principal, usable_until

    def _check_extra_claims(self, claims: dict[str, Any]) -> None:
        """Hook for token kinds with further claims (response tokens check ``nonce``)."""

    def _check_replay(self, principal: Principal) -> None:
        assert self.replay_cache is not None
        try:
            first_use = self.replay_cache.add(principal.caller, principal.token_id, principal.expires_at + self.leeway)
        except ReplayStoreUnavailable:
            raise
        except Exception as exc:
            # Cannot tell whether the token was used before: refuse, as an outage.
            raise ReplayStoreUnavailable(f"replay cache failed: {type(exc).__name__}") from exc
        if not first_use:
            error = TokenReplayed("this token id was already used", actual=principal.token_id[:64], kid=principal.kid)
            error.caller = principal.caller  # type: ignore[attr-defined]
            raise error

    def _remember(self, token: str, principal: Principal, usable_until: float, record: KeyRecord) -> None:
        self._cache.put(token, (principal, usable_until, record))

    def clear_cache(self) -> None:
        """Forget every verified token (e.g. after revoking a key out of band)."""
        self._cache.clear()
        self._headers.clear()
