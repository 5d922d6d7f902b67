"""``meshauth registry --redis URL ...`` against real Redis: list, revoke, revoke-service, export, serve."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

import meshauth
from meshauth.cli import main

pytest.importorskip("redis_support")
pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")

from meshauth.redis import RedisKeys, RedisPublisher


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def published(redis_namespace: tuple[str, str]) -> tuple[str, str, meshauth.SigningKey, meshauth.SigningKey]:
    url, namespace = redis_namespace
    publisher = RedisPublisher(url, namespace)
    now = int(time.time())
    orders, payments = meshauth.SigningKey.generate(), meshauth.SigningKey.generate("EdDSA")
    publisher.publish(orders.record("orders", not_before=now - 120, expires=now + 3600))
    publisher.publish(payments.record("payments", not_before=now, expires=now + 600))
    return url, namespace, orders, payments


def test_list_shows_services_kids_ages_and_expiry(capsys: pytest.CaptureFixture[str], published: Any) -> None:
    url, namespace, orders, payments = published
    code, stdout, _ = run(capsys, "registry", "--redis", url, "--namespace", namespace, "list")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "KID", "ALG", "AGE", "EXPIRES", "IN"]
    assert lines[1].split()[:3] == ["orders", orders.kid, "ES256"] and "2m" in lines[1]
    assert lines[2].split()[:3] == ["payments", payments.kid, "EdDSA"]
    code, stdout, _ = run(capsys, "registry", "--redis", url, "--namespace", namespace, "list", "--json")
    rows = json.loads(stdout)["keys"]
    assert [(r["service"], r["kid"]) for r in rows] == [("orders", orders.kid), ("payments", payments.kid)]
    assert 590 <= rows[1]["expires_in"] <= 600 and rows[0]["age"] >= 120


def test_revoke_and_revoke_service(capsys: pytest.CaptureFixture[str], published: Any) -> None:
    url, namespace, orders, payments = published
    keys = RedisKeys(url, namespace, follow=False)
    code, stdout, _ = run(capsys, "registry", "--redis", url, "--namespace", namespace, "revoke", "--", orders.kid)
    assert code == 0 and "removed from orders" in stdout
    code, stdout, _ = run(
        capsys, "registry", "--redis", url, "--namespace", namespace, "revoke-service", "payments", "--json"
    )
    assert code == 0 and json.loads(stdout) == {"service": "payments", "revoked": [payments.kid]}
    keys.reload()
    assert keys.get_key(orders.kid) is None and keys.get_key(payments.kid) is None
    keys.close()


def test_export_is_a_jwks_pyjwt_reads(capsys: pytest.CaptureFixture[str], published: Any) -> None:
    import jwt

    url, namespace, orders, _ = published
    code, stdout, _ = run(capsys, "registry", "--redis", url, "--namespace", namespace, "export")
    assert code == 0
    document = json.loads(stdout)
    token = meshauth.ServiceIdentity("orders", orders).mint("payments")
    key = jwt.PyJWKSet.from_dict(document)[orders.kid]
    assert jwt.decode(token, key, algorithms=["ES256"], audience="payments")["iss"] == "orders"


def test_redis_actions_need_redis_and_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(capsys, "registry", "export")
    assert code == 2 and "--redis URL" in stderr
    code, _, stderr = run(capsys, "registry", "list")
    assert code == 2 and "name the registry FILE, or give --redis URL" in stderr


def test_unreachable_redis_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from redis_support import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, stderr = run(capsys, "registry", "--redis", url, "--wait", "0.3", "list")
    assert code == 2 and "registry unavailable" in stderr and "within 0.3 s" in stderr
    code, _, stderr = run(capsys, "registry", "--redis", url, "revoke", "somekid")
    assert code == 2 and "nothing revoked" in stderr


@pytest.mark.parametrize("action", ["list", "revoke", "revoke-service", "export", "serve"])
def test_every_action_has_help(capsys: pytest.CaptureFixture[str], action: str) -> None:
    assert main(["registry", action, "--help"]) == 0
    assert "usage: meshauth registry" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_publishes_the_redis_registry_and_follows_changes(published: Any) -> None:
    from redis_support import free_port

    url, namespace, orders, payments = published
    port = free_port()
    command = [sys.executable, "-m", "meshauth", "registry", "--redis", url, "--namespace", namespace]
    server = subprocess.Popen(
        [*command, "serve", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = server.stdout.readline().decode() if server.stdout else ""
        assert f"http://127.0.0.1:{port}/.well-known/jwks.json" in line
        endpoint = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        first = httpx.get(endpoint)
        assert first.headers["content-type"] == "application/jwk-set+json"
        assert first.headers["cache-control"] == "public, max-age=30"  # short: the registry changes fast
        assert {k["kid"] for k in first.json()["keys"]} == {orders.kid, payments.kid}
        RedisPublisher(url, namespace).revoke(payments.kid)
        deadline = time.monotonic() + 5
        while payments.kid in {k["kid"] for k in httpx.get(endpoint).json()["keys"]}:
            assert time.monotonic() < deadline, "serve did not follow the revocation"
            time.sleep(0.02)
    finally:
        server.terminate()
        server.communicate(timeout=10)


def test_verify_reads_a_redis_registry(capsys: pytest.CaptureFixture[str], redis_server: Any) -> None:
    key = meshauth.SigningKey.generate()
    now = int(time.time())
    RedisPublisher(redis_server.url).publish(key.record("orders", not_before=now, expires=now + 600))
    token = meshauth.ServiceIdentity("orders", key).mint("payments")
    code, stdout, _ = run(capsys, "verify", token, "--registry", redis_server.url, "--aud", "payments", "--json")
    assert code == 0 and json.loads(stdout)["caller"] == "orders"
    code, _, stderr = run(capsys, "verify", token, "--registry", redis_server.url, "--aud", "billing")
    assert code == 1 and "wrong_audience" in stderr
