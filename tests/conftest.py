"""Shared fixtures: a fake clock, an in-memory mesh, and OpenTelemetry SDK capture."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshauth.testing import FakeClock, LoopbackServer, Mesh


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


class AuditCapture:
    """The ``meshauth.audit`` records a test produced (captured at INFO)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def records(self) -> list[logging.LogRecord]:
        return [r for r in self._caplog.records if r.name == "meshauth.audit"]

    def fields(self) -> list[dict]:  # type: ignore[type-arg]
        return [r.meshauth for r in self.records()]  # type: ignore[attr-defined]


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> AuditCapture:
    caplog.set_level(logging.INFO, logger="meshauth.audit")
    return AuditCapture(caplog)


@pytest.fixture
def serve_asgi() -> Iterator[Callable[[object], str]]:
    """Start ASGI apps on 127.0.0.1:<free port>; returns the base URL; all stopped at teardown."""
    servers: list[LoopbackServer] = []

    def start(app: object) -> str:
        server = LoopbackServer(app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
