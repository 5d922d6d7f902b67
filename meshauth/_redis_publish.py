"""Writing the Redis registry (``RedisPublisher``) and shared replay protection (``RedisReplayCache``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._exceptions import ConfigurationError, ReplayStoreUnavailable, Unavailable
from ._keys import KeyRecord, parse_jwk
from ._redis_common import Namespace, check_service, connect, describe, redis_errors

__all__ = ["RedisPublisher", "RedisReplayCache"]

# A tombstone for a kid whose exp is unknown lasts this long (a day: longer than any token).
_UNKNOWN_EXP_TTL = 86400


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisPublisher:
    """Writes keys to the Redis registry and announces each change on the events stream.

    >>> publisher = RedisPublisher("redis://127.0.0.1:6379/0")            # doctest: +SKIP
    >>> me = meshauth.ServiceIdentity.ephemeral("orders", publisher)      # doctest: +SKIP

    A service's replicas use it through :meth:`ServiceIdentity.ephemeral
    <meshauth.ServiceIdentity.ephemeral>`; operators use :meth:`revoke` and
    :meth:`revoke_service` (or ``meshauth registry --redis URL revoke``).
    With Redis ACLs, a replica's user may write only its own service's hash
    (docs/registry.md gives the ``ACL SETUSER`` lines); a denial raises
    :class:`~meshauth.ConfigurationError` naming the command and the key.
    """

    def __init__(
        self,
        client_or_url: Any,
        namespace: str = "meshauth",
        *,
        max_events: int = 10_000,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ns = Namespace(namespace)
        self.client = connect(client_or_url, timeout=timeout)
        self.where = describe(self.client)
        self.max_events = max_events
        self._clock = clock

    def publish(self, record: KeyRecord | Mapping[str, Any], *, op: str = "publish") -> None:
        """Put one key (a :class:`~meshauth.KeyRecord` or registry JWK with ``nbf``/``exp``) in its service's hash.

        Refused with :class:`~meshauth.ConfigurationError` when the kid was revoked:
        revocation is final.
        """
        if not isinstance(record, KeyRecord):
            record = parse_jwk(record, "published key")
        service = check_service(record.owner)
        if record.not_before is None or record.expires is None:
            raise ConfigurationError(
                "a key published on Redis needs nbf and exp", expected="integers", actual="missing", kid=record.kid
            )
        ns = self.ns
        with redis_errors(self.client, "HEXISTS", ns.revoked):
            if self.client.hexists(ns.revoked, record.kid):
                raise ConfigurationError(
                    f"kid {record.kid} of {service} was revoked: revocation is final, publish a new key",
                    reason="revoked_key",
                    kid=record.kid,
                )
        text = json.dumps(dict(record.jwk), separators=(",", ":"), sort_keys=True)
        with redis_errors(self.client, "HSET/SADD/XADD", ns.keys(service)), self.client.pipeline() as pipe:
            pipe.hset(ns.keys(service), record.kid, text)
            pipe.sadd(ns.services, service)
            self._announce(pipe, service, record.kid, op)
            pipe.execute()

    def delete(self, service: str, kid: str) -> None:
        """Remove a retired key of ``service`` (no tombstone: see :meth:`revoke` for a compromised key)."""
        ns = self.ns
        with redis_errors(self.client, "HDEL/XADD", ns.keys(check_service(service))), self.client.pipeline() as pipe:
            pipe.hdel(ns.keys(service), kid)
            self._announce(pipe, service, kid, "delete")
            pipe.execute()

    def prune_expired(self, service: str, before: float) -> list[str]:
        """Delete ``service``'s keys whose ``exp`` is before ``before`` (replicas that died without closing)."""
        ns = self.ns
        key = ns.keys(check_service(service))
        with redis_errors(self.client, "HGETALL", key):
            entries = self.client.hgetall(key)
        dead = [_text(kid) for kid, value in entries.items() if self._expiry(value) < before]
        for kid in dead:
            self.delete(service, kid)
        return dead

    def key_state(self, service: str, kids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Which of ``kids`` are in ``service``'s hash, and which are revoked."""
        kids = list(kids)
        if not kids:
            return set(), set()
        ns = self.ns
        with redis_errors(self.client, "HMGET", ns.keys(check_service(service))), self.client.pipeline() as pipe:
            pipe.hmget(ns.keys(service), kids)
            pipe.hmget(ns.revoked, kids)
            present, revoked = pipe.execute()
        return (
            {kid for kid, value in zip(kids, present, strict=True) if value is not None},
            {kid for kid, value in zip(kids, revoked, strict=True) if value is not None},
        )

    def revoke(self, kid: str) -> list[str]:
        """Revoke ``kid`` for good: delete it wherever it is published, tombstone it, announce it.

        Returns the services that had it (the tombstone is written even when none had).
        """
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise ConfigurationError("a kid is a non-empty string of at most 256 characters")
        ns = self.ns
        services = self.services()
        with redis_errors(self.client, "HGET", f"{{{ns.name}}}:keys:*"), self.client.pipeline(False) as pipe:
            for service in services:
                pipe.hget(ns.keys(service), kid)
            found = [(s, v) for s, v in zip(services, pipe.execute(), strict=True) if v is not None]
        expires = max((self._expiry(value) for _, value in found), default=int(self._clock()) + _UNKNOWN_EXP_TTL)
        with redis_errors(self.client, "HSET/HDEL/XADD", ns.revoked), self.client.pipeline() as pipe:
            pipe.hset(ns.revoked, kid, expires)
            for service, _ in found:
                pipe.hdel(ns.keys(service), kid)
                self._announce(pipe, service, kid, "revoke")
            pipe.execute()
        self.prune_tombstones()
        return [service for service, _ in found]

    def revoke_service(self, name: str) -> list[str]:
        """Revoke every key of service ``name`` and forget the service; returns the revoked kids."""
        ns = self.ns
        key = ns.keys(check_service(name))
        with redis_errors(self.client, "HGETALL", key):
            entries = self.client.hgetall(key)
        kids = [_text(kid) for kid in entries]
        with redis_errors(self.client, "HSET/DEL/SREM/XADD", key), self.client.pipeline() as pipe:
            for kid, value in entries.items():
                pipe.hset(ns.revoked, _text(kid), self._expiry(value))
            pipe.delete(key)
            pipe.srem(ns.services, name)
            self._announce(pipe, name, "*", "revoke")
            pipe.execute()
        return kids

    def services(self) -> list[str]:
        """The services that have published (sorted)."""
        with redis_errors(self.client, "SMEMBERS", self.ns.services):
            return sorted(_text(name) for name in self.client.smembers(self.ns.services))

    def prune_tombstones(self) -> int:
        """Drop tombstones whose key has expired (no token of it can verify any more)."""
        now = int(self._clock())
        with redis_errors(self.client, "HGETALL/HDEL", self.ns.revoked):
            stale = [kid for kid, exp in self.client.hgetall(self.ns.revoked).items() if _int(exp, now + 1) < now]
            if stale:
                self.client.hdel(self.ns.revoked, *stale)
        return len(stale)

    def _announce(self, pipe: Any, service: str, kid: str, op: str) -> None:
        fields = {"service": service, "kid": kid, "op": op}
        pipe.xadd(self.ns.events, fields, maxlen=self.max_events, approximate=True)

    def _expiry(self, value: Any) -> int:
        try:
            exp = json.loads(_text(value)).get("exp")
        except (ValueError, AttributeError):
            exp = None
        return exp if type(exp) is int else int(self._clock()) + _UNKNOWN_EXP_TTL


def _int(value: Any, default: int) -> int:
    try:
        return int(_text(value))
    except ValueError:
        return default


class RedisReplayCache:
    """A :class:`~meshauth.ReplayCache` shared by every replica: ``SET NX PX`` per issuer and ``jti``.

    >>> verifier = meshauth.Verifier("payments", keys, replay_cache=RedisReplayCache(url))  # doctest: +SKIP

    Unreachable, slow (over ``timeout`` seconds) or full (``OOM``) Redis raises
    :class:`~meshauth.ReplayStoreUnavailable` (HTTP 503): the token is neither
    accepted nor called a replay.
    """

    def __init__(
        self,
        client_or_url: Any,
        namespace: str = "meshauth",
        *,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ns = Namespace(namespace)
        self.client = connect(client_or_url, timeout=timeout)
        self._clock = clock

    async def aadd(self, issuer: str, jti: str, expires_at: float) -> bool:
        """:meth:`add` for async verifiers: the round trip runs in a worker thread, never on the loop.

        A slow or unreachable Redis then delays only the requests that wait for it (up to
        ``timeout``), not every other task of the service.
        """
        return await asyncio.to_thread(self.add, issuer, jti, expires_at)

    def add(self, issuer: str, jti: str, expires_at: float) -> bool:
        key = self.ns.jti(issuer, jti)
        ttl_ms = max(1, int((expires_at - self._clock()) * 1000))
        try:
            with redis_errors(self.client, "SET NX PX", f"{{{self.ns.name}}}:jti:{issuer}:*"):
                return bool(self.client.set(key, b"1", nx=True, px=ttl_ms))
        except Unavailable as exc:
            raise ReplayStoreUnavailable(f"replay store: {exc.detail}") from exc
