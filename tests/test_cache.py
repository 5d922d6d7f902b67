"""The verified-token cache shared by the service-token and user-token verifiers."""

from __future__ import annotations

from meshauth._cache import VerifiedTokens
from meshauth.testing import FakeClock


def test_full_of_live_tokens_evicts_the_oldest_eighth_at_once(clock: FakeClock) -> None:
    cache: VerifiedTokens[tuple[str, float]] = VerifiedTokens(16, clock)
    for n in range(16):
        cache.put(f"t{n}", (f"p{n}", clock() + 60))
    cache.put("new", ("p", clock() + 60))
    assert "t0" not in cache.entries and "t1" not in cache.entries  # 16 // 8 = 2 oldest gone
    assert "t2" in cache.entries and "new" in cache.entries
    assert len(cache) == 15
    cache.put("next", ("p", clock() + 60))  # room now: no sweep, nothing else evicted
    assert len(cache) == 16 and "t2" in cache.entries


def test_expired_entries_go_first(clock: FakeClock) -> None:
    cache: VerifiedTokens[tuple[str, float]] = VerifiedTokens(8, clock)
    for n in range(8):
        cache.put(f"t{n}", ("p", clock() + (10 if n % 2 else 100)))
    clock.advance(50)
    cache.put("new", ("p", clock() + 60))
    assert sorted(cache.entries) == ["new", "t0", "t2", "t4", "t6"]


def test_size_zero_disables_the_cache(clock: FakeClock) -> None:
    cache: VerifiedTokens[tuple[str, float]] = VerifiedTokens(0, clock)
    cache.put("t", ("p", clock() + 60))
    assert len(cache) == 0
    cache.discard("t")
    cache.clear()
