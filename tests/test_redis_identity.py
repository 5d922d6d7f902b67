"""Ephemeral identities, the publisher and the shared replay cache against real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import meshauth
from meshauth.testing import FakeClock

pytest.importorskip("redis_support")
pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")

from meshauth.redis import EphemeralIdentity, RedisKeys, RedisPublisher, RedisReplayCache


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def publisher(redis_namespace: tuple[str, str], wall: FakeClock) -> RedisPublisher:
    url, namespace = redis_namespace
    return RedisPublisher(url, namespace, clock=wall)


@pytest.fixture
def keys(redis_namespace: tuple[str, str]) -> Iterator[RedisKeys]:
    url, namespace = redis_namespace
    source = RedisKeys(url, namespace, follow=False)
    yield source
    source.close()


def replica(publisher: RedisPublisher, wall: FakeClock, **options: Any) -> EphemeralIdentity:
    options = {"ttl": 60, "key_ttl": 600, "rotate_every": 300, "leeway": 30, **options}
    return meshauth.ServiceIdentity.ephemeral("orders", publisher, background=False, clock=wall, **options)


def stored(publisher: RedisPublisher, service: str = "orders") -> dict[str, Any]:
    import json

    raw = publisher.client.hgetall(publisher.ns.keys(service))
    return {kid.decode(): json.loads(value) for kid, value in raw.items()}


def test_ephemeral_publishes_its_key_with_a_window_and_deletes_it_on_close(
    publisher: RedisPublisher, keys: RedisKeys, wall: FakeClock
) -> None:
    me = replica(publisher, wall)
    assert me.key.kid in stored(publisher)
    jwk = stored(publisher)[me.key.kid]
    assert jwk["iss"] == "orders" and jwk["exp"] - jwk["nbf"] == 600 and "d" not in jwk
    keys.reload()
    verifier = meshauth.Verifier("payments", keys, clock=wall)
    assert verifier.verify(me.token_for("payments")).caller == "orders"
    me.close()
    assert stored(publisher) == {}


def test_key_ttl_must_cover_two_token_lifetimes(publisher: RedisPublisher, wall: FakeClock) -> None:
    with pytest.raises(ValueError, match="at least twice"):
        replica(publisher, wall, ttl=300, key_ttl=599)


def test_renews_every_third_of_key_ttl(publisher: RedisPublisher, wall: FakeClock) -> None:
    me = replica(publisher, wall, rotate_every=10_000)
    first_exp = stored(publisher)[me.key.kid]["exp"]
    wall.advance(150)
    me.maintain()
    assert stored(publisher)[me.key.kid]["exp"] == first_exp  # not yet
    wall.advance(51)
    me.maintain()
    assert stored(publisher)[me.key.kid]["exp"] == int(wall()) + 600
    me.close()


def test_republishes_at_once_when_redis_lost_its_key(publisher: RedisPublisher, wall: FakeClock) -> None:
    me = replica(publisher, wall)
    publisher.client.delete(publisher.ns.keys("orders"))  # as after a restart with nothing on disk
    me.maintain()
    assert me.key.kid in stored(publisher)
    me.close()


def test_rotation_publishes_waits_switches_keeps_then_deletes(
    publisher: RedisPublisher, keys: RedisKeys, wall: FakeClock
) -> None:
    me = replica(publisher, wall, propagation=2.0)
    verifier = meshauth.Verifier("payments", keys, clock=wall)
    old = me.key
    wall.advance(300)
    me.maintain()  # publishes the next key, still signs with the old one
    assert me.key is old and len(stored(publisher)) == 2
    old_token = me.token_for("payments")
    wall.advance(2)
    me.maintain()  # propagation waited: switch
    assert me.key is not old
    new_token = me.token_for("payments")
    assert new_token != old_token
    keys.reload()
    assert verifier.verify(old_token).caller == "orders"  # the old key is kept for its last tokens
    assert verifier.verify(new_token).kid == me.key.kid
    wall.advance(60 + 30 - 1)
    me.maintain()
    assert old.kid in stored(publisher)
    wall.advance(1)
    me.maintain()  # ttl + leeway after the switch: the old key goes
    assert list(stored(publisher)) == [me.key.kid]
    me.close()


def test_a_revoked_key_rotates_at_once_and_never_comes_back(
    publisher: RedisPublisher, keys: RedisKeys, wall: FakeClock
) -> None:
    me = replica(publisher, wall)
    revoked = me.key
    assert publisher.revoke(revoked.kid) == ["orders"]
    me.maintain()
    assert me.key is not revoked
    assert list(stored(publisher)) == [me.key.kid]
    publisher.client.delete(publisher.ns.revoked)  # even if the tombstone were lost...
    wall.advance(1000)
    me.maintain()  # ...renewal and republication never bring the revoked kid back
    assert revoked.kid not in stored(publisher)
    keys.reload()
    assert meshauth.Verifier("payments", keys, clock=wall).verify(me.token_for("payments")).caller == "orders"
    me.close()


def test_start_up_waits_bounded_then_says_why() -> None:
    from redis_support import free_port

    port = free_port()
    publisher = RedisPublisher(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(
        meshauth.Unavailable, match=rf"could not publish its key to redis 127.0.0.1:{port}/0 within 0.5 s"
    ):
        meshauth.ServiceIdentity.ephemeral("orders", publisher, startup_timeout=0.5)
    assert time.monotonic() - started < 3


def test_background_maintenance_survives_an_outage_and_republishes(redis_server: Any) -> None:
    publisher = RedisPublisher(redis_server.url, timeout=0.3)
    me = meshauth.ServiceIdentity.ephemeral("orders", publisher, check_every=0.05)
    keys = RedisKeys(redis_server.url, block=0.2, timeout=0.3)
    verifier = meshauth.Verifier("payments", keys)
    redis_server.stop()
    time.sleep(0.3)  # maintenance fails a few times (with backoff) meanwhile
    assert verifier.verify(me.mint("payments")).caller == "orders"  # from memory
    redis_server.start()  # empty
    deadline = time.monotonic() + 10
    while me.key.kid.encode() not in redis_server.client().hkeys(publisher.ns.keys("orders")):
        assert time.monotonic() < deadline, "the replica did not republish"
        time.sleep(0.02)
    me.close()
    keys.close()


def test_retries_back_off_exponentially_to_a_cap_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshauth import _redis_common

    # Without jitter: the base doubles per failure, at most `doublings` times, and never past the cap.
    monkeypatch.setattr(_redis_common.random, "uniform", lambda low, high: (low + high) / 2)
    delays = [_redis_common.backoff(n, base=0.1, cap=10.0, doublings=8) for n in (1, 2, 3, 6, 7, 8, 30)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 6.4, 10.0, 10.0, 10.0])
    assert _redis_common.backoff(30, base=1.0, cap=30.0, doublings=5) == pytest.approx(30.0)
    monkeypatch.undo()
    # With it: spread over 0.5x-1.5x, so that replicas and verifiers do not retry in step.
    spread = [_redis_common.backoff(3, base=0.1, cap=10.0, doublings=8) for _ in range(500)]
    assert all(0.4 <= delay <= 1.2 for delay in spread)
    assert max(spread) - min(spread) > 0.6 and len(set(spread)) > 400


def test_replay_cache_is_shared_by_replicas(redis_namespace: tuple[str, str], mesh: Any) -> None:
    url, namespace = redis_namespace
    first = mesh.verifier("payments", replay_cache=RedisReplayCache(url, namespace, clock=mesh.clock))
    second = mesh.verifier("payments", replay_cache=RedisReplayCache(url, namespace, clock=mesh.clock))
    once = mesh.identity("orders").mint("payments")
    assert first.verify(once).caller == "orders"
    with pytest.raises(meshauth.TokenReplayed):
        second.verify(once)  # another replica, same store
    assert second.verify(mesh.identity("billing").mint("payments")).caller == "billing"


def test_replay_entries_expire_with_the_token(redis_namespace: tuple[str, str], clock: FakeClock) -> None:
    url, namespace = redis_namespace
    cache = RedisReplayCache(url, namespace, clock=clock)
    assert cache.add("orders", "j1", clock() + 5)
    assert not cache.add("orders", "j1", clock() + 5)
    assert cache.add("billing", "j1", clock() + 5)
    ttl = cache.client.pttl(cache.ns.jti("orders", "j1"))
    assert 4000 < ttl <= 5000


def test_unreachable_replay_store_is_503_not_replayed(mesh: Any) -> None:
    from redis_support import free_port

    cache = RedisReplayCache(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    verifier = mesh.verifier("payments", replay_cache=cache)
    with pytest.raises(meshauth.ReplayStoreUnavailable, match="unreachable"):
        verifier.verify(mesh.identity("orders").mint("payments"))


def _fill(client: Any) -> str:
    """Write ballast until Redis refuses; its error message."""
    for index in range(10_000):
        try:
            client.set(f"ballast:{index}", b"x" * 4096)
        except Exception as exc:  # redis.exceptions.OutOfMemoryError (a ResponseError)
            return str(exc)
    return "Redis never refused a write"


def test_a_full_replay_store_is_503_not_replayed(redis_server: Any, mesh: Any) -> None:
    # A Redis out of memory (maxmemory reached, noeviction) refuses the SET: not "replayed", an outage.
    client = redis_server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 256 * 1024))
    filled = _fill(client)
    assert "maxmemory" in filled, filled
    verifier = mesh.verifier("payments", replay_cache=RedisReplayCache(redis_server.url, timeout=0.5))
    with pytest.raises(meshauth.ReplayStoreUnavailable) as caught:
        verifier.verify(mesh.identity("orders").mint("payments"))
    assert caught.value.reason == "replay_store_unavailable"
    client.config_set("maxmemory", "0")
    assert verifier.verify(mesh.identity("orders").mint("payments")).caller == "orders"  # room again


def test_the_guide_snippet_runs(redis_server: Any) -> None:
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parent.parent / "docs" / "registry.md").read_text()
    section = guide[guide.index("## Scaling out on Redis") :]
    block = re.search(r"^```py\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block is not None
    code = block.group(1).replace("redis://orders:secret@redis.internal:6379/0", redis_server.url)
    namespace: dict[str, Any] = {}
    exec(compile(code, "registry.md", "exec"), namespace)  # noqa: S102 - the guide's own example
    client = redis_server.client()
    assert client.smembers("{meshauth}:services") == {b"orders"}  # it published
    assert client.hgetall("{meshauth}:keys:orders") == {}  # and on close deleted its key


def test_renewal_prunes_keys_of_replicas_that_died(publisher: RedisPublisher, wall: FakeClock) -> None:
    dead = replica(publisher, wall)  # never closed: its process "died"
    alive = replica(publisher, wall, rotate_every=10_000)
    wall.advance(600 + 31)  # the dead replica's key expired, plus leeway
    alive.maintain()
    assert list(stored(publisher)) == [alive.key.kid]
    del dead


def test_many_threads_share_one_replay_decision(redis_namespace: tuple[str, str]) -> None:
    import threading

    url, namespace = redis_namespace
    caches = [RedisReplayCache(url, namespace) for _ in range(4)]  # four replicas
    barrier = threading.Barrier(32)
    results: list[bool] = []

    def add(n: int) -> None:
        barrier.wait(5)
        results.append(caches[n % 4].add("orders", "same-jti", time.time() + 60))

    threads = [threading.Thread(target=add, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results.count(True) == 1 and len(results) == 32


def test_async_verifiers_on_redis_keys(redis_namespace: tuple[str, str]) -> None:
    import asyncio

    url, namespace = redis_namespace
    publisher = RedisPublisher(url, namespace)
    me = meshauth.ServiceIdentity.ephemeral("orders", publisher, background=False)
    keys = RedisKeys(url, namespace)
    verifier = meshauth.Verifier("payments", keys)

    async def main() -> list[str]:
        tokens = [me.mint("payments") for _ in range(200)]
        principals = await asyncio.gather(*(verifier.averify(token) for token in tokens))
        return [p.caller for p in principals]

    assert asyncio.run(main()) == ["orders"] * 200
    me.close()
    keys.close()


def test_async_verifier_checks_replay_through_redis(redis_namespace: tuple[str, str], mesh: Any) -> None:
    import asyncio

    url, namespace = redis_namespace
    first = mesh.verifier("payments", replay_cache=RedisReplayCache(url, namespace, clock=mesh.clock))
    second = mesh.verifier("payments", replay_cache=RedisReplayCache(url, namespace, clock=mesh.clock))
    once = mesh.identity("orders").mint("payments")

    async def main() -> None:
        assert (await first.averify(once)).caller == "orders"
        with pytest.raises(meshauth.TokenReplayed):
            await second.averify(once)  # another replica, same store, async path
        assert (await second.averify(mesh.identity("billing").mint("payments"))).caller == "billing"

    asyncio.run(main())


def test_a_silent_replay_store_does_not_block_the_event_loop(mesh: Any) -> None:
    """Redis accepts the connection and never answers: async verifies wait, the loop keeps running."""
    import asyncio
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = False

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop:
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = listener.getsockname()[1]
    timeout = 0.4
    verifier = mesh.verifier("payments", replay_cache=RedisReplayCache(f"redis://127.0.0.1:{port}/0", timeout=timeout))
    tokens = [mesh.identity("orders").mint("payments") for _ in range(3)]

    async def main() -> tuple[int, list[BaseException | meshauth.Principal]]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        running = asyncio.create_task(ticker())
        outcomes = await asyncio.gather(*(verifier.averify(t) for t in tokens), return_exceptions=True)
        running.cancel()
        return ticks, outcomes

    started = time.monotonic()
    try:
        ticks, outcomes = asyncio.run(main())
    finally:
        stop = True
        acceptor.join(2)
        listener.close()
        for conn in held:
            conn.close()
    elapsed = time.monotonic() - started
    assert all(isinstance(o, meshauth.ReplayStoreUnavailable) for o in outcomes), outcomes
    # The three waits overlapped (worker threads) and the loop ticked throughout them:
    # a blocking call on the loop would have frozen the ticker for 3 x timeout.
    assert elapsed < 3 * timeout
    assert ticks >= (timeout / 0.01) * 0.5


def test_tombstones_are_pruned_once_their_key_expired(publisher: RedisPublisher, wall: FakeClock) -> None:
    def tombstones() -> dict[str, bytes]:
        return {kid.decode(): exp for kid, exp in publisher.client.hgetall(publisher.ns.revoked).items()}

    now = int(wall())
    short, long = meshauth.SigningKey.generate(), meshauth.SigningKey.generate()
    publisher.publish(short.record("orders", not_before=now - 10, expires=now + 60))
    publisher.publish(long.record("orders", not_before=now - 10, expires=now + 3600))
    assert publisher.revoke(short.kid) == ["orders"] and publisher.revoke(long.kid) == ["orders"]
    assert publisher.revoke("never-published") == []  # exp unknown: kept a day
    assert {kid: int(exp) for kid, exp in tombstones().items()} == {
        short.kid: now + 60,
        long.kid: now + 3600,
        "never-published": now + 86400,
    }
    publisher.client.hset(publisher.ns.revoked, "unreadable", "not-a-number")  # an exp it cannot read: kept
    wall.advance(60)
    assert publisher.prune_tombstones() == 0  # at the key's exp a token may still verify
    wall.advance(1)
    assert publisher.prune_tombstones() == 1
    assert set(tombstones()) == {long.kid, "never-published", "unreadable"}
    assert publisher.prune_tombstones() == 0
    with pytest.raises(meshauth.ConfigurationError, match="revoked"):
        publisher.publish(long.record("orders", not_before=now - 10, expires=now + 7200))  # still final
    wall.advance(3600)
    publisher.revoke("another")  # every revocation prunes too
    assert set(tombstones()) == {"never-published", "unreadable", "another"}
