"""The gateway on a Redis registry (DESIGN sections 8 and 10), as a real process against real Redis.

With ``registry = "redis://..."`` the gateway has no key file: each process
generates its key in memory, publishes it in the namespace, signs with it and
deletes it when it stops. Upstreams verify its tokens from the same Redis.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from edge_mesh import EdgeGateway, LoggingUpstream, running, write_gateway

import meshauth

pytest.importorskip("redis_support")
pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")

from meshauth.gateway import load_config
from meshauth.redis import RedisKeys


@pytest.fixture
def upstream() -> Iterator[LoggingUpstream]:
    server = LoggingUpstream()
    yield server
    server.close()


def on_redis(gateway: EdgeGateway, url: str, namespace: str) -> EdgeGateway:
    """Point ``gateway.toml`` at Redis: no key_file, the registry and its namespace."""
    text = gateway.config.read_text()
    text = text.replace('key_file = "gateway.pem"\n', "")
    text = text.replace('registry = "registry.json"', f'registry = "{url}"\nregistry_namespace = "{namespace}"')
    gateway.config.write_text(text)
    return gateway


def wait_for(probe: Callable[[], Any], seconds: float = 15) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def get(gateway: EdgeGateway, token: str) -> int:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        head = f"GET /orders/1 HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ")[1])


def test_the_gateway_publishes_its_own_key_and_upstreams_verify_it(
    tmp_path: Path, upstream: LoggingUpstream, redis_namespace: tuple[str, str]
) -> None:
    url, namespace = redis_namespace
    gateway = on_redis(write_gateway(tmp_path, upstream.port), url, namespace)
    keys = RedisKeys(url, namespace)
    try:
        with running(gateway):  # the port is bound first; the key is published as the worker starts
            published = wait_for(lambda: RedisKeys(url, namespace, follow=False).services().get("gateway"))
            assert len(published) == 1  # one process, one key, generated in memory
            assert get(gateway, gateway.user_token("alice")) == 200
            forwarded = upstream.received[-1]
            service_token = forwarded.header(b"authorization").removeprefix(b"Bearer ").decode()  # type: ignore[union-attr]
            txn_token = forwarded.header(b"txn-token").decode()  # type: ignore[union-attr]
            orders = meshauth.Verifier("orders", keys)
            principal = orders.verify(service_token, txn_token)
            assert (principal.caller, principal.subject, principal.kid) == ("gateway", "alice", published[0].kid)
        # Stopped: its key left the registry with it.
        assert wait_for(lambda: not RedisKeys(url, namespace, follow=False).services().get("gateway"))
        assert gateway.process is not None and gateway.process.returncode == 0
    finally:
        keys.close()


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshauth.gateway", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_publishes_once_and_reports_the_redis_registry(
    tmp_path: Path, upstream: LoggingUpstream, redis_namespace: tuple[str, str]
) -> None:
    url, namespace = redis_namespace
    gateway = on_redis(write_gateway(tmp_path, upstream.port), url, namespace)
    result = run_check(gateway.config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"signing key .*kid \S+, published in '{namespace}'", result.stdout), result.stdout
    assert not RedisKeys(url, namespace, follow=False).services().get("gateway")  # and deleted again


def test_an_unreachable_redis_registry_fails_start_up_with_exit_1(tmp_path: Path, upstream: LoggingUpstream) -> None:
    from redis_support import free_port

    gateway = on_redis(write_gateway(tmp_path, upstream.port), f"redis://127.0.0.1:{free_port()}/0", "meshauth")
    result = subprocess.run(
        [sys.executable, "-m", "meshauth.gateway", "--config", str(gateway.config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "registry:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace('registry = "registry.json"', 'registry = "redis://127.0.0.1:1/0"'), "key_file"),
        (
            lambda text: text.replace(
                'registry = "registry.json"', 'registry = "registry.json"\nregistry_namespace = "x"'
            ),
            "only a redis:// registry has a namespace",
        ),
        (lambda text: text.replace('key_file = "gateway.pem"\n', ""), "key_file: this key is required"),
        (
            lambda text: text.replace('key_file = "gateway.pem"\n', "").replace(
                'registry = "registry.json"', 'registry = "redis://127.0.0.1:1/0"\nregistry_namespace = "a b"'
            ),
            "registry_namespace",
        ),
    ],
    ids=["key_file with redis", "namespace with a file", "no key_file with a file", "bad namespace"],
)
def test_configuration_errors_name_the_key(
    tmp_path: Path, upstream: LoggingUpstream, edit: object, message: str
) -> None:
    gateway = write_gateway(tmp_path, upstream.port)
    gateway.config.write_text(edit(gateway.config.read_text()))
    with pytest.raises(meshauth.ConfigurationError, match=message):
        load_config(gateway.config)
