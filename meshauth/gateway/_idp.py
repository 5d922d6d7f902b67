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

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from types import MappingProxyType
from typing import Any, Final, Protocol

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as _CryptoUnsupported
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from opentelemetry import metrics, trace

from .._cache import VerifiedTokens
from .._exceptions import (
    BadSignature,
    ConfigurationError,
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
from .._jws import b64url_decode, loads_object, raw_to_der, split_compact, strict_json_loads, token_too_large
from .._registry import WatchedFile
from .._telemetry import Telemetry, fail_closed
from .._verify import RESPONSE_TOKEN_TYPE, SERVICE_TOKEN_TYPE, decode_header, header_alg, header_kid
from ._config import IDP_ALGORITHMS, IssuerConfig, is_loopback_host

__all__ = [
    "IdPKey",
    "IdPKeyEndpoint",
    "IdPKeyFile",
    "IdPKeySource",
    "StaticIdPKeys",
    "UserPrincipal",
    "UserTokenVerifier",
    "is_service_token",
    "parse_idp_jwks",
]

logger = logging.getLogger("meshauth.gateway")

MIN_RSA_BITS: Final = 2048
DEFAULT_MAX_JWKS_BYTES: Final = 1 << 20
MAX_NUMERIC_DATE: Final = 2**53
# Header segment -> (alg, kid, typ) for the most recent distinct headers; IdPs
# sign every token of a key with the same header.
_HEADER_CACHE_SIZE: Final = 256
# Like COMPACT_RE, but the signature may be empty so that an unsigned token is
# reported as such ("alg": "none" -> unsupported_alg) rather than as malformed.
_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_USER_TOKEN_TYPES: Final = frozenset({"jwt", "at+jwt"})
_SERVICE_TYPES: Final = frozenset({SERVICE_TOKEN_TYPE, RESPONSE_TOKEN_TYPE})
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ALGS_FOR_KTY: Final = {"RSA": frozenset({"RS256", "PS256"}), "EC": frozenset({"ES256"}), "OKP": frozenset({"EdDSA"})}
_SHA256: Final = hashes.SHA256()
_PKCS1: Final = padding.PKCS1v15()
# RFC 7518 section 3.5: the PSS salt is as long as the hash output.
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_ECDSA: Final = ec.ECDSA(hashes.SHA256())
_MAX_AGE: Final = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,9})")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


# -- keys -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class IdPKey:
    """One public key of an IdP's JWKS and the algorithms it may verify."""

    kid: str
    kty: str
    algorithms: frozenset[str]
    public_key: PublicKey = dataclasses.field(repr=False)

    def verify(self, alg: str, signature: bytes, data: bytes) -> bool:
        """Check a JWS signature made with ``alg``; never raises."""
        key = self.public_key
        try:
            if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, _PKCS1, _SHA256)
            elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, _PSS, _SHA256)
            elif alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
                if len(signature) != 64:
                    return False
                key.verify(raw_to_der(signature), data, _ECDSA)
            elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
                if len(signature) != 64:
                    return False
                key.verify(signature, data)
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


def _b64_member(jwk: Mapping[str, Any], member: str, where: str) -> bytes:
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{where}: {member!r} must be a base64url string", reason="invalid_jwks")
    try:
        return b64url_decode(value, member)
    except MeshAuthError:
        raise ConfigurationError(f"{where}: {member!r} is not base64url", reason="invalid_jwks") from None


