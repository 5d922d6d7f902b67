"""The console's server and index, over real audit logs and a real loopback HTTP server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_logs import AuditFile, audit_files, decision, running_console

from meshauth import SigningKey
from meshauth.cli import main
from meshauth.console import AuditIndex, open_registry
from meshauth.testing import FakeClock

NOW = 1_800_000_000.0


def get(server: Any, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.url.rstrip("/") + path, headers=headers, timeout=10)


def page(server: Any, **params: str) -> dict[str, Any]:
    response = httpx.get(server.url + "api/decisions", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def times(document: dict[str, Any]) -> list[float]:
    return [item["time"] for item in document["decisions"]]


@pytest.fixture
def log(tmp_path: Path) -> AuditFile:
    file = AuditFile(tmp_path / "audit.jsonl").open()
    yield file  # type: ignore[misc]
    file.close()


def test_decisions_newest_first_with_every_field(log: AuditFile) -> None:
    log.write(
        decision(NOW, caller="gateway", subject="alice", audience="orders", method="POST", path="/orders/1", rule=0),
        decision(NOW + 1, outcome="rejected", reason="expired", caller="orders", trace_id="t" * 32, transaction="x1"),
    )
    with running_console([log.path]) as server:
        document = page(server)
    assert times(document) == [NOW + 1, NOW]
    newest, oldest = (item["record"] for item in document["decisions"])
    assert (newest["outcome"], newest["reason"], newest["trace_id"], newest["transaction"]) == (
        "rejected",
        "expired",
        "t" * 32,
        "x1",
    )
    assert (oldest["subject"], oldest["path"], oldest["rule"], oldest["logger"]) == (
        "alice",
        "/orders/1",
        0,
        "meshauth.audit",
    )
    assert document["next"] is None


def test_filters_exact_outcome_and_substrings(log: AuditFile) -> None:
    log.write(
        decision(NOW, caller="gateway", path="/orders/1"),
        decision(NOW + 1, outcome="rejected", reason="expired", caller="orders", path="/charges"),
        decision(NOW + 2, outcome="denied", reason="no_rule", caller="orders", path="/orders/2", rule="r1"),
        decision(NOW + 3, caller="billing", subject="b\u00e9atrice", path="/orders/3"),
    )
    with running_console([log.path]) as server:
        assert times(page(server, outcome="rejected")) == [NOW + 1]
        assert times(page(server, caller="orders")) == [NOW + 2, NOW + 1]
        assert times(page(server, path="/orders/")) == [NOW + 3, NOW + 2, NOW]
        assert times(page(server, path="/orders/", caller="ord")) == [NOW + 2]
        assert times(page(server, rule="r1")) == [NOW + 2]
        assert times(page(server, subject="\u00e9a")) == [NOW + 3]
        assert times(page(server, reason="nothing-like-this")) == []


def test_filters_on_audience_method_trace_transaction_and_event(log: AuditFile) -> None:
    trace_a, trace_b = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
    log.write(
        decision(NOW, audience="orders", method="GET", trace_id=trace_a, span_id=trace_b[:16], transaction="t-1"),
        decision(NOW + 1, audience="payments", method="POST", trace_id=trace_b, transaction="t-2"),
        decision(NOW + 2, audience="payments", method="GET", trace_id=trace_a, event="response.verify"),
    )
    with running_console([log.path]) as server:
        assert times(page(server, audience="payments")) == [NOW + 2, NOW + 1]
        assert times(page(server, method="POST")) == [NOW + 1]
        # The trace filter reads trace_id only (record 0's span id starts like trace_b).
        assert times(page(server, trace=trace_b[:16])) == [NOW + 1]
        assert times(page(server, trace=trace_a)) == [NOW + 2, NOW]
        assert times(page(server, transaction="t-2")) == [NOW + 1]
        assert times(page(server, transaction="t-", audience="orders")) == [NOW]
        assert times(page(server, event="response.verify")) == [NOW + 2]


def test_pages_follow_a_cursor_across_two_logs_without_gaps_or_repeats(tmp_path: Path) -> None:
    with audit_files(tmp_path / "a.jsonl", tmp_path / "b.jsonl") as (first, second):
        first.write(*(decision(NOW + 2 * i, caller="a") for i in range(60)))
        second.write(*(decision(NOW + 2 * i + 1, caller="b") for i in range(60)))
        with running_console([first.path, second.path]) as server:
            seen: list[float] = []
            document = page(server, limit="25")
            while True:
                seen += times(document)
                if document["next"] is None:
                    break
                first.write(decision(NOW + 1000, caller="a"))  # new records do not shift older pages
                document = page(server, limit="25", cursor=document["next"])
    assert seen == [NOW + i for i in range(119, -1, -1)]


def test_malformed_and_truncated_lines_are_skipped_and_counted(log: AuditFile) -> None:
    log.write(decision(NOW, caller="one"))
    with log.path.open("a", encoding="utf-8") as raw:
        raw.write('{"outcome": "accepted", "caller": "cut off\n[1, 2]\n\nnot json at all\n')
    log.write(decision(NOW + 1, caller="two"))
    with log.path.open("a", encoding="utf-8") as raw:
        raw.write('{"outcome": "accepted", "time": 1800000002, "caller": "still being wri')
    with running_console([log.path]) as server:
        status = get(server, "/api/status").json()["logs"][0]
        assert (status["lines"], status["malformed"]) == (5, 3)
        assert [item["record"]["caller"] for item in page(server)["decisions"]] == ["two", "one"]
        with log.path.open("a", encoding="utf-8") as raw:
            raw.write('tten"}\n')
        server.wait_indexed()
        assert next(item["record"]["caller"] for item in page(server)["decisions"]) == "still being written"


def wait_for(server: Any, predicate: Any) -> dict[str, Any]:
    """The status once ``predicate(status)`` holds (the follower polls every 0.25 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = get(server, "/api/status").json()
        if predicate(status):
            return status  # type: ignore[no-any-return]
        threading.Event().wait(0.05)
    raise AssertionError(f"condition never held: {status}")


def test_rotation_keeps_the_old_file_and_follows_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with audit_files(path) as (file,):
        file.write(decision(NOW, caller="before"))
        with running_console([path]) as server:
            file.close()
            path.rename(tmp_path / "audit.jsonl.1")
            file.open().write(decision(NOW + 1, caller="after"))
            wait_for(server, lambda s: s["logs"][0]["rotations"] == 1 and s["logs"][0]["lines"] == 2)
            assert [item["record"]["caller"] for item in page(server)["decisions"]] == ["after", "before"]
            transaction = get(server, "/api/transaction?id=after").json()
            assert transaction["decisions"] == []  # ids only, not callers


def test_a_log_that_disappears_is_shown_missing_and_its_records_stay(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with audit_files(path) as (file,):
        file.write(decision(NOW, caller="kept"))
        with running_console([path]) as server:
            os.unlink(path)
            wait_for(server, lambda s: s["logs"][0]["state"] == "missing")
            assert [item["record"]["caller"] for item in page(server)["decisions"]] == ["kept"]


def test_a_log_truncated_in_place_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with audit_files(path) as (file,):
        file.write(*(decision(NOW + i, caller="old") for i in range(5)))
        with running_console([path]) as server:
            os.truncate(path, 0)
            file.write(decision(NOW + 10, caller="new"))
            wait_for(server, lambda s: s["logs"][0]["lines"] == 6)
            assert [item["record"]["caller"] for item in page(server)["decisions"]] == ["new"]


def test_a_missing_log_is_followed_once_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.jsonl"
    index = AuditIndex([str(path)])
    index.follow()
    assert index.status()["logs"][0]["state"] == "missing"
    with audit_files(path) as (file,):
        file.write(decision(NOW, caller="late"))
        index.follow()
    assert [item["record"]["caller"] for item in index.decisions({}).decisions] == ["late"]
    index.close()


def test_chart_counts_outcomes_per_minute_by_reason_over_the_last_hour(log: AuditFile) -> None:
    clock = FakeClock(NOW)
    minute = int(NOW // 60) * 60
    log.write(
        decision(minute - 2 * 3600, reason="too_old"),  # outside the hour: not charted
        decision(minute - 120 + 5),
        decision(minute - 120 + 6, outcome="rejected", reason="expired"),
        decision(minute - 120 + 7, outcome="rejected", reason="expired"),
        decision(minute + 1, outcome="denied", reason="no_rule"),
    )
    with running_console([log.path], clock=clock) as server:
        chart = get(server, "/api/chart").json()
    assert len(chart["minutes"]) == 60 and chart["minutes"][-1]["minute"] == minute
    counted = {m["minute"]: m["counts"] for m in chart["minutes"] if m["counts"]}
    assert counted == {
        minute - 120: [
            {"outcome": "accepted", "reason": "allowed", "count": 1},
            {"outcome": "rejected", "reason": "expired", "count": 2},
        ],
        minute: [{"outcome": "denied", "reason": "no_rule", "count": 1}],
    }


def test_transaction_joins_two_logs_in_time_order(tmp_path: Path) -> None:
    with audit_files(tmp_path / "gateway.jsonl", tmp_path / "orders.jsonl") as (gateway, orders):
        gateway.write(decision(NOW, event="gateway.request", subject="alice", transaction="txn-1", trace_id="tr-1"))
        orders.write(decision(NOW + 0.5, event="verify", caller="gateway", transaction="txn-1"))
        gateway.write(
            decision(NOW + 0.2, event="txn.issue", transaction="txn-1"), decision(NOW + 1, transaction="other")
        )
        orders.write(decision(NOW + 0.7, event="request", caller="gateway", trace_id="tr-1"))
        with running_console([gateway.path, orders.path]) as server:
            by_transaction = get(server, "/api/transaction?id=txn-1").json()
            by_trace = get(server, "/api/transaction?id=tr-1").json()
    assert [(d["log"], d["record"]["event"]) for d in by_transaction["decisions"]] == [
        (0, "gateway.request"),
        (0, "txn.issue"),
        (1, "verify"),
    ]
    assert [d["time"] for d in by_trace["decisions"]] == [NOW, NOW + 0.7]


def registry_file(tmp_path: Path, clock: FakeClock) -> Path:
    keys = [
        SigningKey.generate().public_jwk("orders", nbf=int(clock() - 10 * 86400), exp=int(clock() + 2 * 86400)),
        SigningKey.generate("EdDSA").public_jwk("payments", nbf=int(clock() - 3600)),
        SigningKey.generate().public_jwk("old", exp=int(clock() - 60)),
    ]
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_keys_with_age_expiry_warning_and_services_without_a_key(tmp_path: Path, log: AuditFile) -> None:
    clock = FakeClock(NOW)
    registry = open_registry(str(registry_file(tmp_path, clock)), expiry_warning=3 * 86400, clock=clock)
    log.write(decision(NOW, caller="orders"), decision(NOW, caller="ghost"), decision(NOW, caller="ghost"))
    with running_console([log.path], registry, clock=clock) as server:
        keys = get(server, "/api/keys").json()
    rows = {row["owner"]: row for row in keys["keys"]}
    assert (rows["orders"]["alg"], rows["orders"]["age"], rows["orders"]["expires_in"]) == ("ES256", 864000, 172800)
    assert rows["orders"]["status"] == "expires soon"
    assert (rows["payments"]["alg"], rows["payments"]["age"], rows["payments"]["status"]) == ("EdDSA", 3600, "valid")
    assert rows["payments"]["expires_in"] is None
    assert rows["old"]["status"] == "expired"
    assert keys["without_key"] == [{"service": "ghost", "decisions": 2}]
    assert all(
        set(row) == {"kid", "owner", "alg", "not_before", "expires", "age", "expires_in", "status"}
        for row in keys["keys"]
    )


def test_keys_from_a_jwks_url(tmp_path: Path) -> None:
    from meshauth import JWKSFile
    from meshauth._publish import jwks_app
    from meshauth.testing import LoopbackServer

    clock = FakeClock(NOW)
    with LoopbackServer(jwks_app(JWKSFile(registry_file(tmp_path, clock)))) as jwks:
        registry = open_registry(jwks.url + "/.well-known/jwks.json", expiry_warning=86400, clock=clock)
        keys = registry.keys({"orders": 1, "gateway": 4})
    assert sorted(row["owner"] for row in keys["keys"]) == ["old", "orders", "payments"]
    assert keys["without_key"] == [{"service": "gateway", "decisions": 4}]


def test_keys_from_the_redis_registry_follow_its_changes(redis_namespace: tuple[str, str]) -> None:
    from meshauth.redis import RedisPublisher

    url, namespace = redis_namespace
    publisher = RedisPublisher(url, namespace)
    now = int(time.time())
    orders, payments = SigningKey.generate(), SigningKey.generate("EdDSA")
    publisher.publish(orders.record("orders", not_before=now - 7200, expires=now + 3600))
    publisher.publish(payments.record("payments", not_before=now, expires=now + 30 * 86400))
    registry = open_registry(url, expiry_warning=86400, namespace=namespace)
    try:
        keys = registry.keys({"orders": 3, "ghost": 1})
        rows = {row["owner"]: row for row in keys["keys"]}
        assert (rows["orders"]["alg"], rows["orders"]["status"]) == ("ES256", "expires soon")
        assert rows["orders"]["age"] == pytest.approx(7200, abs=60)
        assert (rows["payments"]["alg"], rows["payments"]["status"]) == ("EdDSA", "valid")
        assert keys["without_key"] == [{"service": "ghost", "decisions": 1}]
        assert namespace in keys["source"]
        publisher.revoke_service("orders")
        deadline = time.monotonic() + 10
        while "orders" in {row["owner"] for row in registry.keys({})["keys"]}:
            assert time.monotonic() < deadline, "the revocation never reached the console"
            threading.Event().wait(0.05)
        assert registry.keys({"orders": 3})["without_key"] == [{"service": "orders", "decisions": 3}]
    finally:
        registry.close()


def test_an_unreachable_redis_registry_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments = ["--audit", str(tmp_path / "a.jsonl"), "--registry", f"redis://127.0.0.1:{port}/0", "--wait", "0.2"]
    code = main(["console", *arguments])
    assert code == 2
    assert "registry unavailable" in capsys.readouterr().err


# -- the HTTP surface ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "/api/decisions?bogus=1",
        "/api/decisions?caller=a&caller=b",
        "/api/decisions?limit=0",
        "/api/decisions?limit=501",
        "/api/decisions?limit=%EF%BC%91",  # a full-width digit
        "/api/decisions?cursor=0:0:1;drop",
        "/api/decisions?outcome=maybe",
        "/api/decisions?path=" + "x" * 257,
        "/api/decisions?==",
        "/api/status?x=1",
        "/api/chart?refresh=1",
        "/api/keys?all=1",
        "/api/transaction",
        "/api/transaction?id=a&other=b",
        "/static/console.js?v=1",
    ],
)
def test_queries_the_page_does_not_send_are_refused(log: AuditFile, query: str) -> None:
    with running_console([log.path]) as server:
        response = get(server, query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_security_headers_on_every_response_and_no_cors(log: AuditFile) -> None:
    with running_console([log.path]) as server:
        responses = [
            get(server, path, Origin=server.url.rstrip("/"))
            for path in ("/", "/static/console.js", "/static/console.css", "/api/status", "/api/nothing")
        ]
        responses.append(get(server, "/api/decisions?bogus=1"))
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 400]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert not any(name.startswith("access-control-") for name in response.headers)
    assert responses[1].headers["content-type"].startswith("text/javascript")
    assert b"<script>" not in responses[0].content.replace(b'<script src="/static/console.js" defer>', b"")


def test_other_hosts_origins_and_sites_are_refused(log: AuditFile) -> None:
    with running_console([log.path]) as server:
        port = server.server_address[1]
        refused = [
            get(server, "/api/status", Host=f"evil.example:{port}"),  # DNS rebinding
            get(server, "/api/status", Host="127.0.0.1:1"),
            get(server, "/api/status", Host=f"localhost.evil.example:{port}"),
            get(server, "/api/status", Host="localhost"),
            get(server, "/api/status", Origin="http://evil.example"),
            get(server, "/api/status", **{"Sec-Fetch-Site": "cross-site"}),
        ]
        allowed = [
            get(server, "/api/status", Host=f"localhost:{port}"),
            get(server, "/api/status", Host=f"[::1]:{port}"),  # IP literals cannot be rebound
            get(server, "/", **{"Sec-Fetch-Site": "none"}),
        ]
        posted = httpx.post(server.url + "api/status", timeout=10)
    assert [r.status_code for r in refused] == [403] * 6
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert posted.status_code == 405


def test_hostile_values_are_json_escaped(log: AuditFile) -> None:
    hostile = "<script>alert(1)</script>\u2028\u2029\u202e\x1b[31m"
    log.write(decision(NOW, subject=hostile, path="/a\u2028b"))
    with running_console([log.path]) as server:
        response = get(server, "/api/decisions")
    assert b"<script>" not in response.content and "\u2028".encode() not in response.content
    assert b"\\u2028" in response.content and b"\\u003cscript\\u003e" in response.content
    assert response.json()["decisions"][0]["record"]["subject"] == hostile


def test_many_concurrent_readers_while_the_log_grows(log: AuditFile) -> None:
    log.write(*(decision(NOW + i, caller="seed") for i in range(200)))
    failures: list[str] = []
    with running_console([log.path]) as server:

        def reader() -> None:
            with httpx.Client(timeout=20) as client:
                for _ in range(10):
                    document = client.get(server.url + "api/decisions", params={"limit": "50"}).json()
                    found = times(document)
                    if found != sorted(found, reverse=True) or len(found) != 50:
                        failures.append(f"{found[:3]}... ({len(found)})")

        threads = [threading.Thread(target=reader) for _ in range(16)]
        for thread in threads:
            thread.start()
        for i in range(300):
            log.write(decision(NOW + 200 + i, caller="live"))
        for thread in threads:
            thread.join()
        status = wait_for(server, lambda s: s["logs"][0]["lines"] == 500)
    assert failures == []
    assert status["logs"][0]["malformed"] == 0


# -- the command --------------------------------------------------------------------------------


def test_console_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["console", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--audit FILE" in out and "--registry" in out and "127.0.0.1:8090" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "0.0.0.0:8090"], "--allow-remote"),
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--expiry-warning", "soon"], "not a duration"),
    ],
)
def test_console_refuses_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert main(["console", "--audit", str(tmp_path / "a.jsonl"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_a_long_search_stops_at_its_time_limit_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [json.dumps(decision(NOW + i, caller="common", path="/p/" + "x" * 400)) for i in range(8000)]
    lines[10] = lines[10].replace('"common"', '"needle"')
    lines[7000] = lines[7000].replace('"common"', '"needle"')
    path.write_text("\n".join(lines) + "\n")  # about 3.5 MB: several blocks
    index = AuditIndex([str(path)])
    index.follow()
    found: list[float] = []
    cursor, rounds = None, 0
    while True:
        result = index.decisions({"caller": "needle"}, cursor=cursor, time_limit=0)
        found += [item["time"] for item in result.decisions]
        rounds += 1
        if result.next is None:
            break
        assert result.partial
        cursor = result.next
    index.close()
    assert found == [NOW + 7000, NOW + 10]
    assert rounds >= 3


def test_after_several_rotations_the_two_newest_files_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    index = AuditIndex([str(path)])
    for generation in range(4):
        with audit_files(path) as (file,):
            file.write(decision(NOW + generation, caller=f"generation-{generation}"))
        index.follow()
        os.replace(path, tmp_path / f"audit.jsonl.{generation}")
    index.follow()
    status = index.status()["logs"][0]
    callers = [item["record"]["caller"] for item in index.decisions({}).decisions]
    index.close()
    assert callers == ["generation-3", "generation-2"]
    assert (status["state"], status["lines"], status["rotations"]) == ("missing", 4, 3)


def test_records_without_time_nested_fields_and_iso_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "other-writer.jsonl"
    path.write_text(
        '{"timestamp": "2027-01-15T08:00:00+00:00", "meshauth": {"outcome": "denied", "caller": "nested"}}\n'
        '{"timestamp": "2027-01-15T08:00:01", "outcome": "accepted", "caller": "naive-utc"}\n'
        '{"timestamp": "yesterday", "outcome": "accepted", "caller": "no-time"}\n'
    )
    index = AuditIndex([str(path)])
    index.follow()
    items = index.decisions({}).decisions
    index.close()
    assert [(item["record"]["caller"], item["time"]) for item in items] == [
        ("no-time", None),  # one log: newest line first
        ("naive-utc", 1_800_000_001.0),
        ("nested", 1_800_000_000.0),
    ]
    assert items[2]["record"]["outcome"] == "denied" and "meshauth" not in items[2]["record"]


def test_meshauth_console_serves_until_interrupted(tmp_path: Path, log: AuditFile) -> None:
    import signal
    import subprocess
    import sys

    log.write(decision(NOW, caller="from-the-command"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "meshauth", "console", "--audit", str(log.path), "--listen", f"127.0.0.1:{port}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            assert banner.startswith(f"meshauth console on http://127.0.0.1:{port}/")
            for _ in range(100):
                if httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=5).json()["logs"][0]["lines"] == 1:
                    break
                threading.Event().wait(0.05)
            document = httpx.get(f"http://127.0.0.1:{port}/api/decisions", timeout=5).json()
            assert [item["record"]["caller"] for item in document["decisions"]] == ["from-the-command"]
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0


def test_a_flood_of_invented_reasons_is_folded_into_one_bar(log: AuditFile) -> None:
    clock = FakeClock(NOW)
    log.write(*(decision(NOW - 1, outcome="rejected", reason=f"made-up-{i}") for i in range(100)))
    index = AuditIndex([str(log.path)], clock=clock)
    index.follow()
    counts = next(m["counts"] for m in index.chart()["minutes"] if m["counts"])
    index.close()
    assert len(counts) == 49
    assert {"outcome": "rejected", "reason": "(other reasons)", "count": 52} in counts
    assert sum(c["count"] for c in counts) == 100


def test_before_jumps_back_in_time_by_bisection_and_pages_on(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(decision(NOW + i, path="/p/" + "x" * 400)) + "\n" for i in range(8000)))
    index = AuditIndex([str(path)])
    index.follow()
    first = index.decisions({}, before=NOW + 5000.5, limit=3)
    assert [item["time"] for item in first.decisions] == [NOW + 5000, NOW + 4999, NOW + 4998]
    second = index.decisions({}, before=NOW + 5000.5, cursor=first.next, limit=2)
    assert [item["time"] for item in second.decisions] == [NOW + 4997, NOW + 4996]
    for second in range(0, 8000, 97):  # wherever the bisection lands, nothing is skipped
        assert index.decisions({}, before=NOW + second, limit=1).decisions[0]["time"] == NOW + second
    assert index.decisions({}, before=NOW - 1).decisions == []
    assert [item["time"] for item in index.decisions({}, before=NOW + 10**6, limit=1).decisions] == [NOW + 7999]
    index.close()


def test_before_over_http(log: AuditFile) -> None:
    log.write(*(decision(NOW + i) for i in range(5)))
    with running_console([log.path]) as server:
        assert times(page(server, before=str(int(NOW + 2)))) == [NOW + 2, NOW + 1, NOW]
        assert get(server, "/api/decisions?before=yesterday").status_code == 400


@pytest.mark.parametrize("block", [1, 2, 7, 64, 1 << 20])
def test_backward_reading_matches_a_plain_split_at_any_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from meshauth.console import _logs

    monkeypatch.setattr(_logs, "BLOCK", block)
    path = tmp_path / "lines.jsonl"
    alphabet = st.sampled_from(["a", "b", "é", '"', "\\", " ", "\u2028", "{"])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.text(alphabet, max_size=12), max_size=12), st.text(alphabet, max_size=3))
    def check(lines: list[str], needle: str) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            segment = _logs.Segment(0, fd, (0, 0))
            found = [(line.start, line.end, line.data) for line in _logs.lines_backward(segment, len(data))]
            wanted_needle = needle.encode()
            filtered = [line.data for line in _logs.lines_backward(segment, len(data), ((wanted_needle,),))]
        finally:
            os.close(fd)
        expected, offset = [], 0
        for line in data.split(b"\n")[:-1]:
            expected.append((offset, offset + len(line) + 1, line))
            offset += len(line) + 1
        expected = [entry for entry in reversed(expected) if entry[2].strip()]
        assert found == expected
        assert filtered == [entry[2] for entry in expected if wanted_needle in entry[2]]

    check()


def test_an_overlong_line_is_counted_once_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshauth.console import _logs

    monkeypatch.setattr(_logs, "BLOCK", 32)
    path = tmp_path / "long.jsonl"
    overlong = '{"caller": "' + "x" * 100 + '"}'
    path.write_text(f'{{"caller": "a", "time": 1}}\n{overlong}\n{{"caller": "b", "time": 2}}\n')
    index = AuditIndex([str(path)])
    index.follow()
    status = index.status()["logs"][0]
    index.close()
    assert (status["lines"], status["malformed"], status["indexed"]) == (3, 1, 1.0)


def test_the_console_benchmark_reports_its_figures(tmp_path: Path) -> None:
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_console.py"
    spec = importlib.util.spec_from_file_location("bench_console", bench)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.measure(2000, directory=str(tmp_path))
    assert (figures["lines"], figures["lines_counted"], figures["malformed"]) == (2000, 2000, 0)
    assert (figures["filtered_found"], figures["transaction_found"]) == (1, 4)
    assert figures["peak_rss_mib"] >= figures["baseline_rss_mib"] > 0
    assert isinstance(figures["open_within_budget"], bool)  # the timing itself is judged by the script, not here


def test_the_first_page_is_served_before_the_logs_are_counted(log: AuditFile) -> None:
    log.write(decision(NOW, caller="first"))
    index = AuditIndex([str(log.path)])
    index.open()  # what ConsoleServer.start() does before its follower counts anything
    assert [item["record"]["caller"] for item in index.decisions({}).decisions] == ["first"]
    assert index.status()["logs"][0]["lines"] == 0
    index.close()
