"""RedisKeys against real Redis: loading, following events, authority, revocation, outages."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meshauth
from meshauth.testing import FakeClock

redis_support = pytest.importorskip("redis_support")
pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")

from meshauth.redis import RedisKeys, RedisPublisher  # noqa: E402

NOW = int(time.time())


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for another process or thread to act (never for a token to expire)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def publish(publisher: RedisPublisher, service: str, alg: str = "ES256") -> meshauth.SigningKey:
    key = meshauth.SigningKey.generate(alg)
    publisher.publish(key.record(service, not_before=NOW - 10, expires=NOW + 3600))
    return key


@pytest.fixture
def registry(redis_namespace: tuple[str, str]) -> Iterator[tuple[RedisPublisher, Callable[..., RedisKeys], Any]]:
    url, namespace = redis_namespace
    opened: list[RedisKeys] = []

    def open_keys(**options: Any) -> RedisKeys:
        keys = RedisKeys(url, namespace, **options)
        opened.append(keys)
        return keys

    publisher = RedisPublisher(url, namespace)
    yield publisher, open_keys, publisher.client
    for keys in opened:
        keys.close()


def token(service: str, key: meshauth.SigningKey, audience: str = "payments") -> str:
    return meshauth.ServiceIdentity(service, key).mint(audience)


def test_loads_every_service_and_verifies(registry: Any) -> None:
    publisher, open_keys, _ = registry
    orders, billing = publish(publisher, "orders"), publish(publisher, "billing", "EdDSA")
    keys = open_keys()
    verifier = meshauth.Verifier("payments", keys)
    assert verifier.verify(token("orders", orders)).caller == "orders"
    assert verifier.verify(token("billing", billing)).caller == "billing"
    assert {s: [r.kid for r in rs] for s, rs in keys.services().items()} == {
        "orders": [orders.kid],
        "billing": [billing.kid],
    }
    assert keys.status()["ready"] and keys.status()["keys"] == 2


def test_follows_publications_and_revocations_within_a_second(registry: Any) -> None:
    publisher, open_keys, _ = registry
    keys = open_keys()
    key = publish(publisher, "orders")
    started = time.monotonic()
    wait_for(lambda: keys.get_key(key.kid) is not None, 1.0)
    verifier = meshauth.Verifier("payments", keys)
    signed = token("orders", key)
    assert verifier.verify(signed).caller == "orders"
    assert publisher.revoke(key.kid) == ["orders"]
    wait_for(lambda: keys.get_key(key.kid) is None, 1.0)
    assert time.monotonic() - started < 2.0
    with pytest.raises(meshauth.UnknownKey):
        verifier.verify(signed)  # the verified-token cache does not outlive the key


def test_revocation_is_final(registry: Any) -> None:
    publisher, open_keys, client = registry
    key = publish(publisher, "orders")
    keys = open_keys()
    publisher.revoke(key.kid)
    wait_for(lambda: keys.get_key(key.kid) is None, 1.0)  # this verifier has seen the tombstone
    with pytest.raises(meshauth.ConfigurationError, match="revoked") as info:
        publisher.publish(key.record("orders", not_before=NOW, expires=NOW + 3600))
    assert info.value.reason == "revoked_key"
    # Written behind the publisher's back (or after Redis lost the tombstone): still never used.
    client.hset(
        f"{{{publisher.ns.name}}}:keys:orders", key.kid, json.dumps(key.public_jwk("orders", nbf=NOW, exp=NOW + 9))
    )
    client.hdel(publisher.ns.revoked, key.kid)
    publisher.client.xadd(publisher.ns.events, {"service": "orders", "kid": key.kid, "op": "publish"})
    keys.reload()
    assert keys.get_key(key.kid) is None


def test_revoke_service_removes_all_its_keys(registry: Any) -> None:
    publisher, open_keys, _ = registry
    first, second, other = publish(publisher, "orders"), publish(publisher, "orders"), publish(publisher, "billing")
    keys = open_keys()
    assert sorted(publisher.revoke_service("orders")) == sorted([first.kid, second.kid])
    wait_for(lambda: keys.get_key(first.kid) is None and keys.get_key(second.kid) is None, 1.0)
    assert keys.get_key(other.kid) is not None
    assert publisher.services() == ["billing"]


def test_bad_hash_entries_are_ignored_and_reported(registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    publisher, open_keys, client = registry
    ns = publisher.ns
    good = publish(publisher, "orders")
    liar, no_exp, other_kid = (meshauth.SigningKey.generate() for _ in range(3))
    client.hset(ns.keys("orders"), "junk", b"{not json")
    client.hset(ns.keys("orders"), liar.kid, json.dumps(liar.public_jwk("payments", nbf=NOW, exp=NOW + 60)))
    client.hset(ns.keys("orders"), no_exp.kid, json.dumps(no_exp.public_jwk("orders")))
    client.hset(ns.keys("orders"), "someone-else", json.dumps(other_kid.public_jwk("orders", nbf=NOW, exp=NOW + 60)))
    private = {**good.public_jwk("orders", nbf=NOW, exp=NOW + 60), "d": "secret"}
    client.hset(ns.keys("orders"), "private", json.dumps(private))
    keys = open_keys()
    assert [r.kid for r in keys.services()["orders"]] == [good.kid]
    problems = " | ".join(keys.problems)
    assert "not a JSON object" in problems
    assert "its iss 'payments' is not the service of the hash" in problems
    assert "needs nbf and exp" in problems
    assert "thumbprint" in problems
    assert "private key members" in problems
    assert "secret" not in caplog.text
    with pytest.raises(meshauth.UnknownKey):
        meshauth.Verifier("payments", keys).verify(token("payments", liar))


def test_garbage_and_forged_events_change_nothing(registry: Any) -> None:
    publisher, open_keys, client = registry
    ns = publisher.ns
    orders = publish(publisher, "orders")
    keys = open_keys()
    before = keys.keyset
    client.xadd(ns.events, {"nonsense": "\x00\xff"})
    client.xadd(ns.events, {"service": "../../etc", "kid": "x", "op": "publish"})
    client.xadd(ns.events, {"service": "orders", "kid": orders.kid, "op": "revoke"})  # forged: key still in hash
    client.xadd(ns.events, {"service": "payments", "kid": orders.kid, "op": "publish"})
    wait_for(lambda: sum("not a registry event" in p for p in keys.problems) == 2, 2.0)
    wait_for(lambda: keys._last_id == client.xrevrange(ns.events, count=1)[0][0].decode(), 2.0)
    assert keys.get_key(orders.kid) is before.get(orders.kid)
    assert keys.keyset is before  # nothing changed, not even the index object


def test_a_kid_claimed_by_two_services_keeps_its_first_owner(registry: Any) -> None:
    publisher, open_keys, _ = registry
    real = publish(publisher, "payments")
    keys = open_keys()
    # orders copies payments' public key into its own hash (with iss=orders, so the entry is well-formed)
    copy = real.public_jwk("orders", nbf=NOW, exp=NOW + 60)
    publisher.publish(copy)
    wait_for(lambda: any("several services" in p for p in keys.problems), 2.0)
    assert keys.get_key(real.kid).owner == "payments"
    fresh = open_keys()  # a verifier that never saw the first owner trusts neither
    assert fresh.get_key(real.kid) is None


def test_unchanged_keys_keep_their_record_across_reloads(registry: Any) -> None:
    publisher, open_keys, _ = registry
    key = publish(publisher, "orders")
    keys = open_keys()
    record = keys.get_key(key.kid)
    keys.reload()
    assert keys.get_key(key.kid) is record
    publisher.publish(key.record("orders", not_before=NOW - 10, expires=NOW + 7200), op="renew")
    wait_for(lambda: keys.get_key(key.kid) is not record, 1.0)
    assert keys.get_key(key.kid).expires == NOW + 7200


def test_resync_reloads_what_no_event_announced(registry: Any) -> None:
    """A key written without an event (a lost XADD, a hand edit) arrives with the next full reload."""
    publisher, open_keys, client = registry
    ns = publisher.ns
    resyncing = open_keys(resync=1, block=0.2)
    following = open_keys(resync=3600, block=0.2)  # the events stream alone
    key = meshauth.SigningKey.generate()
    with client.pipeline() as pipe:  # the layout of DESIGN section 10, and no XADD
        pipe.hset(ns.keys("orders"), key.kid, json.dumps(key.public_jwk("orders", nbf=NOW - 10, exp=NOW + 3600)))
        pipe.sadd(ns.services, "orders")
        pipe.execute()
    wait_for(lambda: resyncing.get_key(key.kid) is not None, 5.0)  # within resync + one blocking read
    time.sleep(0.5)  # the follower had as long, and a few more blocking reads
    assert following.get_key(key.kid) is None  # no event named orders: only a reload could have found it
    assert client.xlen(ns.events) == 0
    assert meshauth.Verifier("payments", resyncing).verify(token("orders", key)).caller == "orders"
    publisher.publish(key.record("orders", not_before=NOW - 10, expires=NOW + 3600), op="renew")
    wait_for(lambda: following.get_key(key.kid) is not None, 1.0)  # the follower was alive all along


def test_spans_and_propagation_histogram(registry: Any, telemetry: Any) -> None:
    publisher, open_keys, _ = registry
    keys = open_keys(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider)
    key = publish(publisher, "orders")
    wait_for(lambda: keys.get_key(key.kid) is not None, 1.0)
    wait_for(lambda: len(telemetry.spans("meshauth.registry.sync")) >= 2, 1.0)
    modes = [s.attributes["meshauth.registry.mode"] for s in telemetry.spans("meshauth.registry.sync")]
    assert modes[0] == "full" and "events" in modes
    points = telemetry.metric_points("meshauth.registry.propagation")
    assert points and points[0].count >= 1 and points[0].max < 1.0


def test_many_threads_verify_while_keys_change(registry: Any) -> None:
    publisher, open_keys, _ = registry
    stable = publish(publisher, "orders")
    keys = open_keys()
    verifier = meshauth.Verifier("payments", keys)
    identity = meshauth.ServiceIdentity("orders", stable)
    errors: list[BaseException] = []
    stop = threading.Event()

    def verify() -> None:
        while not stop.is_set():
            try:
                assert verifier.verify(identity.mint("payments")).caller == "orders"
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=verify) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(30):
        churn = publish(publisher, "billing")
        publisher.revoke(churn.kid)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []


def test_zero_redis_commands_per_verification(redis_server: Any) -> None:
    publisher = RedisPublisher(redis_server.url)
    key = publish(publisher, "orders")
    keys = RedisKeys(redis_server.url, follow=False)
    verifier = meshauth.Verifier("payments", keys)
    identity = meshauth.ServiceIdentity("orders", key)
    tokens = [identity.mint("payments") for _ in range(200)]
    client = redis_server.client()
    before = client.info("stats")["total_commands_processed"]
    for signed in tokens:
        verifier.verify(signed)
    after = client.info("stats")["total_commands_processed"]
    assert after - before == 1  # the INFO call itself
    keys.close()


def test_outage_serves_the_last_good_set(redis_server: Any) -> None:
    monotonic = FakeClock(1000.0)
    publisher = RedisPublisher(redis_server.url)
    key = publish(publisher, "orders")
    keys = RedisKeys(redis_server.url, max_stale=600, block=0.2, timeout=0.5, monotonic=monotonic)
    verifier = meshauth.Verifier("payments", keys)
    identity = meshauth.ServiceIdentity("orders", key)
    redis_server.stop()
    wait_for(lambda: keys.status()["last_error"] is not None, 5.0)
    assert verifier.verify(identity.mint("payments")).caller == "orders"  # known keys keep verifying
    stranger = meshauth.ServiceIdentity("orders", meshauth.SigningKey.generate())
    with pytest.raises(meshauth.KeysUnavailable, match="is failing"):
        verifier.verify(stranger.mint("payments"))  # maybe published during the outage: 503, not 401
    monotonic.advance(601)
    with pytest.raises(meshauth.KeysUnavailable, match="beyond max_stale"):
        verifier.verify(identity.mint("payments"))
    assert not keys.status()["ready"]
    redis_server.start()  # back, but empty: the last set is kept until publishers republish
    wait_for(lambda: keys.status()["last_error"] is None, 10.0)
    assert keys.get_key(key.kid) is not None
    publish(RedisPublisher(redis_server.url), "billing")
    wait_for(lambda: "billing" in keys.services(), 5.0)
    keys.close()


def test_resumes_after_a_broken_connection(redis_server: Any) -> None:
    publisher = RedisPublisher(redis_server.url)
    first = publish(publisher, "orders")
    keys = RedisKeys(redis_server.url, block=0.2, timeout=0.5)
    client = redis_server.client()
    client.client_kill_filter(_type="normal", skipme=True)  # the follower's blocking read breaks
    second = publish(publisher, "orders")
    wait_for(lambda: keys.keyset.get(second.kid) is not None)
    assert keys.keyset.get(first.kid) is not None
    keys.close()


def test_after_a_gap_resumes_from_its_id_or_reloads_if_the_stream_was_trimmed(
    redis_server: Any, telemetry: Any
) -> None:
    publisher = RedisPublisher(redis_server.url, max_events=10)
    publish(publisher, "orders")
    keys = RedisKeys(redis_server.url, follow=False, block=0.1, tracer_provider=telemetry.tracer_provider)

    def full_reloads() -> int:
        return sum(s.attributes["meshauth.registry.mode"] == "full" for s in telemetry.spans("meshauth.registry.sync"))

    assert full_reloads() == 1
    second = publish(publisher, "orders")
    keys._gap = True  # as after a failed read: the next read checks the stream first
    keys._follow()
    assert keys.keyset.get(second.kid) is not None and full_reloads() == 1  # resumed from its id
    client = redis_server.client()
    hidden = meshauth.SigningKey.generate()
    client.hset(
        publisher.ns.keys("billing"), hidden.kid, json.dumps(hidden.public_jwk("billing", nbf=NOW, exp=NOW + 60))
    )
    client.sadd(publisher.ns.services, "billing")
    client.xadd(publisher.ns.events, {"service": "billing", "kid": hidden.kid, "op": "publish"})
    for n in range(300):
        client.xadd(
            publisher.ns.events, {"service": "nobody", "kid": str(n), "op": "renew"}, maxlen=5, approximate=False
        )
    keys._gap = True
    keys._follow()
    assert full_reloads() == 2  # the billing event was trimmed away: only a full reload finds its key
    assert keys.keyset.get(hidden.kid) is not None
    redis_server.restart()  # empty: the stream is gone
    keys._gap = True
    keys._follow()
    assert full_reloads() == 3 and keys.keyset.get(hidden.kid) is not None  # an empty Redis keeps the last set
    keys.close()


def test_start_up_without_redis_is_a_bounded_clear_error() -> None:
    port = redis_support.free_port()
    started = time.monotonic()
    with pytest.raises(
        meshauth.KeysUnavailable, match=rf"cannot load the key registry from redis 127.0.0.1:{port}/0 within 0.5 s"
    ):
        RedisKeys(f"redis://127.0.0.1:{port}/0", startup_timeout=0.5, timeout=0.2)
    assert time.monotonic() - started < 3


def test_slow_redis_times_out(redis_server: Any) -> None:
    client = redis_server.client()
    publish(RedisPublisher(redis_server.url), "orders")
    client.client_pause(3000, all=True)
    started = time.monotonic()
    with pytest.raises(meshauth.KeysUnavailable):
        RedisKeys(redis_server.url, startup_timeout=0.6, timeout=0.2)
    assert time.monotonic() - started < 2.5
    client.client_unpause()


def test_interop_pyjwt_and_joserfc_verify_with_the_exported_jwks(registry: Any) -> None:
    import jwt
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import KeySet as JoseKeySet

    publisher, open_keys, _ = registry
    me = meshauth.ServiceIdentity.ephemeral("orders", publisher, background=False)  # a key only in memory
    keys = open_keys()
    document = keys.to_jwks()
    signed = me.mint("payments")
    pyjwt_key = jwt.PyJWKSet.from_dict(document)[me.key.kid]
    claims = jwt.decode(signed, pyjwt_key, algorithms=["ES256"], audience="payments")
    assert claims["iss"] == "orders"
    decoded = jose_jwt.decode(signed, JoseKeySet.import_key_set(document), algorithms=["ES256"])
    assert decoded.claims["iss"] == "orders"
    me.close()


def test_works_through_redis_sentinel(redis_server: Any) -> None:
    from redis.sentinel import Sentinel

    with redis_support.private_sentinel(redis_server) as port:
        sentinel = Sentinel([("127.0.0.1", port)], socket_timeout=1)
        keys = RedisKeys(sentinel.master_for("mymaster", socket_timeout=1), block=0.2)
        publisher = RedisPublisher(sentinel.master_for("mymaster", socket_timeout=1))
        me = meshauth.ServiceIdentity.ephemeral("orders", publisher, background=False)
        wait_for(lambda: keys.get_key(me.key.kid) is not None)  # followed on the blocking connection
        assert keys.status()["source"] == "redis sentinel service mymaster/0 namespace meshauth"
        me.close()
        keys.close()


def test_works_on_redis_cluster_with_the_namespace_in_one_slot() -> None:
    from redis.cluster import RedisCluster

    with redis_support.private_cluster() as servers:
        client = RedisCluster(host="127.0.0.1", port=servers[0].port, socket_timeout=2)
        keys = RedisKeys(client, "shop", block=0.2)
        publisher = RedisPublisher(RedisCluster(host="127.0.0.1", port=servers[1].port), "shop")
        me = meshauth.ServiceIdentity.ephemeral("orders", publisher, background=False)
        wait_for(lambda: keys.get_key(me.key.kid) is not None)
        verifier = meshauth.Verifier("payments", keys)
        assert verifier.verify(me.mint("payments")).caller == "orders"
        assert publisher.revoke(me.key.kid) == ["orders"]
        wait_for(lambda: keys.get_key(me.key.kid) is None)
        slots = {client.keyslot(key) for key in client.keys("{shop}:*", target_nodes=RedisCluster.ALL_NODES)}
        assert len(slots) == 1  # every key of the namespace in one slot: transactions work
        assert keys.status()["source"].startswith("redis cluster 127.0.0.1:")
        me.close()
        keys.close()


def test_a_snapshot_lets_a_verifier_start_while_redis_is_down(redis_server: Any, tmp_path: Any) -> None:
    snapshot = tmp_path / "registry-snapshot.json"
    publisher = RedisPublisher(redis_server.url)
    kept, revoked = publish(publisher, "orders"), publish(publisher, "billing")
    first = RedisKeys(redis_server.url, snapshot=snapshot, block=0.2)
    publisher.revoke(revoked.kid)
    wait_for(lambda: revoked.kid in json.loads(snapshot.read_text())["revoked"])
    saved = json.loads(snapshot.read_text())
    assert [k["kid"] for k in saved["keys"]] == [kept.kid] and "d" not in saved["keys"][0]
    first.close()
    redis_server.stop()
    keys = RedisKeys(redis_server.url, snapshot=snapshot, startup_timeout=0.3, timeout=0.2, block=0.2)
    verifier = meshauth.Verifier("payments", keys)
    assert verifier.verify(token("orders", kept)).caller == "orders"  # from the snapshot
    with pytest.raises(meshauth.KeysUnavailable):
        verifier.verify(token("billing", revoked))  # revoked stays out; unknown while Redis is down: 503
    assert keys.status()["last_error"] is not None
    redis_server.start()  # back, empty: the snapshot's keys stay until their services republish
    wait_for(lambda: keys.status()["last_error"] is None, 10.0)
    assert verifier.verify(token("orders", kept)).caller == "orders"
    keys.close()
    redis_server.stop()
    with pytest.raises(meshauth.ConfigurationError, match="not a snapshot of namespace 'other'"):
        RedisKeys(redis_server.url, "other", snapshot=snapshot, startup_timeout=0.2, timeout=0.2)
