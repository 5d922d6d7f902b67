"""Export the spans of an orders -> payments call over OTLP (to Jaeger, Tempo or any collector).

Run a collector (for example Jaeger all-in-one, which accepts OTLP/HTTP on port 4318), then:

    pip install 'meshauth[otlp]'
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 python examples/otlp_two_services.py

Both services run in this process, each with its own tracer provider (so each shows up under its
own service name); payments listens on a real loopback port. Orders makes one good call and one
with a token meant for another service, so the collector receives an accepted and a rejected
``meshauth.verify`` span. In Jaeger, search service ``payments`` with the tag
``meshauth.outcome=rejected``; in Tempo, ``{ span.meshauth.outcome = "rejected" }``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import LoopbackServer, Mesh


def provider(service: str, endpoint: str) -> TracerProvider:
    """A tracer provider that exports one service's spans over OTLP/HTTP."""
    tracer_provider = TracerProvider(resource=Resource.create({"service.name": service}))
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    return tracer_provider


async def charges(scope: dict[str, Any], receive: Any, send: Any) -> None:
    principal = scope["meshauth.principal"]
    body = json.dumps({"charged_by": principal.caller}).encode()
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def main() -> int:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318").rstrip("/")
    mesh = Mesh(["orders", "payments"])  # throw-away keys and an in-memory registry
    orders_traces, payments_traces = provider("orders", endpoint), provider("payments", endpoint)

    verifier = meshauth.Verifier("payments", mesh.keys, tracer_provider=payments_traces)
    payments = OpenTelemetryMiddleware(
        MeshAuthMiddleware(charges, verifier, tracer_provider=payments_traces), tracer_provider=payments_traces
    )
    orders = meshauth.ServiceIdentity("orders", mesh.signing_keys["orders"], tracer_provider=orders_traces)

    with LoopbackServer(payments) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=orders_traces)
        good = client.post("/charges", auth=meshauth.ServiceAuth(orders, audience="payments"))
        wrong = client.post("/charges", headers={"Authorization": f"Bearer {orders.mint('billing')}"})
        print(f"accepted call: HTTP {good.status_code}; rejected call: HTTP {wrong.status_code}")

    payments_traces.shutdown()  # flushes the batches to the collector
    orders_traces.shutdown()
    print(f"spans exported to {endpoint}; search for meshauth.outcome=rejected")
    return 0 if (good.status_code, wrong.status_code) == (201, 401) else 1


if __name__ == "__main__":
    raise SystemExit(main())
