"""Identity providers' key sets for the gateway (files, URLs, memory).

The user tokens themselves are checked by the IdP profile of the verification
engine (``meshauth._idp_tokens``); :class:`IdPRecords` presents these key sets
to it as :class:`~meshauth.KeyRecord` values owned by the issuer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as _CryptoUnsupported
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .._engine import typ_of
from .._exceptions import ConfigurationError, KeysUnavailable, MeshAuthError
from .._jws import b64url_decode, loads_object, raw_to_der, strict_json_loads
from .._keys import KeyRecord
from .._registry import WatchedFile
from .._verify import SERVICE_TOKEN_TYPE
from ._config import is_loopback_host

__all__ = [
    "IdPKey",
    "IdPKeyEndpoint",
    "IdPKeyFile",
    "IdPKeySource",
    "IdPRecords",
    "StaticIdPKeys",
    "is_service_token",
    "parse_idp_jwks",
]

logger = logging.getLogger("meshauth.gateway")

MIN_RSA_BITS: Final = 2048
DEFAULT_MAX_JWKS_BYTES: Final = 1 << 20
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
    return typ_of(header.get("typ")) == SERVICE_TOKEN_TYPE


class IdPRecords:
    """An issuer's key source seen as :class:`~meshauth.KeyRecord` values owned by the issuer.

    Each key is bound to one algorithm: its own ``alg`` when the JWKS names
    one, else the first of the issuer's ``algorithms`` that fits its type. The
    same key object always gives the same record, so the verified-token cache
    can tell when a key changed.
    """

    def __init__(self, source: IdPKeySource, issuer: str, algorithms: Iterable[str]) -> None:
        self.source = source
        self.issuer = issuer
        self.algorithms = tuple(algorithms)
        self._records: dict[str, tuple[IdPKey, KeyRecord | None]] = {}

    def _record(self, key: IdPKey | None) -> KeyRecord | None:
        if key is None:
            return None
        known = self._records.get(key.kid)
        if known is not None and known[0] is key:
            return known[1]
        alg = next((alg for alg in self.algorithms if alg in key.algorithms), None)
        record = None
        if alg is not None:
            record = KeyRecord(
                key.kid,
                alg,
                self.issuer,
                key.public_key,  # type: ignore[arg-type]  # RSA keys: verified by verify_signature below
                verify_signature=functools.partial(key.verify, alg),
            )
        if len(self._records) > 1024:
            self._records.clear()
        self._records[key.kid] = (key, record)
        return record

    def get_key(self, kid: str) -> KeyRecord | None:
        getter = getattr(self.source, "get_key", None)
        return self._record(getter(kid)) if getter is not None else None

    async def aget_key(self, kid: str) -> KeyRecord | None:
        return self._record(await self.source.aget_key(kid))

    @property
    def keyset(self) -> list[KeyRecord] | None:
        """Every usable record (for a token without ``kid``), or ``None`` before the first load."""
        keys = getattr(self.source, "keys", None)
        if not isinstance(keys, dict):
            keys = getattr(self.source, "_value", None) or getattr(self.source, "_keys", None)
        if not isinstance(keys, dict):
            return None
        records = [self._record(key) for key in keys.values()]
        return [record for record in records if record is not None]

    def status(self) -> dict[str, Any]:
        return self.source.status()
