"""Replay protection: each token id accepted once within its lifetime."""

from __future__ import annotations

import threading

import pytest

import meshauth
from meshauth.testing import FakeClock, Mesh


def test_memory_replay_cache_accepts_each_key_once(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(clock=clock, grace=0)
    assert cache.add("orders\x00j1", clock() + 10)
    assert not cache.add("orders\x00j1", clock() + 10)
    assert cache.add("orders\x00j2", clock() + 10)
    clock.advance(11)
    assert cache.add("orders\x00j1", clock() + 10)  # the first entry expired with its token
    assert isinstance(cache, meshauth.ReplayCache)


def test_full_cache_fails_closed_then_recovers(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(max_entries=2, clock=clock, grace=0)
    assert cache.add("a", clock() + 5) and cache.add("b", clock() + 5)
    assert not cache.add("c", clock() + 5)  # cannot remember it, so cannot accept it
    clock.advance(6)
    assert cache.add("c", clock() + 5)
    assert len(cache) == 1


def test_concurrent_adds_of_one_key_accept_exactly_once(clock: FakeClock) -> None:
    cache = meshauth.MemoryReplayCache(clock=clock)
    barrier = threading.Barrier(32)
    results: list[bool] = []

    def add() -> None:
        barrier.wait(5)
        results.append(cache.add("orders\x00same", clock() + 60))

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
    cache = meshauth.MemoryReplayCache(clock=mesh.clock)
    verifier = mesh.verifier("payments", replay_cache=cache)
    verifier.verify(mesh.identity("orders").mint("payments"))
    verifier.verify(mesh.identity("billing").mint("payments"))
    assert len(cache) == 2
    assert all(key.split("\x00")[0] in {"orders", "billing"} for key in cache._seen)


def test_a_failing_replay_store_is_an_outage_not_a_bad_token(mesh: Mesh) -> None:
    class Down:
        def add(self, key: str, expires_at: float) -> bool:
            raise ConnectionError("store unreachable")

    verifier = mesh.verifier("payments", replay_cache=Down())
    with pytest.raises(meshauth.ReplayStoreUnavailable, match="replay cache failed"):
        verifier.verify(mesh.identity("orders").mint("payments"))
