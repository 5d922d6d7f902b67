"""Replay protection: accept each token id once within its lifetime."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["MemoryReplayCache", "ReplayCache"]


@runtime_checkable
class ReplayCache(Protocol):
    """Storage for token ids already accepted.

    Implementations (Redis, a database) must make :meth:`add` atomic: of two
    concurrent calls with the same key exactly one returns ``True``.
    """

    def add(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``; ``False`` if it was already there."""
        ...


class MemoryReplayCache:
    """An in-process :class:`ReplayCache`, bounded and safe under threads.

    Entries are forgotten once their token has expired (plus ``grace``
    seconds, which should cover the verifier's leeway). When the cache is full
    of live entries, :meth:`add` refuses (returns ``False``): forgetting a live
    id would let that token be replayed, so the cache fails closed.
    """

    def __init__(
        self,
        max_entries: int = 1_000_000,
        *,
        grace: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.grace = grace
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, key: str, expires_at: float) -> bool:
        with self._lock:
            now = self._clock()
            previous = self._seen.get(key)
            if previous is not None and previous >= now:
                return False
            if len(self._seen) >= self.max_entries:
                self._purge(now)
                if len(self._seen) >= self.max_entries:
                    return False
            self._seen[key] = expires_at + self.grace
            return True

    def _purge(self, now: float) -> None:
        self._seen = {k: deadline for k, deadline in self._seen.items() if deadline >= now}

    def __len__(self) -> int:
        return len(self._seen)
