"""Replay protection: accept each token id once within its lifetime."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ._exceptions import ReplayStoreUnavailable

__all__ = ["MemoryReplayCache", "ReplayCache"]

# Expired entries dropped on each add beyond what the add itself needs: enough to
# keep up with any arrival rate, small enough to bound the time under the lock.
_PURGE_STEP = 8


@runtime_checkable
class ReplayCache(Protocol):
    """Storage for token ids already accepted, per issuer.

    Implementations (Redis, a database) must make :meth:`add` atomic: of two
    concurrent calls with the same ``(issuer, jti)`` exactly one returns
    ``True``. A store that cannot tell (full, unreachable) raises
    :class:`~meshauth.ReplayStoreUnavailable`: it never answers ``False`` for
    a token it has not seen, because ``False`` means *replayed*.

    A store reached over the network may also offer ``async def aadd(issuer,
    jti, expires_at) -> bool`` with the same meaning: async verifiers
    (``Verifier.averify``, the ASGI middleware) await it instead of calling
    :meth:`add` on the event loop.
    """

    def add(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record ``jti`` of ``issuer`` until ``expires_at``; ``False`` if it was already there."""
        ...


class MemoryReplayCache:
    """An in-process :class:`ReplayCache`, bounded per issuer and safe under threads.

    >>> import time
    >>> cache = MemoryReplayCache(max_entries=1000)
    >>> cache.add("orders", "j1", time.time() + 60), cache.add("orders", "j1", time.time() + 60)
    (True, False)

    Entries are forgotten once their token has expired (plus ``grace``
    seconds, which should cover the verifier's leeway), a few at a time on each
    :meth:`add`, so no call ever rebuilds the whole cache. Capacity is
    partitioned: one issuer holds at most ``max_per_issuer`` live entries
    (default a tenth of ``max_entries``), so a caller flooding the cache with
    fresh tokens exhausts its own share, never the others'. When a share (or
    the whole cache) is full of live entries, :meth:`add` raises
    :class:`~meshauth.ReplayStoreUnavailable` (HTTP 503): forgetting a live id
    would let that token be replayed, and calling a new token *replayed*
    would be a false accusation.
    """

    def __init__(
        self,
        max_entries: int = 1_000_000,
        *,
        max_per_issuer: int | None = None,
        grace: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_per_issuer = max(1, max_entries // 10) if max_per_issuer is None else max_per_issuer
        if not 1 <= self.max_per_issuer <= max_entries:
            raise ValueError("max_per_issuer must be between 1 and max_entries")
        self.grace = grace
        self._clock = clock
        self._seen: dict[str, dict[str, float]] = {}  # issuer -> jti -> forget after
        self._deadlines: list[tuple[float, str, str]] = []  # heap of (forget after, issuer, jti)
        self._size = 0
        self._lock = threading.Lock()

    def add(self, issuer: str, jti: str, expires_at: float) -> bool:
        with self._lock:
            now = self._clock()
            self._purge(now, _PURGE_STEP)
            entries = self._seen.get(issuer)
            if entries is None:
                entries = self._seen[issuer] = {}
            previous = entries.get(jti)
            if previous is not None and previous >= now:
                return False
            if len(entries) >= self.max_per_issuer or self._size >= self.max_entries:
                # Make room only from entries that are already dead.
                self._purge(now, None, until_room_for=entries)
            if len(entries) >= self.max_per_issuer:
                raise ReplayStoreUnavailable(
                    f"replay cache: issuer {issuer[:128]!r} holds its whole share of live token ids",
                    expected=f"at most {self.max_per_issuer} live token ids per issuer",
                    actual=len(entries),
                )
            if self._size >= self.max_entries:
                raise ReplayStoreUnavailable(
                    "replay cache is full of live token ids",
                    expected=f"at most {self.max_entries} live token ids",
                    actual=self._size,
                )
            deadline = expires_at + self.grace
            if previous is None:
                self._size += 1
            entries[jti] = deadline
            heapq.heappush(self._deadlines, (deadline, issuer, jti))
            return True

    def _purge(self, now: float, limit: int | None, until_room_for: dict[str, float] | None = None) -> None:
        """Drop up to ``limit`` dead entries (all of them with ``None``), earliest first."""
        heap = self._deadlines
        dropped = 0
        while heap and heap[0][0] < now and (limit is None or dropped < limit):
            deadline, issuer, jti = heapq.heappop(heap)
            entries = self._seen.get(issuer)
            # A jti re-added after it died has a newer deadline: this heap entry is stale.
            if entries is not None and entries.get(jti) == deadline:
                del entries[jti]
                self._size -= 1
                if not entries and until_room_for is not entries:
                    del self._seen[issuer]
            dropped += 1
            if (
                until_room_for is not None
                and len(until_room_for) < self.max_per_issuer
                and self._size < self.max_entries
            ):
                return

    def __len__(self) -> int:
        return self._size
