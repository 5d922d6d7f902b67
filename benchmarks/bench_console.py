"""The console on a 1,000,000-line audit log: time to open, time to index, peak memory.

Run from the repository root::

    python benchmarks/bench_console.py                 # 1,000,000 lines (about 650 MiB in a temp dir)
    python benchmarks/bench_console.py --lines 100000 --json out.json

``measure(lines)`` writes an audit log in the format meshauth's JSON formatter
writes (every DESIGN section 6 field, about 690 bytes a line, one decision in 50
rejected), then starts a console on it in a fresh Python process and reports:

* ``open_s``: from constructing the console to the first page of 100 decisions
  served over HTTP (what a browser shows first); budget < 2 s;
* ``filtered_s``: a page filtered on a caller found once, two thirds of the way back (the
  search stops after 1 s with what it found and a cursor: ``filtered_partial``);
* ``transaction_s``: one transaction joined across the log;
* ``indexed_s``: until every line is counted (malformed lines, the chart, callers);
* ``peak_rss_mib``: the console process's peak resident memory (``VmHWM``),
  against ``baseline_rss_mib`` for the same process before it opens the log.
  Memory is bounded: it does not grow with the log (compare ``--lines``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

OPEN_BUDGET_S = 2.0
CALLERS = ["gateway", "orders", "payments", "inventory", "billing", "shipping", "search", "profile"]
REASONS = [("rejected", "expired"), ("rejected", "bad_signature"), ("denied", "no_rule"), ("rejected", "unknown_kid")]


def write_log(path: Path, lines: int, *, start: float | None = None) -> None:
    """``lines`` audit records, one per line, over the hour before ``start`` (default: now)."""
    rng = random.Random(7)
    end = time.time() if start is None else start
    with path.open("w", encoding="utf-8") as out:
        for number in range(lines):
            when = end - 3600 + 3600 * number / lines
            outcome, reason = rng.choice(REASONS) if number % 50 == 0 else ("accepted", "allowed")
            caller = "rare-caller" if number == lines // 3 else CALLERS[number % len(CALLERS)]
            record = {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when)),
                "level": "INFO",
                "logger": "meshauth.audit",
                "message": f"request {outcome}: {reason}",
                "event": "request",
                "outcome": outcome,
                "reason": reason,
                "detail": None,
                "caller": caller,
                "subject": f"user-{number % 997}",
                "transaction": f"txn-{number // 4:08d}",
                "txn_issuer": "gateway",
                "audience": CALLERS[(number + 1) % len(CALLERS)],
                "kid": "uvwUDVhtiE8TUvri_bI2vDf2xtGHpR7UJ_8mr_ELy-A",
                "jti": f"{number:022d}",
                "method": "POST",
                "path": f"/orders/{number % 1000}",
                "client": "127.0.0.1",
                "rule": number % 5,
                "policy_sha256": "0" * 64,
                "trace_id": f"{number // 4:032x}",
                "span_id": f"{number:016x}",
                "time": when,
            }
            out.write(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(path: str, transaction: str) -> dict[str, Any]:
    """Runs in a fresh process: open a console on ``path`` and time what a user waits for."""
    from meshauth.console import AuditIndex, ConsoleServer  # noqa: PLC0415 - imported before the baseline

    baseline = _rss_mib("VmRSS")
    with httpx.Client(timeout=60) as client:
        opened = started = time.perf_counter()
        server = ConsoleServer(AuditIndex([path])).start()
        first = client.get(server.url + "api/decisions", params={"limit": "100"}).json()
        open_s = time.perf_counter() - started
        assert len(first["decisions"]) == 100
        started = time.perf_counter()
        rare = client.get(server.url + "api/decisions", params={"caller": "rare-caller"}).json()
        filtered_s = time.perf_counter() - started
        started = time.perf_counter()
        joined = client.get(server.url + "api/transaction", params={"id": transaction}).json()
        transaction_s = time.perf_counter() - started
        server.wait_indexed(timeout=600)
        indexed_s = time.perf_counter() - opened
        status = client.get(server.url + "api/status").json()["logs"][0]
        server.stop()
    return {
        "open_s": round(open_s, 3),
        "filtered_s": round(filtered_s, 3),
        "filtered_found": len(rare["decisions"]),
        "filtered_partial": rare["partial"],
        "transaction_s": round(transaction_s, 3),
        "transaction_found": len(joined["decisions"]),
        "indexed_s": round(indexed_s, 2),
        "lines_counted": status["lines"],
        "malformed": status["malformed"],
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(_rss_mib("VmHWM"), 1),
    }


def measure(lines: int = 1_000_000, directory: str | None = None) -> dict[str, Any]:
    """Write a ``lines``-line audit log and measure a console opening it (in a fresh process)."""
    with tempfile.TemporaryDirectory(prefix="meshauth-bench-console-", dir=directory) as work:
        path = Path(work) / "audit.jsonl"
        write_log(path, lines)
        transaction = f"txn-{(lines // 2) // 4:08d}"
        result = subprocess.run(  # noqa: S603 - this very script, in a fresh process
            [sys.executable, __file__, "--child", str(path), transaction],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        if result.returncode != 0:
            raise RuntimeError(f"the console process failed:\n{result.stderr}")
        figures: dict[str, Any] = json.loads(result.stdout)
        figures.update({"lines": lines, "file_mib": round(path.stat().st_size / (1 << 20), 1)})
    figures["open_within_budget"] = figures["open_s"] < OPEN_BUDGET_S
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines in the audit log (default 1,000,000)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--child", nargs=2, metavar=("LOG", "TRANSACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    figures = measure(args.lines)
    for name, value in figures.items():
        print(f"{name:>20}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["open_within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
