"""Operating ``meshauth gateway``: --check, exit codes, workers, span export configured in the TOML."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import meshauth
from meshauth.gateway import parse_config
from meshauth.gateway._server_config import Limits
from tests.edge_mesh import EdgeGateway, LoggingUpstream, running, write_gateway

pytestmark = pytest.mark.slow


class Recorder(BaseHTTPRequestHandler):
    """Serves ``files`` on GET and records every POST body by path (an OTLP/HTTP collector)."""

    files: ClassVar[dict[str, bytes]] = {}
    posts: ClassVar[list[tuple[str, bytes]]] = []

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.posts.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Loopback:
    """A ``Recorder`` on a free loopback port, in a thread."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        handler = type("Handler", (Recorder,), {"files": files or {}, "posts": []})
        self.handler: type[Recorder] = handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def upstream() -> Iterator[LoggingUpstream]:
    server = LoggingUpstream()
    yield server
    server.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "meshauth", *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def get(gateway: EdgeGateway, path: str = "/orders/1", groups: tuple[str, ...] = ("staff",)) -> int:
    token = gateway.user_token(groups=groups)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        return int(sock.recv(65536).split(b" ")[1])


# -- --check ------------------------------------------------------------------------------------------------


def test_check_reaches_every_key_set_and_prints_one_line_each(tmp_path: Path, upstream: LoggingUpstream) -> None:
    edge = write_gateway(tmp_path, upstream.port)
    idp = Loopback({"/jwks.json": (tmp_path / "idp-jwks.json").read_bytes()})
    try:
        edge.config.write_text(edge.config.read_text().replace('"idp-jwks.json"', f'"{idp.url}/jwks.json"'))
        result = run_cli("gateway", "--check", "--config", str(edge.config))
    finally:
        idp.close()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["OK", "config"],
        ["OK", "signing"],
        ["OK", "registry"],
        ["OK", "issuer"],
    ]
    assert lines[3].endswith(f"{idp.url}/jwks.json: 1 keys")
    assert edge.process is None and not edge.audit_log.exists()  # nothing served, nothing audited


def test_check_fails_when_an_issuer_cannot_be_reached(tmp_path: Path, upstream: LoggingUpstream) -> None:
    edge = write_gateway(tmp_path, upstream.port)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    edge.config.write_text(edge.config.read_text().replace('"idp-jwks.json"', f'"http://127.0.0.1:{port}/jwks.json"'))
    result = run_cli("gateway", "--check", "--config", str(edge.config))
    assert result.returncode == 1
    fail, fix = result.stdout.splitlines()[-2:]
    assert fail.startswith("FAIL  issuer https://idp.example.com  http://127.0.0.1:")
    assert fix.strip().startswith("fix: check the URL")


def test_check_fails_on_a_bad_file(tmp_path: Path, upstream: LoggingUpstream) -> None:
    edge = write_gateway(tmp_path, upstream.port, "[limits]\nheader_timeout = 0")
    result = run_cli("gateway", "--check", "--config", str(edge.config))
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  config  ") and "limits.header_timeout" in result.stdout


# -- exit codes ---------------------------------------------------------------------------------------------


def test_a_port_in_use_exits_1_naming_listen(tmp_path: Path, upstream: LoggingUpstream) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        edge = write_gateway(tmp_path, upstream.port, port=port)
        result = run_cli("gateway", "--config", str(edge.config))
    assert result.returncode == 1
    assert f"listen: 127.0.0.1:{port} is already in use" in result.stderr and "Errno" not in result.stderr


def test_a_configuration_error_exits_2_naming_the_key(tmp_path: Path, upstream: LoggingUpstream) -> None:
    edge = write_gateway(tmp_path, upstream.port, 'workers = 0\n[telemetry]\notlp_endpoint = "ftp://x"')
    result = run_cli("gateway", "--config", str(edge.config))
    assert result.returncode == 2 and "workers: expected an integer from 1 to 64, found 0" in result.stderr


def test_limits_and_telemetry_parse_with_defaults(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "service": "gateway",
        "key_file": "k.pem",
        "registry": "r.json",
        "issuers": [{"issuer": "https://idp", "jwks": "j.json", "audience": "api", "algorithms": ["RS256"]}],
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1", "service": "orders"}],
    }
    config = parse_config({**base, "limits": {"idle_timeout": 2}}, check_files=False)
    assert config.limits == Limits(idle_timeout=2.0) and config.workers == 1
    assert config.telemetry.otlp_endpoint is None
    with pytest.raises(meshauth.ConfigurationError, match=r"limits\.max_body: unknown key"):
        parse_config({**base, "limits": {"max_body": 1}}, check_files=False)


# -- workers ------------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_workers_serve_one_port_and_stop_together(tmp_path: Path, upstream: LoggingUpstream) -> None:
    edge = write_gateway(tmp_path, upstream.port, "workers = 2")
    edge.start()
    try:
        assert edge.process is not None
        deadline = time.monotonic() + 10  # the port accepts (into its backlog) before the workers are forked
        while len(workers := children_of(edge.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2
        assert [get(edge) for _ in range(10)] == [200] * 10
        edge.process.send_signal(signal.SIGTERM)
        assert edge.process.wait(timeout=15) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        edge.stop()


# -- telemetry without code ---------------------------------------------------------------------------------


def exported_spans(posts: list[tuple[str, bytes]]) -> list[tuple[dict[str, Any], Any]]:
    """(resource attributes, span) for every span the collector received."""
    spans = []
    for path, body in posts:
        if path != "/v1/traces":
            continue
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            spans += [(resource, span) for scope in resource_spans.scope_spans for span in scope.spans]
    return spans


def attributes(span: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in span.attributes}


def test_spans_go_to_the_collector_named_in_the_toml(tmp_path: Path, upstream: LoggingUpstream) -> None:
    collector = Loopback()
    telemetry = f'[telemetry]\notlp_endpoint = "{collector.url}"\nservice_name = "edge-gateway"'
    edge = write_gateway(tmp_path, upstream.port, telemetry)
    try:
        with running(edge):
            assert get(edge) == 200
            assert get(edge, groups=("guest",)) == 403
        deadline = time.monotonic() + 5
        while not collector.handler.posts and time.monotonic() < deadline:
            time.sleep(0.05)
        spans = exported_spans(collector.handler.posts)
    finally:
        collector.close()
    assert spans and all(resource["service.name"] == "edge-gateway" for resource, _ in spans)
    authorize = [span for _, span in spans if span.name == "meshauth.authorize"]
    assert len(authorize) == 2
    # The caller is the client as the gateway sees it, not the identity provider's URL.
    assert {attributes(span)["meshauth.caller"] for span in authorize} == {"127.0.0.1"}
    denied = next(span for span in authorize if attributes(span)["meshauth.outcome"] == "denied")
    assert denied.status.code == denied.status.STATUS_CODE_ERROR
    assert denied.status.message == "denied: group_required"
    assert any(span.name == "GET" for _, span in spans)  # the upstream call


def test_otel_environment_variables_alone_turn_export_on(tmp_path: Path, upstream: LoggingUpstream) -> None:
    collector = Loopback()
    edge = write_gateway(tmp_path, upstream.port)
    edge.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_SERVICE_NAME": "from-env"}
    try:
        with running(edge):
            assert get(edge) == 200
        spans = exported_spans(collector.handler.posts)
        paths = {path for path, _ in collector.handler.posts}
    finally:
        collector.close()
    assert {resource["service.name"] for resource, _ in spans} == {"from-env"}
    assert {"/v1/traces", "/v1/metrics"} <= paths  # verify outcomes and durations, flushed at stop
