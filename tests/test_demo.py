"""The one-command demo plays every scenario as expected, on loopback, in a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from meshauth.cli._demo import _span_tree, _tamper, main


@pytest.mark.slow
def test_demo_runs_every_scenario_as_expected(tmp_path: pytest.TempPathFactory) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshauth", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "8 of 8 scenarios behaved as expected" in out
    assert out.count("  PASS  ") == 8 and "FAIL" not in out
    for status, reason in [
        ("200", "ok"),
        ("401", "expired"),
        ("401", "bad_signature"),
        ("401", "wrong_audience"),
        ("401", "untrusted_txn_issuer"),
        ("refused", "wrong_responder"),
        ("refused", "body_mismatch"),
        ("502", "unknown_kid"),
    ]:
        assert re.search(rf"{status}\s+{reason}\s+trace [0-9a-f]{{32}}", out), (status, reason)
    match = re.search(
        r"payments charged alice called by orders inside transaction ([\w-]+) \(Txn-Token from gateway\)", out
    )
    assert match, out
    # one transaction, followed across the gateway's and both services' audit records
    transaction = match.group(1)
    last = out.splitlines()[-1]
    assert (
        last
        == f"browse the audit log: meshauth console --audit {tmp_path}/audit.jsonl --registry {tmp_path}/registry.json"
    )
    # the span tree shows the delegated hop and the mutual-auth check
    assert f"meshauth.verify [accepted] caller=gateway subject=alice audience=orders transaction={transaction}" in out
    assert "meshauth.response.verify [rejected: wrong_responder]" in out
    # the keys stay private and every gateway decision is in the audit log
    audit = (tmp_path / "audit.jsonl").read_text()  # type: ignore[operator]
    assert audit.count('"event": "gateway.request"') == 4  # alice, expired, tampered, revoked
    assert audit.count('"event": "request"') >= 5  # the services' own decisions
    in_txn = [json.loads(line) for line in audit.splitlines() if transaction in line]
    assert {(r["event"], r.get("audience")) for r in in_txn} >= {
        ("gateway.request", "orders"),
        ("request", "orders"),
        ("request", "payments"),
    }
    assert not re.search(r"[\w-]{16,}\.[\w-]{16,}\.[\w-]{16,}", audit + out), "a token reached the log or the report"
    assert oct((tmp_path / "orders.pem").stat().st_mode & 0o777) == "0o600"  # type: ignore[operator]


def test_demo_help() -> None:
    assert main(["--help"]) == 0


def test_tampering_keeps_the_signature_and_changes_the_subject() -> None:
    import jwt

    token = jwt.encode({"sub": "alice"}, "k" * 32, algorithm="HS256")
    forged = _tamper(token)
    assert forged.rsplit(".", 1)[1] == token.rsplit(".", 1)[1]
    assert jwt.decode(forged, options={"verify_signature": False})["sub"] == "mallory"


def test_span_tree_orders_parents_before_children() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root"), tracer.start_as_current_span("meshauth.verify") as span:
        span.set_attribute("meshauth.outcome", "rejected")
        span.set_attribute("meshauth.reason", "expired")
    lines = _span_tree(list(exporter.get_finished_spans()))
    assert lines[0].startswith("root ")
    assert lines[1].startswith("  meshauth.verify [rejected: expired]")
