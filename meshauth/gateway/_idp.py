"""End users' tokens from external identity providers (IdPs).

These are *not* meshauth service tokens: an IdP signs with its own keys
(often RSA), publishes them as a plain JWKS, and writes ``typ: JWT`` or no
``typ`` at all. They are checked here with rules as strict as the service
token profile's, in this order:

1. size limit, before anything else;
2. strict compact-JWS syntax, strict base64url and JSON (``meshauth._jws``);
3. header: the forbidden members of DESIGN section 2 (``jku``, ``jwk``,
   ``x5u``, ``x5c``, ``crit``, ...), ``alg`` (never ``none`` or ``HS*``),
   ``kid``, ``typ`` (absent, ``JWT`` or ``at+jwt``; never a meshauth type);
4. the unverified ``iss`` selects one *configured* issuer, whose own
   ``algorithms`` must include ``alg``;
5. the key, by ``kid``, from that issuer's JWKS; ``alg`` must fit the key's
   type and the key's own ``alg`` when the JWKS pins one;
6. the signature;
7. the claims: ``iss``, ``sub``, ``aud`` (contains the configured audience),
   ``exp``/``nbf``/``iat`` with the issuer's leeway, ``groups``, ``scope``/``scp``.

.. warning::
   The algorithm is chosen by configuration and key, never by the token. A URL
   or key found in a token is never used.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from types import MappingProxyType
from typing import Any, Final

from opentelemetry import metrics, trace

from .._cache import VerifiedTokens
from .._exceptions import (
    BadSignature,
    InvalidClaim,
    IssuerMismatch,
    KeysUnavailable,
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
from .._jws import b64url_decode, loads_object, split_compact, token_too_large
from .._keys import KeyRecord
from .._registry import KeySource
from .._telemetry import Telemetry, fail_closed
from .._verify import RESPONSE_TOKEN_TYPE, SERVICE_TOKEN_TYPE, decode_header, header_alg, header_kid
from ._config import IDP_ALGORITHMS, IssuerConfig

__all__ = ["UserPrincipal", "UserTokenVerifier", "is_service_token"]

logger = logging.getLogger("meshauth.gateway")

MAX_NUMERIC_DATE: Final = 2**53
# Header segment -> (alg, kid, typ) for the most recent distinct headers; IdPs
# sign every token of a key with the same header.
_HEADER_CACHE_SIZE: Final = 256
# Like COMPACT_RE, but the signature may be empty so that an unsigned token is
# reported as such ("alg": "none" -> unsupported_alg) rather than as malformed.
_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_USER_TOKEN_TYPES: Final = frozenset({"jwt", "at+jwt"})
_SERVICE_TYPES: Final = frozenset({SERVICE_TOKEN_TYPE, RESPONSE_TOKEN_TYPE})


# -- verification ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UserPrincipal:
    """An end user, as proven by a verified IdP token.

    ``groups`` come from the ``groups`` claim; ``scopes`` from ``scope``
    (space-separated) and ``scp`` (a list or a string), together.
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


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _typ_of(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    typ = value.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


def is_service_token(token: str) -> bool:
    """Whether ``token``'s (unverified) header says it is a meshauth service token.

    Only picks which verifier runs; that verifier then checks everything.
    """
    header_b64, dot, _ = token.partition(".")
    if not dot or len(header_b64) > 1024:
        return False
    try:
        header = loads_object(b64url_decode(header_b64, "header"), "header")
    except MeshAuthError:
        return False
    return _typ_of(header.get("typ")) == SERVICE_TOKEN_TYPE


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    # RFC 7519 allows fractions; bool, strings, NaN and huge values are refused.
    if type(value) not in (int, float) or not (0 <= value <= MAX_NUMERIC_DATE):
        raise InvalidClaim(
            f"'{name}' must be a NumericDate",
            expected="number in 0..2^53",
            actual=value if type(value) in (int, float) else type(value).__name__,
        )
    return float(value)


def _string_set(value: Any, name: str, *, split: bool) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split()) if split else frozenset({value})
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise InvalidClaim(f"'{name}' must be a string or a list of strings", actual=type(value).__name__)


