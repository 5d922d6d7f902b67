"""Shared fixtures: a fake clock, an in-memory mesh, audit and OpenTelemetry SDK capture, loopback servers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from jwks_server import JWKSServer, no_wait
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meshauth
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth.testing import FakeClock, LoopbackServer, Mesh

# The installed pytest11 entry point is turned off in pyproject (it would import
# meshauth before coverage starts); the same fixtures are loaded here.
pytest_plugins = ("meshauth.pytest_plugin",)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mesh(clock: FakeClock) -> Mesh:
    return Mesh(["orders", "payments", "gateway", "billing"], clock=clock)


class Telemetry:
    """An SDK tracer provider and meter provider whose output tests can read."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list:  # type: ignore[type-arg]
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def metric_points(self, name: str) -> list:  # type: ignore[type-arg]
        data = self.reader.get_metrics_data()
        points = []
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    capture = Telemetry()
    yield capture
    capture.tracer_provider.shutdown()
    capture.meter_provider.shutdown()


class AuditCapture(Sequence[logging.LogRecord]):
    """The ``meshauth.audit`` records a test produced (captured at INFO), read live."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def records(self) -> list[logging.LogRecord]:
        return [r for r in self._caplog.records if r.name == "meshauth.audit"]

    def fields(self) -> list[dict]:  # type: ignore[type-arg]
        return [r.meshauth for r in self.records()]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.records())

    def __getitem__(self, index: Any) -> Any:
        return self.records()[index]

    def assert_no_secret(self, token: str) -> None:
        """Neither ``token`` nor its signature appears in any record, message or fields."""
        signature = token.rsplit(".", 1)[-1]
        for record in self.records():
            text = record.getMessage() + json.dumps(getattr(record, "meshauth", {}), default=str)
            assert token not in text
            assert signature not in text


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> AuditCapture:
    caplog.set_level(logging.INFO, logger="meshauth.audit")
    return AuditCapture(caplog)


@pytest.fixture
def token(mesh: Mesh) -> str:
    """A token of orders for payments, from the shared mesh."""
    return mesh.identity("orders").token_for("payments")


class DownKeys:
    """A key source whose registry cannot be read."""

    def get_key(self, kid: str) -> meshauth.KeyRecord | None:
        raise meshauth.KeysUnavailable("registry unreachable")

    async def aget_key(self, kid: str) -> meshauth.KeyRecord | None:
        raise meshauth.KeysUnavailable("registry unreachable")


@pytest.fixture
def down_keys() -> DownKeys:
    """A key source whose registry cannot be read (every lookup is ``KeysUnavailable``)."""
    return DownKeys()


@pytest.fixture
def serve_asgi() -> Iterator[Callable[..., str]]:
    """Start ASGI apps on 127.0.0.1:<free port>; returns the base URL; all stopped at teardown.

    Keyword options go to :class:`meshauth.testing.LoopbackServer` (``lifespan="off"``, ...).
    """
    servers: list[LoopbackServer] = []

    def start(app: object, **options: Any) -> str:
        server = LoopbackServer(app, **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
    assert not any(server.running for server in servers), "a loopback server did not stop"


# -- a scriptable loopback JWKS registry (tests/jwks_server.py) ---------------------------------


@pytest.fixture
def server() -> Iterator[JWKSServer]:
    with JWKSServer() as running:
        yield running


@pytest.fixture
def make_endpoint(server: JWKSServer, clock: FakeClock) -> Iterator[Callable[..., JWKSEndpoint]]:
    made: list[JWKSEndpoint] = []

    def make(url: str | None = None, **kwargs: Any) -> JWKSEndpoint:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("monotonic", clock)
        kwargs.setdefault("retry_wait", no_wait)
        kwargs.setdefault("timeout", 3.0)
        endpoint = JWKSEndpoint(url or server.url, **kwargs)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


@pytest.fixture
def redis_namespace() -> Iterator[tuple[str, str]]:
    """(URL of the shared Redis, a namespace of its own), dropped afterwards."""
    from redis_support import SHARED_URL, drop_namespace, shared_client, unique_namespace

    client = shared_client()
    namespace = unique_namespace()
    yield SHARED_URL, namespace
    drop_namespace(client, namespace)
    client.close()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A private redis-server this test may stop, restart or reconfigure."""
    from redis_support import private_redis

    with private_redis() as server:
        yield server