def parse_idp_jwk(jwk: Any, where: str) -> IdPKey:
    """Validate one public JWK of an IdP (RSA >= 2048 bits, EC P-256 or Ed25519)."""
    if not isinstance(jwk, Mapping):
        raise ConfigurationError(f"{where} is not a JSON object", reason="invalid_jwks")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise ConfigurationError(f"{where}: 'kid' must be a non-empty string", reason="invalid_jwks")
    where = f"{where} (kid {kid[:64]!r})"
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise ConfigurationError(f"{where} carries private key members", reason="invalid_jwks")
    if jwk.get("use", "sig") != "sig":
        raise ConfigurationError(f"{where}: not a signing key (use {jwk.get('use')!r})", reason="invalid_jwks")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ConfigurationError(f"{where}: 'key_ops' does not allow 'verify'", reason="invalid_jwks")
    kty = jwk.get("kty")
    if kty not in _ALGS_FOR_KTY:
        raise ConfigurationError(f"{where}: unsupported key type {kty!r}", reason="invalid_jwks")
    algorithms = _ALGS_FOR_KTY[kty]
    pinned = jwk.get("alg")
    if pinned is not None:
        # A key that names its algorithm may verify that algorithm only.
        if pinned not in algorithms:
            raise ConfigurationError(f"{where}: 'alg' {pinned!r} does not fit key type {kty}", reason="invalid_jwks")
        algorithms = frozenset({pinned})
    public_key: PublicKey
    try:
        if kty == "RSA":
            n = int.from_bytes(_b64_member(jwk, "n", where), "big")
            e = int.from_bytes(_b64_member(jwk, "e", where), "big")
            if n.bit_length() < MIN_RSA_BITS:
                raise ConfigurationError(
                    f"{where}: RSA key of {n.bit_length()} bits, at least {MIN_RSA_BITS} required",
                    reason="invalid_jwks",
                )
            public_key = rsa.RSAPublicNumbers(e, n).public_key()
        elif kty == "EC":
            if jwk.get("crv") != "P-256":
                raise ConfigurationError(f"{where}: EC keys must be on P-256", reason="invalid_jwks")
            x, y = _b64_member(jwk, "x", where), _b64_member(jwk, "y", where)
            if len(x) != 32 or len(y) != 32:
                raise ConfigurationError(f"{where}: P-256 coordinates are 32 bytes", reason="invalid_jwks")
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
        else:
            if jwk.get("crv") != "Ed25519":
                raise ConfigurationError(f"{where}: OKP keys must be Ed25519", reason="invalid_jwks")
            public_key = ed25519.Ed25519PublicKey.from_public_bytes(_b64_member(jwk, "x", where))
    except ConfigurationError:
        raise  # a ValueError too, but already precise
    except (ValueError, _CryptoUnsupported):
        raise ConfigurationError(f"{where}: not a valid {kty} public key", reason="invalid_jwks") from None
    return IdPKey(kid, kty, algorithms, public_key)


def parse_idp_jwks(document: bytes | str | Mapping[str, Any], source: str) -> tuple[dict[str, IdPKey], list[str]]:
    """Parse an IdP's JWKS: the usable keys by ``kid``, and what was wrong with the others.

    The document itself must be a strict JSON object with a ``keys`` array;
    a single bad key is skipped (IdPs publish keys meshauth does not use, such
    as encryption keys). A ``kid`` listed twice is dropped entirely: which key
    would be meant is ambiguous.
    """
    if isinstance(document, Mapping):
        doc: Any = document
    else:
        try:
            doc = strict_json_loads(document.decode("utf-8") if isinstance(document, bytes) else document)
        except (ValueError, RecursionError) as exc:
            raise ConfigurationError(f"{source}: not a valid JSON document ({exc})", reason="invalid_jwks") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ConfigurationError(f"{source}: a JWKS document is an object with a 'keys' array", reason="invalid_jwks")
    keys: dict[str, IdPKey] = {}
    problems: list[str] = []
    duplicates: set[str] = set()
    for index, jwk in enumerate(doc["keys"]):
        try:
            key = parse_idp_jwk(jwk, f"{source}: keys[{index}]")
        except ConfigurationError as exc:
            problems.append(exc.detail)
            continue
        if key.kid in keys or key.kid in duplicates:
            duplicates.add(key.kid)
            keys.pop(key.kid, None)
            problems.append(f"{source}: kid {key.kid[:64]!r} appears twice; neither key is used")
            continue
        keys[key.kid] = key
    return keys, problems


class IdPKeySource(Protocol):
    """Where the verifier finds an issuer's keys (a file, a URL, or memory)."""

    async def aget_key(self, kid: str) -> IdPKey | None:
        """The key for ``kid`` or ``None``; ``KeysUnavailable`` when no key set can be had."""
        ...

    def status(self) -> dict[str, Any]:
        """Readiness: ``{"ready": bool, "keys": int, "last_error": str | None, ...}``."""
        ...


