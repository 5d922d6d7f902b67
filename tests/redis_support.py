"""Real Redis servers for the tests: the machine's shared one, and private ones a test starts and stops.

Under ``MESHAUTH_REQUIRE_REDIS=1`` (CI) a missing Redis fails the test; elsewhere it skips with one line.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

SHARED_URL = os.environ.get("MESHAUTH_REDIS_URL", "redis://127.0.0.1:6379/0")


def missing(reason: str) -> None:
    """Fail under MESHAUTH_REQUIRE_REDIS=1, else skip."""
    if os.environ.get("MESHAUTH_REQUIRE_REDIS") == "1":
        pytest.fail(f"Redis is required (MESHAUTH_REQUIRE_REDIS=1): {reason}")
    pytest.skip(f"no Redis: {reason}")


def redis_module() -> Any:
    try:
        import redis
    except ImportError:
        missing("redis-py is not installed (pip install 'meshauth[redis]')")
    return redis


def shared_client() -> Any:
    redis = redis_module()
    client = redis.Redis.from_url(SHARED_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        missing(f"cannot reach {SHARED_URL}: {exc}")
    return client


def unique_namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def drop_namespace(client: Any, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 45000)  # noqa: S311 - a port number, not a secret
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


class RedisServer:
    """A private redis-server on a free loopback port, keeping nothing on disk."""

    def __init__(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server is not installed")
        self.binary = binary
        self.extra = extra
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshauth-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.binary is not None
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", self.dir, *self.extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port: Redis comes back empty."""
        self.stop()
        self.start()

    def client(self, **options: Any) -> Any:
        return redis_module().Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **options)


@contextlib.contextmanager
def private_redis(*extra: str) -> Iterator[RedisServer]:
    server = RedisServer(*extra).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@contextlib.contextmanager
def private_sentinel(master: RedisServer) -> Iterator[int]:
    """A Redis Sentinel watching ``master`` as service ``mymaster``; yields its port."""
    assert master.binary is not None
    port = free_port()
    config = os.path.join(master.dir, "sentinel.conf")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(f"port {port}\nbind 127.0.0.1\ndir {master.dir}\n")
        handle.write(f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    process = subprocess.Popen(
        [master.binary, config, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis sentinel did not start") from None
                time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def private_cluster(nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of ``nodes`` masters on free loopback ports (no replicas)."""
    servers: list[RedisServer] = []
    try:
        for _ in range(nodes):
            server = RedisServer("--cluster-enabled", "yes")
            server.port = free_cluster_port()
            server.extra = (*server.extra, "--cluster-config-file", os.path.join(server.dir, "nodes.conf"))
            servers.append(server.start())
        cli = shutil.which("redis-cli")
        if cli is None:
            missing("redis-cli is not installed")
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        probe = servers[0].client()
        deadline = time.monotonic() + 10
        while probe.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not converge")
            time.sleep(0.05)
        probe.close()
        yield servers
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
