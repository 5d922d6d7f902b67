"""benchmarks/bench_redis.py runs end to end in a tiny mode (a smoke test: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'meshauth[redis]')")
    spec = importlib.util.spec_from_file_location("bench_redis", ROOT / "benchmarks" / "bench_redis.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_redis"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_redis_reports_every_figure(redis_namespace: tuple[str, str]) -> None:
    bench = _bench()
    url, _ = redis_namespace
    figures = {
        **bench.bench_hot_path(url, verifications=50),
        **bench.bench_revocation(url, verifiers=2, revocations=2),
        **bench.bench_rotation(url, seconds=1.0, rate=20, rotate_every=0.6),
        **bench.bench_cold_load(url, services=50),
    }
    assert figures["hot_path_commands_per_verification"] < 1
    assert figures["verifier_processes"] == 2 and figures["revocations"] == 2
    assert 0 <= figures["revocation_all_p50_s"] <= figures["revocation_all_p99_s"] < 5
    assert figures["rotation_requests"] > 0 and figures["rotation_failed_requests"] == 0
    assert figures["cold_load_keys"] == 50 and figures["cold_load_s"] > 0
    rows = bench._report(figures)
    assert [ok for *_, ok in rows] == [True, True, True, True]