class StaticIdPKeys:
    """A fixed IdP key set held in memory (tests, programmatic set-ups)."""

    def __init__(self, document: bytes | str | Mapping[str, Any], *, source: str = "static IdP keys") -> None:
        self.keys, self.problems = parse_idp_jwks(document, source)

    async def aget_key(self, kid: str) -> IdPKey | None:
        return self.keys.get(kid)

    def status(self) -> dict[str, Any]:
        return {"source": "static", "ready": True, "keys": len(self.keys), "last_error": None}


class IdPKeyFile(WatchedFile[dict[str, IdPKey]]):
    """An IdP's JWKS read from a file and reloaded when the file changes.

    The first load happens in the constructor (a start-up error if it fails);
    a later version that does not parse is refused and the last good set stays
    in service, as with :class:`meshauth.JWKSFile`.
    """

    _kind = "JWKS"
    _label = "IdP key set"
    _reason = "invalid_jwks"
    _logger = logger

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float = 1.0,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.problems: list[str] = []
        super().__init__(path, check_interval=check_interval, max_bytes=max_bytes, monotonic=monotonic)

    def _parse(self, data: bytes) -> dict[str, IdPKey]:
        keys, self.problems = parse_idp_jwks(data, self.path)
        return keys

    def get_key(self, kid: str) -> IdPKey | None:
        """The key for ``kid`` (after a reload check at most every ``check_interval``)."""
        return self.current.get(kid)

    async def aget_key(self, kid: str) -> IdPKey | None:
        return self.get_key(kid)

    def usable_with(self, algorithms: Iterable[str]) -> bool:
        """Whether at least one key can verify one of ``algorithms``."""
        wanted = frozenset(algorithms)
        return any(key.algorithms & wanted for key in self._value.values())

    def status(self) -> dict[str, Any]:
        return {"source": self.path, "ready": True, "keys": len(self.current), "last_error": self.last_error}


