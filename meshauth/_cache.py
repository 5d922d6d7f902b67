"""The verified-token cache shared by meshauth's verifiers."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["VerifiedTokens"]

E = TypeVar("E", bound=tuple[Any, ...])


class VerifiedTokens(Generic[E]):
    """A bounded map from an exact token string to what verifying it produced.

    Each entry is a tuple whose second item is the time (on ``clock``) until
    which it may be used. Readers use :attr:`entries` directly (one dict
    lookup, no lock: the hot path of a cached verification). An insert takes no
    lock either while there is room, so racing threads may overshoot
    ``size`` by one entry each. When full, one sweeper at a time drops the
    expired entries and, if that frees less than an eighth, the oldest eighth:
    a busy verifier sweeps once per ``size / 8`` inserts, not on every insert.
    """

    __slots__ = ("_clock", "_lock", "entries", "size")

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self.entries: dict[str, E] = {}
        self.size = size
        self._clock = clock
        self._lock = threading.Lock()

    def put(self, token: str, entry: E) -> None:
        """Remember ``entry`` for ``token`` (a no-op when the cache is disabled with size 0)."""
        entries = self.entries
        if len(entries) < self.size:
            entries[token] = entry  # one atomic dict store
            return
        if self.size <= 0:
            return
        with self._lock:
            now = self._clock()
            # list() copies the items in one C call, so concurrent inserts
            # cannot break the iteration; pop() tolerates entries gone since.
            for stale, old in list(entries.items()):
                if old[1] <= now:
                    entries.pop(stale, None)
            room = max(1, self.size // 8)
            if len(entries) > self.size - room:
                for oldest in list(itertools.islice(iter(entries), room)):
                    entries.pop(oldest, None)
            entries[token] = entry

    def discard(self, token: str) -> None:
        """Forget ``token`` if it is cached."""
        self.entries.pop(token, None)

    def clear(self) -> None:
        """Forget every token."""
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
