"""A whole trace across two instrumented services, and the no-secrets rule for every signal."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.trace import SpanKind, StatusCode

import meshauth
import meshauth.audit
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import Mesh


async def charges(scope: dict[str, Any], receive: Any, send: Any) -> None:
    principal = scope["meshauth.principal"]
    body = json.dumps({"caller": principal.caller, "subject": principal.subject}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _payments_app(mesh: Mesh, telemetry: Any) -> Any:
    verifier = meshauth.Verifier(
        "payments",
        mesh.keys,
        clock=mesh.clock,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    policy = meshauth.Policy.from_dict(
        {
            "default": "deny",
            "delegators": ["gateway"],
            "rules": [{"callers": ["orders", "gateway"], "paths": ["/charges"]}],
        }
    )
    guarded = MeshAuthMiddleware(charges, verifier, policy=policy, tracer_provider=telemetry.tracer_provider)
    return OpenTelemetryMiddleware(guarded, tracer_provider=telemetry.tracer_provider)


def _call(
    telemetry: Any, base_url: str, auth: httpx.Auth | None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """One instrumented client call to the payments service on a real loopback server."""

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth, base_url=base_url, timeout=10) as client:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=telemetry.tracer_provider)
            return await client.post("/charges", headers=headers)

    return asyncio.run(run())


def _server_span(telemetry: Any) -> Any:
    """The server span, which the server ends just after the client has its response."""
    deadline = time.monotonic() + 5
    while True:
        found = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, "expected exactly one server span"
            return found[0]
        time.sleep(0.01)


def test_accepted_call_is_one_trace(mesh: Mesh, telemetry: Any, audit_log: Any, serve_asgi: Any) -> None:
    auth = meshauth.ServiceAuth(mesh.identity("orders"), audience="payments")
    response = _call(telemetry, serve_asgi(_payments_app(mesh, telemetry)), auth)
    assert response.status_code == 200

    server = _server_span(telemetry)
    client = next(s for s in telemetry.spans() if s.kind == SpanKind.CLIENT)
    (verify,) = telemetry.spans("meshauth.verify")
    (authorize,) = telemetry.spans("meshauth.authorize")
    trace_id = client.context.trace_id
    assert {s.context.trace_id for s in (client, server, verify, authorize)} == {trace_id}
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert verify.parent is not None and verify.parent.span_id == server.context.span_id
    assert authorize.parent is not None and authorize.parent.span_id == server.context.span_id
    assert verify.attributes["meshauth.outcome"] == "accepted"
    assert verify.attributes["meshauth.caller"] == "orders"
    assert verify.attributes["meshauth.audience"] == "payments"
    assert verify.attributes["meshauth.kid"] == mesh.signing_keys["orders"].kid
    assert authorize.attributes["meshauth.outcome"] == "accepted"

    (record,) = audit_log.fields()
    assert record["outcome"] == "accepted" and record["caller"] == "orders"
    assert record["method"] == "POST" and record["path"] == "/charges"
    assert record["trace_id"] == format(trace_id, "032x")


def test_rejected_call_errors_on_verify_not_on_the_server_span(
    mesh: Mesh, telemetry: Any, audit_log: Any, serve_asgi: Any
) -> None:
    token = mesh.identity("orders").mint("billing")  # for another service
    response = _call(telemetry, serve_asgi(_payments_app(mesh, telemetry)), None, {"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert 'error_description="wrong_audience"' in response.headers["www-authenticate"]

    server = _server_span(telemetry)
    (verify,) = telemetry.spans("meshauth.verify")
    assert verify.status.status_code == StatusCode.ERROR
    assert verify.attributes["meshauth.outcome"] == "rejected"
    assert verify.attributes["meshauth.reason"] == "wrong_audience"
    assert verify.attributes["error.type"] == "WrongAudience"
    assert server.attributes.get("http.response.status_code", server.attributes.get("http.status_code")) == 401
    assert server.status.status_code != StatusCode.ERROR
    assert not telemetry.spans("meshauth.authorize")  # never authorized: the app was not reached

    (record,) = audit_log.fields()
    assert record["outcome"] == "rejected" and record["reason"] == "wrong_audience"
    assert record["trace_id"] == format(server.context.trace_id, "032x")


def test_policy_denial_is_an_error_on_authorize(mesh: Mesh, telemetry: Any, audit_log: Any, serve_asgi: Any) -> None:
    auth = meshauth.ServiceAuth(mesh.identity("billing"), audience="payments")
    response = _call(telemetry, serve_asgi(_payments_app(mesh, telemetry)), auth)
    assert response.status_code == 403
    (authorize,) = telemetry.spans("meshauth.authorize")
    assert authorize.status.status_code == StatusCode.ERROR
    assert authorize.attributes["meshauth.outcome"] == "denied"
    (verify,) = telemetry.spans("meshauth.verify")
    assert verify.status.status_code != StatusCode.ERROR
    (record,) = audit_log.fields()
    assert record["outcome"] == "denied" and record["caller"] == "billing"


def test_no_secret_in_any_signal(mesh: Mesh, telemetry: Any, caplog: pytest.LogCaptureFixture, serve_asgi: Any) -> None:
    """Search every span attribute, metric attribute, log record and error message for token material."""
    caplog.set_level(logging.DEBUG)
    base_url = serve_asgi(_payments_app(mesh, telemetry))
    good = mesh.identity("orders").mint("payments")
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    expired = meshauth.ServiceIdentity("orders", mesh.signing_keys["orders"], clock=lambda: 1_000).mint("payments")
    txn = mesh.identity("gateway").issue_txn_token("alice", context={"groups": ["staff"]})
    bound = mesh.identity("gateway").mint("payments", txn_token=txn)
    tokens = [good, tampered, expired, bound, txn]
    errors: list[str] = []
    for token, txn_token in [(good, None), (tampered, None), (expired, None), (bound, txn), (bound, None), (txn, txn)]:
        headers = {"Authorization": f"Bearer {token}"}
        if txn_token is not None:
            headers["Txn-Token"] = txn_token
        _call(telemetry, base_url, None, headers)
        try:
            meshauth.Verifier("billing", mesh.keys, clock=mesh.clock).verify(token, txn_token)
        except meshauth.MeshAuthError as error:
            errors.append(f"{error} {error!r} {error.detail} {error.expected} {error.actual}")

    secrets = set()
    for token in tokens:
        _, payload, signature = token.split(".")
        secrets.update({token, payload, signature, signature[:20]})
    secrets.add(mesh.signing_keys["orders"].to_pem().decode().splitlines()[1])

    texts = errors[:]
    for span in telemetry.spans():
        texts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        texts.extend(str(event.attributes) for event in span.events)
        texts.append(str(span.status.description))
    for name in ("meshauth.verify.outcomes", "meshauth.verify.duration"):
        texts.extend(str(point.attributes) for point in telemetry.metric_points(name))
    formatter = meshauth.audit.JsonFormatter()
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(formatter.format(record))
    assert len(texts) > 20
    leaks = [(secret[:12], text[:80]) for text in texts for secret in secrets if secret in text]
    assert leaks == []


def test_json_formatter_writes_one_object_per_line(mesh: Mesh, tmp_path: Any) -> None:
    path = tmp_path / "audit.jsonl"
    handler = meshauth.audit.configure(path)
    try:
        verifier = mesh.verifier("payments")
        verifier.verify(mesh.identity("orders").mint("payments"))
        with pytest.raises(meshauth.TokenError):
            verifier.verify("not-a-token")
    finally:
        meshauth.audit.AUDIT_LOGGER.removeHandler(handler)
        handler.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "verify" and first["outcome"] == "accepted" and first["caller"] == "orders"
    assert second["outcome"] == "rejected" and second["reason"] == "malformed"
    assert {"timestamp", "level", "logger", "message", "trace_id", "span_id", "time"} <= set(first)


def _record(subject: str) -> logging.LogRecord:
    record = meshauth.audit.AUDIT_LOGGER.makeRecord("meshauth.audit", logging.INFO, __file__, 0, "m", (), None)
    record.meshauth = {"event": "verify", "outcome": "accepted", "subject": subject}
    return record


def test_a_batched_audit_log_writes_one_pass_of_the_loop_at_once(tmp_path: Any, monkeypatch: Any) -> None:
    path = tmp_path / "audit.jsonl"
    handler = meshauth.audit.JsonLinesHandler(path, batch=True)
    handler.setFormatter(meshauth.audit.JsonFormatter())
    writes: list[bytes] = []
    real_write = meshauth.audit.os.write

    def counting_write(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(meshauth.audit.os, "write", counting_write)

    async def one_pass() -> str:
        for subject in ("alice", "bob", "carol"):
            handler.handle(_record(subject))
        on_disk = path.read_text()
        await asyncio.sleep(0)  # the pass ends; the flush runs
        return on_disk

    try:
        assert asyncio.run(one_pass()) == ""  # nothing before the pass is over
        handler.handle(_record("dave"))  # outside an event loop: written at once
    finally:
        handler.close()
    assert [json.loads(line)["subject"] for line in path.read_text().splitlines()] == ["alice", "bob", "carol", "dave"]
    assert len(writes) == 2 and writes[0].count(b"\n") == 3  # three whole lines in one write


def test_an_audit_log_escapes_line_breaks_and_survives_a_logging_shutdown(tmp_path: Any) -> None:
    path = tmp_path / "audit.jsonl"
    handler = meshauth.audit.JsonLinesHandler(path)
    handler.setFormatter(meshauth.audit.JsonFormatter())
    try:
        handler.handle(_record("eve\u2028forged\x7f\u0085\x1b"))
        handler.close()  # as logging.shutdown() does when a server reconfigures logging
        handler.handle(_record("plain"))  # reopened, as logging.FileHandler does
    finally:
        handler.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and not any(ch in lines[0] for ch in "\u2028\x7f\u0085\x1b")
    assert [json.loads(line)["subject"] for line in lines] == ["eve\u2028forged\x7f\u0085\x1b", "plain"]


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # an invalid, all-zero trace id
        ("not a traceparent", None),
    ],
)
def test_audit_joins_the_callers_trace_without_an_sdk(
    mesh: Mesh, audit_log: Any, traceparent: str, expected: str | None
) -> None:
    """With no tracing SDK, the audit record still carries the trace id the caller sent."""
    from meshauth.wsgi import MeshAuthMiddleware as WSGIMiddleware

    token = mesh.identity("orders").mint("payments")
    headers = {"Authorization": f"Bearer {token}", "traceparent": traceparent}
    asgi_app = MeshAuthMiddleware(charges, mesh.verifier("payments"))

    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    async def asgi_call(headers: dict[str, str]) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(asgi_app), base_url="http://p") as client:
            return (await client.post("/charges", headers=headers)).status_code

    assert asyncio.run(asgi_call(headers)) == 200
    assert asyncio.run(asgi_call({**headers, "Authorization": "Bearer nope.nope.nope"})) == 401
    with httpx.Client(transport=httpx.WSGITransport(WSGIMiddleware(hello, mesh.verifier("payments")))) as client:
        assert client.get("http://p/", headers=headers).status_code == 200
    assert [record["trace_id"] for record in audit_log.fields()] == [expected] * 3
