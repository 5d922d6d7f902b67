"""The benchmark harness runs end to end and reports every DESIGN section 7 row.

A smoke test, not a timing test: it runs ``benchmarks/run.py --quick`` with two
rounds and checks the shape of the JSON report (every row present, numbers and
ratios for every row: nothing may be "n/a"). Whether a budget is met depends on
the machine and is never asserted here; ``--check`` is tested on a row that
cannot be measured, which must fail it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"

# Operations (prefixes) that must appear in every report, whatever is installed.
EXPECTED = [
    "cryptography ES256 verify",
    "meshauth verify, new token",
    "meshauth verify, new token, cache_size=0",
    "meshauth verify, cached token",
    "PyJWT jwt.decode",
    "joserfc jwt.decode",
    "verify, new token: default telemetry / none",
    "verify, cached token: default telemetry / none",
    "cryptography ES256 sign",
    "ServiceIdentity.token_for, cached",
    "ServiceIdentity.token_for, fresh",
    "ServiceIdentity.mint",
    "PyJWT jwt.encode",
    "cryptography Ed25519 verify",
    "meshauth verify, new EdDSA token",
    "ServiceAuth: sync_auth_flow(request)",
    "ServiceAuth: Client.get, MockTransport",
    "MeshAuthMiddleware(verifier), cached token",
    "meshauth verify, new token, cache full",
    "PyJWKSet.from_dict",
    "JWKSEndpoint's load: load_keys",
    "KeySet.from_jwks(doc, lazy=True)",
    "PyJWKClient cold",
    "JWKSEndpoint cold",
    "KeySet.get, 10,000 keys",
    "JWKSEndpoint.get_key, 10,000 keys",
    "PyJWKClient.get_signing_key",
    "50 threads verify at once: registry fetches",
    "50 threads verify at once: verifications that failed",
]
# The budget rows (DESIGN section 7, and the telemetry target): operation prefix -> budget.
BUDGETS = {
    "meshauth verify, new token": 1.20,
    "meshauth verify, cached token": 0.02,
    "verify, new service token + new Txn-Token": 2.3,
    "ServiceIdentity.token_for, cached": 0.05,
    "ServiceAuth: sync_auth_flow(request)": 2.0,
    "MeshAuthMiddleware(verifier), cached token: us added per request": 10.0,
    "verify, new token: default telemetry / none": 1.05,  # the telemetry target
    "JWKSEndpoint's load: load_keys": 0.1,
    "KeySet.get, 10,000 keys": 2.0,
    "JWKSEndpoint.get_key, 10,000 keys": 2.0,
    "50 threads verify at once: registry fetches": 1,
    "50 threads verify at once: verifications that failed": 0,
    "revocation applied by every verifier, p99 (s)": 1.0,
    "gateway added latency, p50, one connection (ms)": 1.0,
    "gateway added latency, p99 at 100 req/s (ms)": 5.0,
    "gateway throughput, 50 connections": 0.25,
}
MISSING = "n/a (module missing)"


def _find(rows: list[dict[str, object]], prefix: str) -> dict[str, object]:
    matches = [row for row in rows if str(row["operation"]).startswith(prefix)]
    assert matches, f"no row for {prefix!r}"
    # Several names may share a prefix ("..., new token" and "..., new token,
    # cache full"): the shortest is the row meant.
    return min(matches, key=lambda row: len(str(row["operation"])))


def _load_harness() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("meshauth_benchmarks_harness", RUN.parent / "_harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    result = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--rounds", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "median us" in result.stdout
    loaded: dict[str, object] = json.loads(out.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.slow
def test_machine_is_described(report: dict[str, object]) -> None:
    machine = report["machine"]
    assert isinstance(machine, dict)
    assert machine["cpu"] and machine["cores"]
    assert set(machine["versions"]) >= {"meshauth", "cryptography", "PyJWT", "httpx"}


@pytest.mark.slow
def test_every_row_is_reported(report: dict[str, object]) -> None:
    rows = report["rows"]
    assert isinstance(rows, list)
    for prefix in EXPECTED:
        row = _find(rows, prefix)
        assert not str(row["note"]).startswith("n/a"), row  # every part is built: nothing may go unmeasured
        if prefix.startswith("joserfc"):
            continue  # an optional peer
        assert row["ratio"] is not None and float(row["ratio"]) >= 0, row  # type: ignore[arg-type]
        if not prefix.startswith("50 threads"):
            assert float(row["median_us"]) > 0, row  # type: ignore[arg-type]
            assert float(row["min_us"]) <= float(row["median_us"]), row  # type: ignore[arg-type]


@pytest.mark.slow
def test_budget_rows_carry_the_design_budgets(report: dict[str, object]) -> None:
    rows = report["rows"]
    assert isinstance(rows, list)
    for prefix, budget in BUDGETS.items():
        row = _find(rows, prefix)
        assert row["budget"] == budget, row
        assert row["result"] in {"PASS", "FAIL"}, row
    counts = report["budgets"]
    assert isinstance(counts, dict)
    assert counts["total"] == len(BUDGETS) == sum(1 for row in rows if row["budget"] is not None)
    assert counts["unmeasured"] == 0
    # Every DESIGN section 7 row is measured: none is left pending.
    assert counts["pending"] == []
    throughput = _find(rows, "gateway throughput")
    assert throughput["compare"] == ">=" and float(throughput["ratio"]) > 0, throughput  # type: ignore[arg-type]


def test_budget_verdicts() -> None:
    """The PASS/FAIL logic behind ``--check`` and ``--margin`` (no timing involved)."""
    harness = _load_harness()
    Row, format_table = harness.Row, harness.format_table
    over = Row("s", "op", 2.0, 1.0, 1.5, "base", budget=1.25)
    under = Row("s", "op", 2.0, 1.0, 1.2, "base", budget=1.25)
    count = Row("s", "fetches", ratio=2.0, budget=1, compare="==")
    assert over.passed() is False and under.passed() is True and count.passed() is False
    assert over.passed(margin=1.5) is True  # a generous CI margin
    floor = Row("s", "throughput", ratio=0.22, budget=0.25, compare=">=")
    assert floor.passed() is False and floor.passed(margin=1.3) is True  # a floor is divided by the margin
    assert Row("s", "throughput", ratio=0.3, budget=0.25, compare=">=").passed() is True
    assert Row("s", "info", 1.0, 1.0, 9.0, "base").passed() is None
    broken = Row("s", "op", budget=0.1, error="TypeError: a module under construction")
    assert broken.passed() is False and broken.result() == "ERROR"  # a raising measurement fails --check
    assert Row("s", "op", budget=0.1, note="n/a (module missing)").result() == "n/a"
    table = format_table([over, under, count, broken])
    assert "FAIL" in table and "PASS" in table and "error: TypeError" in table


def test_check_fails_on_a_row_that_cannot_be_measured() -> None:
    harness = _load_harness()
    sys.path.insert(0, str(RUN.parent))
    try:
        spec = importlib.util.spec_from_file_location("meshauth_benchmarks_run", RUN)
        assert spec is not None and spec.loader is not None
        run = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = run
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(RUN.parent))
    Row = harness.Row
    met = Row("s", "op", 2.0, 1.0, 1.1, "base", budget=1.2)
    missing = Row("s", "renamed module", budget=0.1, note=MISSING)
    info = Row("s", "no budget", 1.0, 1.0, 9.0, "base")
    broken = Row("s", "raised", error="TypeError")
    assert [row.operation for row in run.failures([met, missing, info, broken], 1.0)] == ["renamed module", "raised"]
    assert run.failures([met, info], 1.0) == []
