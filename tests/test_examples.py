"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_example() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "payments accepted a call from 'orders'" in result.stdout
    assert "billing refused the same token: wrong_audience" in result.stdout


class Collector:
    """A stand-in OTLP/HTTP collector on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                collector.bodies.append((self.path, self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    running.thread.start()
    yield running
    running.server.shutdown()
    running.server.server_close()
    running.thread.join(10)


@pytest.mark.slow
def test_otlp_example_exports_both_services_spans(collector: Collector) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "otlp_two_services.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted call: HTTP 201; rejected call: HTTP 401" in result.stdout
    paths = {path for path, _ in collector.bodies}
    assert paths == {"/v1/traces"}
    payload = b"".join(body for _, body in collector.bodies)
    for expected in (b"meshauth.verify", b"meshauth.outcome", b"rejected", b"wrong_audience", b"orders", b"payments"):
        assert expected in payload


@pytest.mark.slow
@pytest.mark.parametrize(
    ("example", "expected"),
    [
        (
            "django_service.py",
            [
                "orders GET /charges: 200 {'view': 'django', 'caller': 'orders'}",
                "orders GET /api/charges: 200 {'view': 'drf', 'user': 'orders', 'caller': 'orders'}",
                "billing GET /charges: 403 {'error': 'forbidden', 'reason': 'no_matching_rule'}",
                "anonymous GET /charges: 401 {'error': 'unauthorized', 'reason': 'missing_credentials'}",
            ],
        ),
        (
            "grpc_service.py",
            [
                "orders: OK {'charged_for': 'orders', 'amount': 42}",
                'billing: PERMISSION_DENIED {"error":"forbidden","reason":"no_matching_rule"}',
            ],
        ),
        (
            "requests_client.py",
            [
                "orders -> payments: 200 {'charged_for': 'orders'}",
                "no credentials: 401 {'error': 'unauthorized', 'reason': 'missing_credentials'}",
            ],
        ),
    ],
)
def test_integration_examples(example: str, expected: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_three_replicas_on_redis_example(redis_namespace: tuple[str, str]) -> None:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")
    url, namespace = redis_namespace
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "replicas_redis.py"), "--redis", url, "--namespace", namespace],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("replica ")]
    assert len(lines) == 9 and all("payments saw orders" in line for line in lines)
    own = {line.split("(kid ")[1].split("...")[0] for line in lines}
    seen = {line.rsplit("with kid ", 1)[1].split("...")[0] for line in lines}
    assert len(own) == 3 and seen == own  # three replicas, three keys, each verified as orders
    assert "replicas exited [0, 0, 0]; keys of orders left in the registry: 0" in result.stdout