class IdPKeyEndpoint:
    """An IdP's JWKS fetched from a URL, cached per ``Cache-Control: max-age``.

    - the first :meth:`aget_key` (or :meth:`refresh`) fetches; concurrent
      callers share one fetch;
    - a key that is in the cached set is returned at once; when the set is
      older than its max-age a refresh runs in the background;
    - an unknown ``kid`` triggers a refetch at most once per ``cooldown``;
    - a failed fetch keeps the last good set, for at most ``max_stale``
      seconds; with no good set at all, :class:`~meshauth.KeysUnavailable`;
    - redirects are never followed, bodies are bounded by ``max_bytes``, and
      plain http is refused except on loopback.
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        cooldown: float = 30.0,
        default_max_age: float = 300.0,
        max_stale: float = 86400.0,
        timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = httpx.URL(url)
        if parts.scheme not in ("http", "https") or (parts.scheme == "http" and not is_loopback_host(parts.host)):
            raise ConfigurationError(
                f"{url}: expected an https URL (plain http only on loopback)", reason="invalid_jwks"
            )
        self.url = url
        self.cooldown = cooldown
        self.default_max_age = default_max_age
        self.max_stale = max_stale
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._monotonic = monotonic
        self._client = client
        self._owns_client = client is None
        self._keys: dict[str, IdPKey] | None = None
        self._fetched_at = -math.inf
        self._refresh_at = -math.inf
        self._last_attempt = -math.inf
        self._etag: str | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.fetches = 0

    async def aget_key(self, kid: str) -> IdPKey | None:
        now = self._monotonic()
        keys = self._keys
        if keys is not None and now - self._fetched_at <= self.max_stale:
            key = keys.get(kid)
            if key is not None:
                if now >= self._refresh_at and self._inflight is None:
                    self._start_refresh()
                return key
            if now - self._last_attempt >= self.cooldown:
                await self.refresh()
                return (self._keys or {}).get(kid)
            return None
        # No usable set: fetch, but not more often than every few seconds
        # while the endpoint is failing (every request would wait otherwise).
        if self._inflight is not None or now - self._last_attempt >= min(self.cooldown, 5.0):
            await self.refresh()
        keys = self._keys
        if keys is None or self._monotonic() - self._fetched_at > self.max_stale:
            raise KeysUnavailable(f"{self.url}: no usable key set ({self.last_error or 'not fetched yet'})")
        return keys.get(kid)

    async def refresh(self) -> None:
        """Fetch now (joining a fetch already running); never raises for a failed fetch."""
        task = self._inflight or self._start_refresh()
        await asyncio.shield(task)

    def _start_refresh(self) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._fetch())
        self._inflight = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> None:
        self._last_attempt = self._monotonic()
        self.fetches += 1
        client = self._client
        if client is None:
            client = self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout)
        headers = {"Accept": "application/jwk-set+json, application/json"}
        if self._etag and self._keys is not None:
            headers["If-None-Match"] = self._etag
        try:
            async with client.stream(
                "GET", self.url, headers=headers, follow_redirects=False, timeout=self.timeout
            ) as response:
                if response.status_code == 304 and self._keys is not None:
                    self._fresh(response.headers)
                    return
                if response.status_code != 200:
                    raise _FetchError(f"HTTP status {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise _FetchError(f"the key set is larger than {self.max_bytes} bytes")
            keys, problems = parse_idp_jwks(bytes(body), self.url)
        except _FetchError as exc:
            self._failed(str(exc))
            return
        except ConfigurationError as exc:
            self._failed(exc.detail)
            return
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}")
            return
        for problem in problems:
            logger.warning("IdP key set %s: %s", self.url, problem)
        self._keys = keys
        self._etag = response.headers.get("etag")
        self._fresh(response.headers)
        if self.last_error is not None:
            logger.info("IdP key set %s fetched again (%d keys)", self.url, len(keys))
        self.last_error = None

    def _fresh(self, headers: httpx.Headers) -> None:
        now = self._monotonic()
        self._fetched_at = now
        max_age = self.default_max_age
        match = _MAX_AGE.search(headers.get("cache-control", ""))
        if match:
            # Never refetch more often than the cooldown, nor trust a set for more than a day.
            max_age = min(max(float(match.group(1)), self.cooldown), 86400.0)
        self._refresh_at = now + max_age

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            logger.warning("IdP key set %s: fetch failed: %s", self.url, message)
        self.last_error = message

    def status(self) -> dict[str, Any]:
        ready = self._keys is not None and self._monotonic() - self._fetched_at <= self.max_stale
        return {
            "source": self.url,
            "ready": ready,
            "keys": len(self._keys or ()),
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        """Stop a running fetch and close the HTTP client if this source created it."""
        task = self._inflight
        if task is not None:
            task.cancel()
            # Shutting down: how the fetch ends is moot.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None


class _FetchError(Exception):
    """A JWKS response that cannot be used (status, size)."""


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
    >>> from meshauth.gateway._idp import StaticIdPKeys
    >>> private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    >>> jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k1"}
    >>> idp = IssuerConfig("https://idp.example.com", "unused", "api", ("RS256",))
    >>> verifier = UserTokenVerifier([idp], {idp.issuer: StaticIdPKeys({"keys": [jwk]})})
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
        keys: Mapping[str, IdPKeySource],
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
        self._cache: VerifiedTokens[tuple[UserPrincipal, float, IdPKey]] = VerifiedTokens(cache_size, clock)
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
        if alg not in key.algorithms:
            raise self._tag(
                UnsupportedAlgorithm(
                    "header alg does not fit the issuer's key", expected=sorted(key.algorithms), actual=alg, kid=kid
                ),
                issuer,
            )
        signature = b64url_decode(signature_b64, "signature", checked=True)
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        if not key.verify(alg, signature, signing_input):
            raise self._tag(BadSignature("signature does not verify with the issuer's key", kid=kid), issuer)
        try:
            principal = self._check_claims(claims, issuer, kid, alg)
        except TokenError as exc:
            exc.kid = kid
            raise self._tag(exc, issuer) from None
        self._remember(token, principal, principal.expires_at + issuer.leeway, key)
        return principal

    async def _current_key(self, principal: UserPrincipal) -> IdPKey | None:
        try:
            return await self.keys[principal.issuer].aget_key(principal.kid)
        except Exception:
            return None  # the full path below reports the outage properly

    def _remember(self, token: str, principal: UserPrincipal, usable_until: float, key: IdPKey) -> None:
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

    async def _key(self, issuer: IssuerConfig, kid: str) -> IdPKey:
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
