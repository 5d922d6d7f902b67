"""The ACL lines of docs/registry.md, against a real redis-server: each service writes only its own hash."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

import meshauth

pytest.importorskip("redis_support")
pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")

from meshauth.redis import RedisKeys, RedisPublisher, RedisReplayCache

DOC = Path(__file__).resolve().parent.parent / "docs" / "registry.md"
NOW = int(time.time())


def documented_acl_lines() -> dict[str, str]:
    """The ``ACL SETUSER`` lines of the guide, by user name."""
    lines = re.findall(r"^ACL SETUSER (\S+) .*$", DOC.read_text(), flags=re.MULTILINE)
    text = DOC.read_text()
    return {user: next(line for line in text.splitlines() if line.startswith(f"ACL SETUSER {user} ")) for user in lines}


@pytest.fixture
def secured(redis_server: Any) -> Any:
    admin = redis_server.client()
    for user, line in documented_acl_lines().items():
        command = line.replace("PASSWORD", f"pw-{user}")
        admin.execute_command(*command.split())
    admin.execute_command("ACL", "SETUSER", "default", "off")  # nobody without a user of their own
    return redis_server


def url(server: Any, user: str) -> str:
    return f"redis://{user}:pw-{user}@127.0.0.1:{server.port}/0"


def test_the_guide_documents_each_role() -> None:
    assert set(documented_acl_lines()) >= {"orders", "payments", "verifier", "registry-admin"}


def test_a_publisher_writes_its_own_hash_and_nothing_else(secured: Any) -> None:
    orders = RedisPublisher(url(secured, "orders"))
    me = meshauth.ServiceIdentity.ephemeral("orders", orders, background=False)
    me.maintain()  # reads its state, renews: all allowed
    payments_key = meshauth.SigningKey.generate()
    with pytest.raises(meshauth.ConfigurationError) as info:
        orders.publish(payments_key.record("payments", not_before=NOW, expires=NOW + 600))
    assert info.value.reason == "redis_permission"
    assert "{meshauth}:keys:payments" in str(info.value) and "HSET" in str(info.value)
    assert "pw-orders" not in str(info.value)
    with pytest.raises(meshauth.ConfigurationError, match="refused"):
        orders.revoke(me.key.kid)  # only the registry admin revokes
    me.close()


def test_a_forged_event_changes_nothing(secured: Any) -> None:
    payments = meshauth.ServiceIdentity.ephemeral(
        "payments", RedisPublisher(url(secured, "payments")), background=False
    )
    keys = RedisKeys(url(secured, "verifier"), block=0.2)
    verifier = meshauth.Verifier("billing", keys)
    assert verifier.verify(payments.mint("billing")).caller == "payments"
    orders = RedisPublisher(url(secured, "orders"))
    with orders.client.pipeline() as pipe:  # orders may append events: it announces a "revocation"
        pipe.xadd(orders.ns.events, {"service": "payments", "kid": payments.key.kid, "op": "revoke"})
        pipe.xadd(orders.ns.events, {"service": "orders", "kid": payments.key.kid, "op": "publish"})
        pipe.execute()
    last = orders.client.xrevrange(orders.ns.events, count=1)[0][0].decode()
    deadline = time.monotonic() + 5
    while keys._last_id != last:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert keys.get_key(payments.key.kid).owner == "payments"
    assert verifier.verify(payments.mint("billing")).caller == "payments"
    keys.close()
    payments.close()


def test_the_read_only_verifier_cannot_write(secured: Any) -> None:
    keys = RedisKeys(url(secured, "verifier"))
    with pytest.raises(meshauth.ConfigurationError, match=r"refused HEXISTS on \{meshauth\}:revoked"):
        RedisPublisher(url(secured, "verifier")).publish(
            meshauth.SigningKey.generate().record("orders", not_before=NOW, expires=NOW + 600)
        )
    assert RedisReplayCache(url(secured, "verifier")).add("orders", "j1", time.time() + 60)  # its one write
    keys.close()


def test_the_registry_admin_revokes(secured: Any) -> None:
    orders = meshauth.ServiceIdentity.ephemeral("orders", RedisPublisher(url(secured, "orders")), background=False)
    admin = RedisPublisher(url(secured, "registry-admin"))
    assert admin.revoke(orders.key.kid) == ["orders"]
    assert admin.revoke_service("orders") == []
    orders.maintain()  # orders sees the tombstone and rotates to a new key
    assert list(admin.client.hgetall(admin.ns.keys("orders"))) == [orders.key.kid.encode()]
    orders.close()
