"""Span and metric export for ``meshauth gateway`` itself, from ``[telemetry]`` or ``OTEL_*`` variables.

Export is on when the configuration names an ``otlp_endpoint``, or when the
standard variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp``);
``OTEL_SDK_DISABLED=true`` turns it off. The SDK and the OTLP/HTTP exporter
come with the ``otlp`` extra and are imported only then. Every other
``OTEL_*`` setting (headers, timeouts, batch sizes, resource attributes) is
read by the SDK itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, trace

from .._exceptions import ConfigurationError
from ._server_config import TelemetrySettings

__all__ = ["Exporters", "start_export"]

_EXTRA_HINT = "span export needs the 'otlp' extra: pip install 'meshauth[otlp]'"


@dataclasses.dataclass(frozen=True, slots=True)
class Exporters:
    """The providers handed to the gateway, and how to flush them at exit."""

    tracer_provider: trace.TracerProvider | None = None
    meter_provider: metrics.MeterProvider | None = None

    def shutdown(self) -> None:
        """Flush and stop both providers (pending spans are sent now)."""
        for provider in (self.tracer_provider, self.meter_provider):
            stop = getattr(provider, "shutdown", None)
            if stop is not None:
                stop()


def wanted(settings: TelemetrySettings, environ: Mapping[str, str]) -> bool:
    """Whether span and metric export is asked for."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if settings.otlp_endpoint:
        return True
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return True
    return "otlp" in environ.get("OTEL_TRACES_EXPORTER", "").lower()


def start_export(settings: TelemetrySettings, service: str, environ: Mapping[str, str] | None = None) -> Exporters:
    """Build OTLP/HTTP span and metric export, or nothing when not :func:`wanted`."""
    environ = os.environ if environ is None else environ
    if not wanted(settings, environ):
        return Exporters()
    try:
        # The optional 'otlp' extra, needed only when export is configured.
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: PLC0415
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(f"telemetry: {_EXTRA_HINT}", reason="invalid_config") from None
    name = settings.service_name or environ.get("OTEL_SERVICE_NAME") or service
    resource = Resource.create({"service.name": name})
    span_options: dict[str, Any] = {}
    metric_options: dict[str, Any] = {}
    if settings.otlp_endpoint:
        base = settings.otlp_endpoint.rstrip("/")
        span_options["endpoint"] = f"{base}/v1/traces"
        metric_options["endpoint"] = f"{base}/v1/metrics"
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**span_options)))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(**metric_options))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return Exporters(tracer_provider, meter_provider)
