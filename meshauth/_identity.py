"""A service's own identity: minting and caching its outbound tokens."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from ._exceptions import ConfigurationError
from ._jws import b64url_encode, body_digest, dumps
from ._keys import SigningKey
from ._names import service_name_problem
from ._principal import Principal
from ._telemetry import Telemetry
from ._txn import DEFAULT_TRUST_DOMAIN, MAX_TXN_LIFETIME, TXN_TOKEN_TYPE, txn_hash
from ._verify import RESPONSE_TOKEN_TYPE, SERVICE_TOKEN_TYPE

if TYPE_CHECKING:
    from ._ephemeral import EphemeralIdentity
    from ._redis_publish import RedisPublisher

__all__ = ["ServiceIdentity"]

DEFAULT_TTL = 300
MAX_RESPONSE_TTL = 60
# A cached token is not handed out when it has less than this left: it could
# expire in flight before the callee sees it.
_MIN_REMAINING = 5
# Tokens bound to a Txn-Token are one per transaction: the cache is pruned past this many entries.
_MAX_CACHED = 4096


def _cache_key(audience: str, scope: str | None, txn_token: str | None) -> Any:
    if txn_token is not None:
        return (audience, scope, txn_token)
    return audience if scope is None else (audience, scope)


def _scope_text(scope: str | Iterable[str] | None) -> str | None:
    if scope is None:
        return None
    if isinstance(scope, str):
        return " ".join(scope.split()) or None  # split() yields non-empty items without whitespace
    items = list(scope)
    for item in items:
        # item.split() == [item]: non-empty and free of whitespace (the same rule split() applies).
        if not isinstance(item, str) or item.split() != [item]:
            raise ValueError(f"invalid scope item {item!r}: scopes are non-empty strings without spaces")
    return " ".join(items) or None


class ServiceIdentity:
    """A service's name and private key; mints the tokens it sends.

    >>> import meshauth
    >>> me = meshauth.ServiceIdentity("orders", meshauth.SigningKey.generate())
    >>> token = me.token_for("payments")      # cached, refreshed ahead of expiry
    >>> token == me.token_for("payments")
    True
    >>> fresh = me.mint("payments")           # always new

    ``token_for`` is safe to call from many threads and asyncio tasks at once:
    concurrent callers on a cold cache share a single signature, and the
    cached path takes no lock.
    """

    def __init__(
        self,
        name: str,
        key: SigningKey,
        *,
        ttl: int = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        refresh_margin: float | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        problem = service_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(key, SigningKey):
            raise TypeError("key must be a meshauth.SigningKey")
        if not isinstance(ttl, int) or ttl <= _MIN_REMAINING:
            raise ValueError(f"ttl must be an integer number of seconds above {_MIN_REMAINING}")
        self.name = name
        self.key = key
        self.ttl = ttl
        self.clock = clock
        self._clock = clock
        # Refresh when a quarter of the lifetime (at most a minute) is left, so a
        # token is never sent close to its expiry.
        self.refresh_margin = (
            refresh_margin if refresh_margin is not None else max(float(_MIN_REMAINING), min(60.0, ttl / 4))
        )
        self._telemetry = Telemetry(tracer_provider)
        self._header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": SERVICE_TOKEN_TYPE}))
        self._response_header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": RESPONSE_TOKEN_TYPE}))
        self._txn_header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": TXN_TOKEN_TYPE}))
        # header segment -> the key that signs under it, while a rotation keeps two keys
        self._signers: dict[str, SigningKey] = {}
        # cache key -> (token, refresh at, expires at)
        self._tokens: dict[Any, tuple[str, float, int]] = {}
        self._locks: dict[Any, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **kwargs: Any) -> ServiceIdentity:
        """Build from ``MESHAUTH_SERVICE`` and ``MESHAUTH_KEY_FILE`` (and ``MESHAUTH_KEY_PASSWORD``)."""
        env = os.environ if environ is None else environ
        service = env.get("MESHAUTH_SERVICE")
        if not service:
            raise ConfigurationError(
                "environment variable MESHAUTH_SERVICE is not set: set it to this service's name",
                expected="MESHAUTH_SERVICE=<service name>",
                actual="unset",
            )
        key_file = env.get("MESHAUTH_KEY_FILE")
        if not key_file:
            raise ConfigurationError(
                f"environment variable MESHAUTH_KEY_FILE is not set: point it at {service!r}'s PEM private key "
                f"(create one with `meshauth keygen --service {service} --out keys`)",
                expected="MESHAUTH_KEY_FILE=<path to a PEM private key>",
                actual="unset",
            )
        if not os.path.exists(key_file):
            raise ConfigurationError(
                f"MESHAUTH_KEY_FILE names {key_file!r}, which does not exist: create the key with "
                f"`meshauth keygen --service {service} --out {os.path.dirname(key_file) or '.'}` "
                "and publish its public half with `meshauth registry add`",
                reason="invalid_key",
                expected="an existing PEM private key file",
                actual=key_file,
            )
        key = SigningKey.from_file(key_file, env.get("MESHAUTH_KEY_PASSWORD"))
        return cls(service, key, **kwargs)

    @classmethod
    def ephemeral(  # noqa: PLR0917 - the signature DESIGN section 10 fixes
        cls,
        name: str,
        publisher: RedisPublisher,
        alg: str = "ES256",
        ttl: int = DEFAULT_TTL,
        key_ttl: int = 3600,
        rotate_every: float = 3600,
        **kwargs: Any,
    ) -> EphemeralIdentity:
        """An identity whose keys live in memory only, published, renewed and rotated through Redis.

        See :class:`meshauth.redis.EphemeralIdentity` (needs the ``redis`` extra).
        """
        from ._ephemeral import EphemeralIdentity  # noqa: PLC0415 - needs the optional redis extra

        return EphemeralIdentity(
            name, publisher, alg=alg, ttl=ttl, key_ttl=key_ttl, rotate_every=rotate_every, **kwargs
        )

    def _use_key(self, key: SigningKey) -> None:
        """Sign with ``key`` from now on; tokens minted with the previous key stay valid."""
        header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": SERVICE_TOKEN_TYPE}))
        response_header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": RESPONSE_TOKEN_TYPE}))
        txn_header = b64url_encode(dumps({"alg": key.alg, "kid": key.kid, "typ": TXN_TOKEN_TYPE}))
        for old in (self._header, self._response_header, self._txn_header):
            self._signers[old] = self.key  # a mint that read the old header still signs consistently
        self._signers[header] = self._signers[response_header] = self._signers[txn_header] = key
        self.key, self._header, self._response_header, self._txn_header = key, header, response_header, txn_header
        self._tokens.clear()

    def _forget_key(self, key: SigningKey) -> None:
        for header, signer in list(self._signers.items()):
            if signer is key:
                self._signers.pop(header, None)

    # -- cached tokens ---------------------------------------------------------------

    def token_for(self, audience: str, *, scope: str | None = None, txn_token: str | None = None) -> str:
        """A token for calling ``audience``, from the cache while it is fresh.

        With ``txn_token`` (a Txn-Token received or issued for the current
        request) the token is bound to it (``tth``); it is cached per
        (audience, scope, Txn-Token).
        """
        cache_key = _cache_key(audience, scope, txn_token)
        entry = self._tokens.get(cache_key)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        return self._refresh(cache_key, audience, scope, txn_token, blocking=True)  # type: ignore[return-value]

    async def atoken_for(self, audience: str, *, scope: str | None = None, txn_token: str | None = None) -> str:
        """Like :meth:`token_for`, but never blocks the event loop on another refresh."""
        cache_key = _cache_key(audience, scope, txn_token)
        entry = self._tokens.get(cache_key)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        token = self._refresh(cache_key, audience, scope, txn_token, blocking=False)
        if token is None:
            # Another thread is signing this very token: wait for it off the loop.
            return await asyncio.to_thread(self.token_for, audience, scope=scope, txn_token=txn_token)
        return token

    def _lock_for(self, cache_key: Any) -> threading.Lock:
        lock = self._locks.get(cache_key)
        if lock is None:
            with self._locks_guard:
                lock = self._locks.setdefault(cache_key, threading.Lock())
        return lock

    def _refresh(
        self, cache_key: Any, audience: str, scope: str | None, txn_token: str | None, *, blocking: bool
    ) -> str | None:
        lock = self._lock_for(cache_key)
        entry = self._tokens.get(cache_key)
        usable = entry is not None and self._clock() < entry[2] - _MIN_REMAINING
        # With a still-usable token in hand, nobody waits: one caller refreshes,
        # the others keep using the current token meanwhile.
        if not lock.acquire(blocking=blocking and not usable):
            return entry[0] if usable and entry is not None else None
        try:
            entry = self._tokens.get(cache_key)
            now = self._clock()
            if entry is not None and now < entry[1]:
                return entry[0]
            token, expires = self._mint(audience, scope=_scope_text(scope), ttl=self.ttl, txn_token=txn_token)
            if txn_token is not None and len(self._tokens) >= _MAX_CACHED:
                self._prune(now)
            self._tokens[cache_key] = (token, expires - self.refresh_margin, expires)
            return token
        finally:
            lock.release()

    def _prune(self, now: float) -> None:
        """Keep the cache bounded: one entry per transaction would otherwise pile up."""
        for cache_key, entry in list(self._tokens.items()):
            if now >= entry[2] - _MIN_REMAINING or (len(self._tokens) >= _MAX_CACHED and isinstance(cache_key, tuple)):
                self._tokens.pop(cache_key, None)
        with self._locks_guard:
            for cache_key in [key for key in self._locks if key not in self._tokens and isinstance(key, tuple)]:
                lock = self._locks[cache_key]
                if not lock.locked():
                    del self._locks[cache_key]

    def invalidate(self, audience: str | None = None) -> None:
        """Drop cached tokens (all, or those for ``audience``), e.g. after a 401."""
        if audience is None:
            self._tokens.clear()
            return
        for cache_key in list(self._tokens):
            if cache_key == audience or (isinstance(cache_key, tuple) and cache_key[0] == audience):
                self._tokens.pop(cache_key, None)

    # -- fresh tokens ------------------------------------------------------------------

    def mint(
        self,
        audience: str,
        *,
        scope: str | Iterable[str] | None = None,
        ttl: int | None = None,
        txn_token: str | None = None,
    ) -> str:
        """A new token for ``audience`` (never cached), bound to ``txn_token`` when given (``tth``)."""
        token, _ = self._mint(
            audience, scope=_scope_text(scope), ttl=self.ttl if ttl is None else ttl, txn_token=txn_token
        )
        return token

    def on_behalf_of(self, principal: Principal, audience: str, *, scope: str | Iterable[str] | None = None) -> str:
        """A token for the next hop of ``principal``'s request: bound to its Txn-Token, if it came with one."""
        return self.token_for(audience, scope=_scope_text(scope), txn_token=principal.txn_token)

    def issue_txn_token(
        self,
        subject: str,
        *,
        scope: str | Iterable[str] | None = None,
        context: Mapping[str, Any] | None = None,
        request_context: Mapping[str, Any] | None = None,
        ttl: int = 300,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        txn: str | None = None,
    ) -> str:
        """A Transaction Token for ``subject`` (DESIGN section 9): issued once per user request, then forwarded.

        Only services listed in a verifier's ``txn_issuers`` are trusted to issue
        them (by default the gateway). ``context`` becomes ``tctx`` (e.g. the
        user's groups), ``request_context`` ``rctx`` (e.g. the client address).
        ``txn``, the transaction id, is 128 random bits unless the caller has
        one already (e.g. to log it before the token is issued).
        """
        if not isinstance(subject, str) or not subject:
            raise ValueError("subject must be a non-empty string (the end user)")
        if not isinstance(trust_domain, str) or not trust_domain:
            raise ValueError("trust_domain must be a non-empty string")
        if not isinstance(ttl, int) or not 0 < ttl <= MAX_TXN_LIFETIME:
            raise ValueError(f"a Txn-Token lives 1 to {MAX_TXN_LIFETIME} s")
        if txn is not None and (not isinstance(txn, str) or not 0 < len(txn) <= 256):
            raise ValueError("txn must be a non-empty string of at most 256 characters")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.name,
            "aud": trust_domain,
            "iat": now,
            "exp": now + ttl,
            "txn": secrets.token_urlsafe(16) if txn is None else txn,
            "sub": subject,
            "scope": _scope_text(scope) or "",
            "req_wl": self.name,
        }
        if request_context is not None:
            claims["rctx"] = dict(request_context)
        if context is not None:
            claims["tctx"] = dict(context)
        return self._sign(self._txn_header, claims, trust_domain, span_name="meshauth.txn.issue")

    def mint_response(
        self, caller: str, nonce: str, *, status: int = 200, body: bytes | None = None, ttl: int = 30
    ) -> str:
        """A response token (mutual auth) for ``caller``, bound to its request ``nonce`` and the answer.

        ``status`` is the HTTP status sent; ``body`` the body bytes exactly as
        sent (``body_sha256``), or None when the body is not known before the
        headers go out (a streamed answer: the token then does not bind it).
        ``caller`` is ``"-"`` when the request named none that could be read.
        """
        if not isinstance(caller, str) or not caller:
            raise ValueError("caller must be a non-empty service name (or '-')")
        if not isinstance(nonce, str) or not nonce or len(nonce) > 256:
            raise ValueError("nonce must be a non-empty string of at most 256 characters")
        if not 0 < ttl <= MAX_RESPONSE_TTL:
            raise ValueError(f"a response token lives at most {MAX_RESPONSE_TTL} s")
        if type(status) is not int or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, found {status!r}")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.name,
            "sub": self.name,
            "aud": caller,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(16),
            "nonce": nonce,
            "status": status,
        }
        if body is not None:
            claims["body_sha256"] = body_digest(body)
        return self._sign(self._response_header, claims, caller)

    def _mint(self, audience: str, *, scope: str | None, ttl: int, txn_token: str | None) -> tuple[str, int]:
        if not isinstance(audience, str) or not audience:
            raise ValueError("audience must be a non-empty service name")
        if not isinstance(ttl, int) or ttl <= 0:
            raise ValueError("ttl must be a positive integer number of seconds")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.name,
            "sub": self.name,
            "aud": audience,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if scope:
            claims["scope"] = scope
        if txn_token is not None:
            if not isinstance(txn_token, str) or not txn_token.isascii():
                raise ValueError("txn_token must be the Txn-Token as received (an ASCII string)")
            claims["tth"] = txn_hash(txn_token)
        return self._sign(self._header, claims, audience), claims["exp"]

    def _sign(self, header_b64: str, claims: dict[str, Any], audience: str, *, span_name: str = "meshauth.mint") -> str:
        # A plain span, not a current one: minting starts no child work, and
        # attaching a context would cost more than the JSON encoding.
        span = self._telemetry.start_span(span_name)
        try:
            if span.is_recording():
                span.set_attribute("meshauth.caller", self.name)
                span.set_attribute("meshauth.audience", audience)
                span.set_attribute("meshauth.subject", claims["sub"])
                span.set_attribute("meshauth.kid", self.key.kid)
                span.set_attribute("meshauth.alg", self.key.alg)
                if "txn" in claims:  # a Txn-Token: this service issues it
                    span.set_attribute("meshauth.txn_issuer", self.name)
                    span.set_attribute("meshauth.transaction", claims["txn"])
            signing_input = f"{header_b64}.{b64url_encode(dumps(claims))}"
            signature = self._signers.get(header_b64, self.key).sign(signing_input.encode("ascii"))
            return f"{signing_input}.{b64url_encode(signature)}"
        finally:
            span.end()

    def __repr__(self) -> str:
        return f"ServiceIdentity({self.name!r}, kid={self.key.kid!r}, ttl={self.ttl})"
