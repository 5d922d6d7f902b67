"""Replay protection: each token id accepted once within its lifetime."""

from __future__ import annotations

import threading
import time

import pytest

import meshauth
from meshauth.testing import FakeClock, Mesh


def test_memory_replay_cache_accepts_each_key_once(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(clock=clock, grace=0)
    assert cache.add("orders", "j1", clock() + 10)
    assert not cache.add("orders", "j1", clock() + 10)
    assert cache.add("orders", "j2", clock() + 10)
    assert cache.add("billing", "j1", clock() + 10)  # the same jti from another issuer is another token
    clock.advance(11)
    assert cache.add("orders", "j1", clock() + 10)  # the first entry expired with its token
    assert isinstance(cache, meshauth.ReplayCache)


def test_full_cache_is_unavailable_not_replayed_then_recovers(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=2, max_per_issuer=2, clock=clock, grace=0)
    assert cache.add("orders", "a", clock() + 5) and cache.add("orders", "b", clock() + 5)
    with pytest.raises(meshauth.ReplayStoreUnavailable) as info:
        cache.add("orders", "c", clock() + 5)  # cannot remember it, so cannot accept it
    assert info.value.reason == "replay_store_unavailable" and "share" in str(info.value)
    assert not cache.add("orders", "a", clock() + 5)  # a real replay is still a replay when full
    clock.advance(6)
    assert cache.add("orders", "c", clock() + 5)
    assert len(cache) == 1


def test_whole_cache_full_across_issuers_is_unavailable(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=4, max_per_issuer=2, clock=clock, grace=0)
    for issuer in ("a", "b"):
        for jti in ("1", "2"):
            assert cache.add(issuer, jti, clock() + 5)
    with pytest.raises(meshauth.ReplayStoreUnavailable, match="full of live token ids"):
        cache.add("c", "1", clock() + 5)


def test_one_flooding_issuer_cannot_exhaust_the_cache_for_others(clock: FakeClock) -> None:
    """One service sending 50,000 fresh tokens must not make another's new token fail."""
    cache = meshauth.MemoryReplayCache(max_entries=50_000, clock=clock)
    refused = 0
    for n in range(50_000):
        try:
            cache.add("flooder", f"t{n}", clock() + 300)
        except meshauth.ReplayStoreUnavailable:
            refused += 1
    assert refused == 50_000 - cache.max_per_issuer
    for n in range(100):
        assert cache.add(f"service-{n % 5}", f"fresh-{n}", clock() + 300)
    assert not cache.add("service-0", "fresh-0", clock() + 300)  # a real replay is still caught


def test_a_full_cache_costs_no_full_rebuild(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=50_000, max_per_issuer=50_000, clock=clock, grace=0)
    for n in range(50_000):
        cache.add("orders", f"t{n}", clock() + 1 + n % 7)
    refused = 0
    started = time.perf_counter()
    for n in range(1000):
        try:
            cache.add("orders", f"new{n}", clock() + 60)
        except meshauth.ReplayStoreUnavailable:
            refused += 1
    per_add = (time.perf_counter() - started) / 1000
    assert refused == 1000
    assert per_add < 0.0005, f"{per_add * 1e6:.0f} us per add on a full cache"
    clock.advance(3)  # some entries die: each add now frees room by dropping a few dead ones
    started = time.perf_counter()
    for n in range(1000):
        assert cache.add("orders", f"later{n}", clock() + 60)
    assert (time.perf_counter() - started) / 1000 < 0.0005
    assert len(cache) < 50_000  # and the dead ones are going, a few per add


def test_expired_entries_are_purged_incrementally(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=1000, max_per_issuer=1000, clock=clock, grace=0)
    for n in range(100):
        cache.add("orders", f"t{n}", clock() + 1)
    clock.advance(2)
    cache.add("orders", "new", clock() + 1)
    assert 80 < len(cache) < 100  # a few dead entries dropped, not all of them at once
    for n in range(20):
        cache.add("billing", f"b{n}", clock() + 60)
    assert len(cache) == 21  # dead entries gone, a little at a time
    assert not cache.add("billing", "b3", clock() + 60)


def test_concurrent_adds_of_one_key_accept_exactly_once(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(clock=clock)
    barrier = threading.Barrier(32)
    results: list[bool] = []

    def add() -> None:
        barrier.wait(5)
        results.append(cache.add("orders", "same", clock() + 60))

    threads = [threading.Thread(target=add) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results.count(True) == 1 and len(results) == 32


def test_verifier_rejects_a_replayed_token(mesh: Mesh) -> None:
    verifier = mesh.verifier("payments", replay_cache=meshauth.MemoryReplayCache(clock=mesh.clock))
    token = mesh.identity("orders").mint("payments")
    assert verifier.verify(token).caller == "orders"
    with pytest.raises(meshauth.TokenReplayed) as info:
        verifier.verify(token)
    assert info.value.reason == "replayed"
    assert verifier.verify(mesh.identity("orders").mint("payments"))  # a fresh jti is fine


def test_replay_key_includes_the_issuer(mesh: Mesh) -> None:
    seen: list[tuple[str, str]] = []

    class Recording:
        def add(self, issuer: str, jti: str, expires_at: float) -> bool:
            seen.append((issuer, jti))
            return True

    verifier = mesh.verifier("payments", replay_cache=Recording())
    verifier.verify(mesh.identity("orders").mint("payments"))
    verifier.verify(mesh.identity("billing").mint("payments"))
    assert [issuer for issuer, _ in seen] == ["orders", "billing"]


def test_a_failing_replay_store_is_an_outage_not_a_bad_token(mesh: Mesh) -> None:
    class Down:
        def add(self, issuer: str, jti: str, expires_at: float) -> bool:
            raise ConnectionError("store unreachable")

    verifier = mesh.verifier("payments", replay_cache=Down())
    with pytest.raises(meshauth.ReplayStoreUnavailable, match="replay cache failed"):
        verifier.verify(mesh.identity("orders").mint("payments"))


def test_a_flooded_cache_answers_503_to_the_flooder_only(mesh: Mesh) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=50, clock=mesh.clock)
    verifier = mesh.verifier("payments", replay_cache=cache)
    orders = mesh.identity("orders")
    for _ in range(cache.max_per_issuer):
        verifier.verify(orders.mint("payments"))
    with pytest.raises(meshauth.ReplayStoreUnavailable):
        verifier.verify(orders.mint("payments"))
    assert verifier.verify(mesh.identity("billing").mint("payments")).caller == "billing"