class UserTokenVerifier:
    """Checks end users' IdP tokens against the configured issuers.

    >>> import asyncio, time, jwt
    >>> from cryptography.hazmat.primitives.asymmetric import rsa
    >>> from meshauth.gateway import IssuerConfig
    >>> from meshauth import IdPKeyParser, StaticKeys
    >>> private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    >>> jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k1"}
    >>> idp = IssuerConfig("https://idp.example.com", "unused", "api", ("RS256",))
    >>> keys = StaticKeys.from_jwks({"keys": [jwk]}, parser=IdPKeyParser(idp.issuer, idp.algorithms))
    >>> verifier = UserTokenVerifier([idp], {idp.issuer: keys})
    >>> now = int(time.time())
    >>> token = jwt.encode({"iss": idp.issuer, "sub": "alice", "aud": "api", "iat": now, "exp": now + 60},
    ...                    private, algorithm="RS256", headers={"kid": "k1"})
    >>> asyncio.run(verifier.averify(token)).subject
    'alice'

    Every call returns a :class:`UserPrincipal` or raises a
    :class:`~meshauth.TokenError` with a DESIGN reason code (or
    :class:`~meshauth.KeysUnavailable` when an issuer's key set cannot be
    had); nothing else escapes. A token that verified once is answered from a
    bounded cache, keyed by the exact token string, until it expires (plus
    leeway) or its issuer stops serving the key it was signed with. Each call
    is one ``meshauth.verify`` span and one point on the ``meshauth.verify.*``
    metrics; no audit record is written here (the gateway writes one per
    request).
    """

    def __init__(
        self,
        issuers: Iterable[IssuerConfig],
        keys: Mapping[str, KeySource],
        *,
        max_token_bytes: int = 8192,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.issuers = {issuer.issuer: issuer for issuer in issuers}
        missing = [name for name in self.issuers if name not in keys]
        if missing:
            raise ValueError(f"no key source for issuers {missing!r}")
        for issuer in self.issuers.values():
            bad = [alg for alg in issuer.algorithms if alg not in IDP_ALGORITHMS]
            if bad:
                raise ValueError(f"unsupported algorithms {bad!r} for issuer {issuer.issuer!r}")
        self.keys = dict(keys)
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self.cache_size = cache_size
        self._headers: dict[str, tuple[str, str]] = {}
        # exact token string -> (principal, usable until, the key it verified with)
        self._cache: VerifiedTokens[tuple[UserPrincipal, float, KeyRecord]] = VerifiedTokens(cache_size, clock)
        self._verified = self._cache.entries

    async def averify(self, token: str) -> UserPrincipal:
        """Verify ``token``; see the class docstring for the order of the checks."""
        started = perf_counter()
        span = self.telemetry.start_span("meshauth.verify")
        try:
            principal = await self._verify(token)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                span.end()
                raise
            error = fail_closed(exc)
            issuer = getattr(error, "issuer", None)  # the configured issuer the token was judged against
            self.telemetry.rejected(
                span, error, started, audience=None, caller=issuer if isinstance(issuer, str) else None
            )
            raise error from error.__cause__
        self.telemetry.accepted(
            span, started, principal.issuer, principal.subject, principal.audience, principal.kid, principal.alg
        )
        return principal

    # -- the checks -----------------------------------------------------------------

    async def _verify(self, token: str) -> UserPrincipal:
        if type(token) is not str:
            raise MalformedToken("token must be a string", expected="str", actual=type(token).__name__)
        if len(token) > self.max_token_bytes:
            # Before the cache lookup hashes it; split_compact checks again, at the cost of a len().
            raise token_too_large(len(token), self.max_token_bytes)
        # Fast path: this exact token verified before, is still inside its
        # time window, and its issuer still serves the same key for its kid.
        entry = self._verified.get(token)
        if entry is not None:
            principal, usable_until, key = entry
            if self.clock() < usable_until and await self._current_key(principal) is key:
                return principal
            self._cache.discard(token)
        header_b64, payload_b64, signature_b64 = split_compact(token, self.max_token_bytes, _COMPACT)
        header = self._headers.get(header_b64)
        if header is None:
            header = self._parse_header(header_b64)
        alg, kid = header
        if not signature_b64:
            raise MalformedToken("the signature segment is empty", kid=kid)
        # The payload is parsed before the signature is checked only to pick
        # the issuer's key set; nothing in it is trusted until step 6.
        claims = loads_object(b64url_decode(payload_b64, "payload", checked=True), "payload")
        issuer = self._issuer(claims, kid)
        if alg not in issuer.algorithms:
            raise self._tag(
                UnsupportedAlgorithm(
                    "algorithm not allowed for this issuer", expected=list(issuer.algorithms), actual=alg, kid=kid
                ),
                issuer,
            )
        key = await self._key(issuer, kid)
        if alg != key.alg:
            raise self._tag(
                UnsupportedAlgorithm(
                    "header alg differs from the algorithm bound to the issuer's key",
                    expected=key.alg,
                    actual=alg,
                    kid=kid,
                ),
                issuer,
            )
        signature = b64url_decode(signature_b64, "signature", checked=True)
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        if not key.verify(signature, signing_input):
            raise self._tag(BadSignature("signature does not verify with the issuer's key", kid=kid), issuer)
        try:
            principal = self._check_claims(claims, issuer, kid, alg)
        except TokenError as exc:
            exc.kid = kid
            raise self._tag(exc, issuer) from None
        self._remember(token, principal, principal.expires_at + issuer.leeway, key)
        return principal

    async def _current_key(self, principal: UserPrincipal) -> KeyRecord | None:
        try:
            return await self.keys[principal.issuer].aget_key(principal.kid)
        except Exception:
            return None  # the full path below reports the outage properly

    def _remember(self, token: str, principal: UserPrincipal, usable_until: float, key: KeyRecord) -> None:
        self._cache.put(token, (principal, usable_until, key))

    def clear_cache(self) -> None:
        """Forget every verified token (e.g. after revoking a key out of band)."""
        self._cache.clear()
        self._headers.clear()

    def _parse_header(self, header_b64: str) -> tuple[str, str]:
        header = decode_header(header_b64)
        alg = header_alg(header)
        if alg not in IDP_ALGORITHMS:
            # "none", HS256 (an HMAC keyed with a public key) and the rest.
            raise UnsupportedAlgorithm(
                "algorithm not allowed for user tokens", expected=list(IDP_ALGORITHMS), actual=_clip(alg, 32)
            )
        kid = header_kid(header)
        if "typ" in header:
            typ = _typ_of(header["typ"])
            if typ not in _USER_TOKEN_TYPES:
                raise WrongTokenType(
                    "this is not a user token"
                    + (" (service tokens are not accepted here)" if typ in _SERVICE_TYPES else ""),
                    expected="JWT or at+jwt",
                    actual=_clip(typ) if typ is not None else type(header["typ"]).__name__,
                    kid=kid,
                )
        if len(self._headers) >= _HEADER_CACHE_SIZE:
            self._headers.clear()
        self._headers[header_b64] = (alg, kid)
        return alg, kid

    def _issuer(self, claims: Mapping[str, Any], kid: str) -> IssuerConfig:
        iss = claims.get("iss")
        if iss is None:
            raise MissingClaim("the token names no issuer", expected="iss", actual="absent", kid=kid)
        if not isinstance(iss, str):
            raise InvalidClaim("'iss' must be a string", expected="string", actual=type(iss).__name__, kid=kid)
        issuer = self.issuers.get(iss)
        if issuer is None:
            raise IssuerMismatch(
                "the token's issuer is not configured", expected=sorted(self.issuers), actual=_clip(iss), kid=kid
            )
        return issuer

    async def _key(self, issuer: IssuerConfig, kid: str) -> KeyRecord:
        try:
            key = await self.keys[issuer.issuer].aget_key(kid)
        except MeshAuthError:
            raise
        except Exception as exc:
            raise KeysUnavailable(f"key source of {issuer.issuer} failed: {type(exc).__name__}") from exc
        if key is None:
            raise self._tag(
                UnknownKey("no key with this kid in the issuer's key set", actual=kid[:64], kid=kid), issuer
            )
        return key

    def _check_claims(self, claims: dict[str, Any], issuer: IssuerConfig, kid: str, alg: str) -> UserPrincipal:
        for name in ("sub", "aud", "exp"):
            if name not in claims:
                raise MissingClaim("required claims are absent", expected=["iss", "sub", "aud", "exp"], actual=[name])
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise InvalidClaim("'sub' must be a non-empty string", expected="string", actual=type(subject).__name__)
        if len(subject) > 1024:
            raise InvalidClaim("'sub' is too long", expected="<= 1024 characters", actual=len(subject))
        audience = claims["aud"]
        if isinstance(audience, str):
            audiences: list[Any] = [audience]
        elif isinstance(audience, list):
            audiences = audience
        else:
            raise InvalidClaim("'aud' must be a string or a list", actual=type(audience).__name__)
        if not all(isinstance(item, str) for item in audiences):
            raise InvalidClaim("'aud' must hold strings only", expected="strings")
        if issuer.audience not in audiences:
            shown = audiences[0] if len(audiences) == 1 else f"{len(audiences)} audiences"
            raise WrongAudience("the token is for another audience", expected=issuer.audience, actual=_clip(shown))
        exp = _numeric_date(claims, "exp")
        nbf = _numeric_date(claims, "nbf") if "nbf" in claims else None
        iat = _numeric_date(claims, "iat") if "iat" in claims else None
        now = self.clock()
        leeway = issuer.leeway
        if now >= exp + leeway:
            raise TokenExpired(
                "the token has expired", expected=f"before {exp:.0f} (+{leeway:g} s leeway)", actual=f"now {int(now)}"
            )
        if nbf is not None and nbf > now + leeway:
            raise TokenNotYetValid("'nbf' lies in the future", expected=f"<= now {int(now)}", actual=nbf)
        if iat is not None and iat > now + leeway:
            raise TokenNotYetValid("'iat' lies in the future", expected=f"<= now {int(now)}", actual=iat)
        groups = _string_set(claims["groups"], "groups", split=False) if "groups" in claims else frozenset()
        scopes: frozenset[str] = frozenset()
        if "scope" in claims:
            if not isinstance(claims["scope"], str):
                raise InvalidClaim("'scope' must be a space-separated string", actual=type(claims["scope"]).__name__)
            scopes = frozenset(claims["scope"].split())
        if "scp" in claims:
            scopes |= _string_set(claims["scp"], "scp", split=True)
        if any(not scope or any(ch.isspace() for ch in scope) for scope in scopes):
            raise InvalidClaim("scopes must be non-empty strings without spaces")
        jti = claims.get("jti")
        return UserPrincipal(
            issuer=issuer.issuer,
            subject=subject,
            audience=issuer.audience,
            groups=groups,
            scopes=scopes,
            token_id=jti if isinstance(jti, str) and jti else None,
            expires_at=exp,
            kid=kid,
            alg=alg,
            claims=MappingProxyType(claims),
        )

    @staticmethod
    def _tag(error: TokenError, issuer: IssuerConfig) -> TokenError:
        error.issuer = issuer.issuer  # type: ignore[attr-defined]
        return error
