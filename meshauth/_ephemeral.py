"""A replica's own in-memory keys, published, renewed, rotated and retired through the Redis registry."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._exceptions import MeshAuthError, Unavailable
from ._identity import ServiceIdentity
from ._keys import SigningKey
from ._redis_common import backoff, wait_for_redis
from ._redis_publish import RedisPublisher

__all__ = ["EphemeralIdentity"]

logger = logging.getLogger("meshauth.redis")


@dataclasses.dataclass(slots=True)
class _Published:
    key: SigningKey
    not_before: int
    expires: int
    retire_at: float | None = None  # set once the replica stopped signing with it


class EphemeralIdentity(ServiceIdentity):
    """A :class:`~meshauth.ServiceIdentity` whose key never touches a disk (DESIGN section 10).

    >>> me = meshauth.ServiceIdentity.ephemeral("orders", RedisPublisher(url))  # doctest: +SKIP

    The key is generated in memory and published with ``nbf``/``exp``
    (``exp`` = ``key_ttl`` ahead); the constructor returns once it is in Redis
    (at most ``startup_timeout`` seconds, then :class:`~meshauth.Unavailable`).
    :meth:`maintain` runs every ``check_every`` seconds on a background thread:

    * it renews the key every ``key_ttl / 3``, and republishes at once a key it
      finds missing (Redis restarted empty);
    * every ``rotate_every`` seconds it publishes a next key, waits
      ``propagation`` seconds so every verifier holds it, signs with it, and
      keeps the old key published until the old key's last token has expired
      (``ttl`` + ``leeway``), then deletes it;
    * when it finds its key revoked it switches to a new key at once and
      never publishes the revoked one again;
    * Redis failures are retried with backoff and jitter while the replica
      keeps signing with its current key.

    :meth:`close` deletes the replica's keys from the registry.
    """

    def __init__(
        self,
        name: str,
        publisher: RedisPublisher,
        *,
        alg: str = "ES256",
        ttl: int = 300,
        key_ttl: int = 3600,
        rotate_every: float = 3600,
        propagation: float = 2.0,
        leeway: int = 30,
        check_every: float = 1.0,
        startup_timeout: float = 10.0,
        background: bool = True,
        clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        if not isinstance(publisher, RedisPublisher):
            raise TypeError("publisher is a meshauth.redis.RedisPublisher")
        if key_ttl < 2 * ttl:
            raise ValueError(f"key_ttl ({key_ttl} s) must be at least twice the token ttl ({ttl} s)")
        if rotate_every <= propagation or propagation < 0:
            raise ValueError("rotate_every must be longer than propagation (and propagation non-negative)")
        super().__init__(name, SigningKey.generate(alg), ttl=ttl, clock=clock, **kwargs)
        self.publisher = publisher
        self.alg = alg
        self.key_ttl = key_ttl
        self.rotate_every = rotate_every
        self.propagation = propagation
        self.leeway = leeway
        self.check_every = check_every
        self._published: dict[str, _Published] = {}
        self._revoked: set[str] = set()
        self._next: tuple[SigningKey, float] | None = None  # the key being propagated, and when to switch
        self._current_since = clock()
        self._renewed_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing: str | None = None
        self._start(startup_timeout)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"meshauth-ephemeral-{name}", daemon=True)
            self._thread.start()

    # -- lifecycle ----------------------------------------------------------------------

    def _start(self, startup_timeout: float) -> None:
        def publish() -> None:
            self._publish(self.key, "publish")
            self._renewed_at = self._clock()

        wait_for_redis(
            publish,
            startup_timeout,
            lambda exc: Unavailable(
                f"{self.name}: could not publish its key to {self.publisher.where} "
                f"within {startup_timeout:g} s: {exc.detail}",
                expected="a reachable Redis server",
                actual=exc.detail,
            ),
        )

    def close(self) -> None:
        """Stop maintenance and delete this replica's keys from the registry."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.check_every + 10)
        with self._lock:
            for kid in list(self._published):
                try:
                    self.publisher.delete(self.name, kid)
                except MeshAuthError as exc:
                    logger.warning("meshauth %s: could not delete key %s on close: %s", self.name, kid, exc.detail)
            self._published.clear()

    def __enter__(self) -> EphemeralIdentity:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def kids(self) -> list[str]:
        """The kids this replica has published and not yet deleted (current first)."""
        return sorted(self._published, key=lambda kid: kid != self.key.kid)

    # -- maintenance --------------------------------------------------------------------

    def maintain(self) -> None:
        """One maintenance step now (the background thread calls this every ``check_every`` s)."""
        with self._lock:
            now = self._clock()
            present, revoked = self.publisher.key_state(self.name, self._published)
            if revoked:
                self._on_revoked(revoked, now)
            for kid, entry in list(self._published.items()):
                if kid not in present and kid not in revoked:
                    self._publish(entry.key, "publish", entry)  # Redis lost it: put it back
            if now >= self._renewed_at + self.key_ttl / 3:
                self._renew(now)
            self._rotate(now)
            self._retire(now)

    def _on_revoked(self, revoked: set[str], now: float) -> None:
        self._revoked |= revoked
        for kid in revoked:
            entry = self._published.pop(kid, None)
            if entry is not None:
                self._forget_key(entry.key)
        if self._next is not None and self._next[0].kid in revoked:
            self._next = None
        if self.key.kid in revoked:
            logger.warning("meshauth %s: its key %s was revoked: switching to a new key now", self.name, self.key.kid)
            fresh = self._next[0] if self._next is not None else SigningKey.generate(self.alg)
            if self._next is None:
                self._publish(fresh, "publish")
            self._next = None
            self._use_key(fresh)
            self._current_since = now

    def _renew(self, now: float) -> None:
        for entry in self._published.values():
            if entry.retire_at is None:
                entry.expires = int(now) + self.key_ttl
                self._publish(entry.key, "renew", entry)
        self._renewed_at = now
        # Keys of this service's replicas that died without closing: no token of theirs verifies any more.
        self.publisher.prune_expired(self.name, now - self.leeway)

    def _rotate(self, now: float) -> None:
        if self._next is None and now >= self._current_since + self.rotate_every:
            fresh = SigningKey.generate(self.alg)
            self._publish(fresh, "publish")
            self._next = (fresh, now + self.propagation)
        if self._next is not None and now >= self._next[1]:
            old = self._published.get(self.key.kid)
            self._use_key(self._next[0])
            self._next = None
            self._current_since = now
            if old is not None:
                # Tokens signed just before the switch live ttl more seconds, plus the verifiers' leeway.
                old.retire_at = now + self.ttl + self.leeway
                if old.expires < old.retire_at:
                    old.expires = int(old.retire_at) + 1
                    self._publish(old.key, "renew", old)

    def _retire(self, now: float) -> None:
        for kid, entry in list(self._published.items()):
            if entry.retire_at is not None and now >= entry.retire_at:
                self.publisher.delete(self.name, kid)
                del self._published[kid]
                self._forget_key(entry.key)

    def _publish(self, key: SigningKey, op: str, entry: _Published | None = None) -> None:
        if key.kid in self._revoked:
            return
        if entry is None:
            now = int(self._clock())
            entry = self._published.get(key.kid) or _Published(key, now, now + self.key_ttl)
        self.publisher.publish(key.record(self.name, not_before=entry.not_before, expires=entry.expires), op=op)
        self._published[key.kid] = entry

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._delay(failures)):
            try:
                self.maintain()
            except Exception as exc:
                failures += 1
                detail = exc.detail if isinstance(exc, MeshAuthError) else f"{type(exc).__name__}: {exc}"
                if self._failing != detail:
                    logger.warning("meshauth %s: key maintenance failed (will retry): %s", self.name, detail)
                self._failing = detail
                continue
            failures = 0
            self._failing = None

    def _delay(self, failures: int) -> float:
        if failures == 0:
            return self.check_every
        return backoff(failures, base=self.check_every, cap=30.0, doublings=5)
