"""Timing helpers for the meshauth benchmarks: interleaved rounds, medians, ratios.

A shared machine (a 2-core CI runner, a laptop with a browser open) drifts by
tens of percent within seconds, so absolute timings taken minutes apart say
little. Operations that are compared are therefore measured *together*: each
round times one batch of every operation of a group, back to back and in a
rotating order, and a ratio is computed per round (A/B of the same round)
before taking the median over rounds. Each batch runs with the garbage
collector off, so a collection triggered by one operation is not billed to
another.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any

from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from opentelemetry import trace

__all__ = [
    "Operation",
    "Row",
    "Samples",
    "describe",
    "format_table",
    "interleave",
    "machine_description",
    "markdown_report",
    "ratio",
    "time_batch",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """One measured operation.

    ``run()`` performs the operation exactly ``calls`` times (a tight loop
    written by the caller, so the loop costs the same on both sides of a
    comparison); ``setup()``, when given, runs untimed before every batch.
    """

    name: str
    run: Callable[[], object]
    calls: int
    setup: Callable[[], object] | None = None


def time_batch(op: Operation) -> float:
    """Nanoseconds per call for one batch of ``op``, garbage collector off."""
    if op.setup is not None:
        op.setup()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        op.run()
        elapsed = time.perf_counter_ns() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed / op.calls


@dataclasses.dataclass(frozen=True, slots=True)
class Samples:
    """Per-round timings (ns per call) of one operation."""

    name: str
    per_call_ns: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_call_ns) / 1000

    @property
    def min_us(self) -> float:
        return min(self.per_call_ns) / 1000


def interleave(ops: Sequence[Operation], rounds: int, *, warmup: int = 1) -> dict[str, Samples]:
    """Time every operation once per round, rotating which one goes first.

    ``warmup`` untimed rounds come first (caches, lazily built keys, the
    verified-token cache of the cached paths, CPU frequency ramp-up).
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for _ in range(warmup):
        for op in ops:
            time_batch(op)
    gc.collect()
    samples: dict[str, list[float]] = {op.name: [] for op in ops}
    for index in range(rounds):
        shift = index % len(ops)
        for op in (*ops[shift:], *ops[:shift]):
            samples[op.name].append(time_batch(op))
    return {name: Samples(name, tuple(values)) for name, values in samples.items()}


def ratio(numerator: Samples, denominator: Samples) -> float:
    """Median over rounds of ``numerator / denominator`` taken within each round."""
    return statistics.median(a / b for a, b in zip(numerator.per_call_ns, denominator.per_call_ns, strict=True))


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table.

    ``ratio`` is relative to ``baseline`` (or, for a count row, the count
    itself). ``budget`` is the DESIGN section 7 limit on ``ratio`` (``None``:
    reported only); ``compare`` is ``"<="``, ``">="`` (a floor, such as a
    throughput ratio) or ``"=="``. A row whose module
    does not exist yet has no numbers and says so in ``note``; a row whose
    code raised has no numbers and an ``error`` (a failed budget).
    """

    section: str
    operation: str
    median_us: float | None = None
    min_us: float | None = None
    ratio: float | None = None
    baseline: str = ""
    budget: float | None = None
    compare: str = "<="
    unit: str = "x"  # what ratio and budget count: "x" a ratio, " us" an absolute time
    note: str = ""
    error: str = ""

    def passed(self, margin: float = 1.0) -> bool | None:
        """``True``/``False`` against the budget (times ``margin``); ``None`` when not checked."""
        if self.budget is None:
            return None
        if self.error:
            return False
        if self.ratio is None:
            return None
        if self.compare == "==":
            return self.ratio == self.budget
        if self.compare == ">=":
            return self.ratio >= self.budget / margin
        return self.ratio <= self.budget * margin

    def result(self, margin: float = 1.0) -> str:
        if self.error:
            return "ERROR"
        verdict = self.passed(margin)
        if verdict is None:
            return "n/a" if self.budget is not None else ""
        return "PASS" if verdict else "FAIL"

    def as_dict(self, margin: float = 1.0) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["result"] = self.result(margin)
        return data


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.1f} ms"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _fmt_ratio(row: Row) -> str:
    if row.ratio is None:
        return "-"
    if row.compare == "==":
        return f"{row.ratio:g}"
    if row.ratio >= 1000:
        return f"{row.ratio:,.0f}{row.unit}"
    return f"{row.ratio:.3f}{row.unit}" if row.ratio < 1 else f"{row.ratio:.2f}{row.unit}"


def _fmt_budget(row: Row, margin: float) -> str:
    if row.budget is None:
        return ""
    if row.compare == "==":
        return f"== {row.budget:g}"
    if row.compare == ">=":
        text = f">= {row.budget:g}{row.unit}"
        return text if margin == 1.0 else f"{text} (/{margin:g})"
    text = f"<= {row.budget:g}{row.unit}"
    return text if margin == 1.0 else f"{text} (*{margin:g})"


def format_table(rows: Iterable[Row], margin: float = 1.0) -> str:
    """A plain-text table: operation, median and min us per call, ratio, budget, result."""
    lines: list[str] = []
    header = f"{'operation':<58} {'median us':>10} {'min us':>10} {'ratio':>9}  {'vs':<22} {'budget':<10} result"
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.extend(["", f"== {section} ==", header])
        lines.append(
            f"{row.operation:<58} {_fmt_us(row.median_us):>10} {_fmt_us(row.min_us):>10} {_fmt_ratio(row):>9}  "
            f"{row.baseline:<22} {_fmt_budget(row, margin):<10} {row.result(margin)}"
        )
        if row.note:
            lines.append(f"    {row.note}")
        if row.error:
            lines.append(f"    error: {row.error}")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, Any]:
    """CPU, cores, load, Python, OpenSSL and library versions: the header of every run."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    try:
        openssl = openssl_backend.openssl_version_text()
    except Exception:  # a cryptography build without the OpenSSL backend object
        openssl = "unknown"
    provider = type(trace.get_tracer_provider()).__name__
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "openssl": openssl,
        "tracer_provider": provider,
        "versions": {
            name: _version(name)
            for name in ("meshauth", "cryptography", "PyJWT", "joserfc", "httpx", "opentelemetry-api")
        },
    }


def describe(machine: dict[str, Any]) -> str:
    """The machine header as text."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return "\n".join(
        [
            f"CPU: {machine['cpu']} ({machine['cores']} cores, {machine['usable_cores']} usable), "
            f"load average {machine['load_average']}",
            f"{machine['python']} on {machine['platform']}, {machine['openssl']}",
            f"{versions}; tracer provider: {machine['tracer_provider']} (no OpenTelemetry SDK configured)"
            if machine["tracer_provider"].startswith(("Proxy", "NoOp"))
            else f"{versions}; tracer provider: {machine['tracer_provider']}",
        ]
    )


def _md_cell(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "ERROR"
    if row["ratio"] is None:
        return row["note"] if row["note"].startswith("n/a") else "-"
    if row["compare"] == "==":
        text = f"{row['ratio']:g}"
    else:
        median = row["median_us"]
        shown = f"{median / 1000:,.1f} ms" if median >= 10_000 else f"{_fmt_us(median)} us"
        text = f"{_fmt_ratio(Row(**{k: row[k] for k in _ROW_FIELDS if k in row}))} ({shown})"
    return f"{text} {row['result']}" if row["result"] in ("PASS", "FAIL") else text


_ROW_FIELDS = tuple(field.name for field in dataclasses.fields(Row))


def markdown_report(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of several saved runs (``--json`` files), one column per run."""
    runs = [{(r["section"], r["operation"]): r for r in result["rows"]} for result in results]
    order = list(runs[0])
    for other in runs[1:]:
        order += [key for key in other if key not in order]
    head = "| operation | vs | budget | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " |"
    lines = [head, "|" + "---|" * (3 + len(runs))]
    section = None
    for key in order:
        if key[0] != section:
            section = key[0]
            lines.append(f"| **{section}** |" + " |" * (2 + len(runs)))
        first = next(run[key] for run in runs if key in run)
        budget = ""
        if first["budget"] is not None:
            unit = first.get("unit", "x")
            budget = (
                f"== {first['budget']:g}"
                if first["compare"] == "=="
                else f"{first['compare']} {first['budget']:g}{unit}"
            )
        cells = [_md_cell(run[key]) if key in run else "-" for run in runs]
        lines.append(f"| {key[1]} | {first['baseline']} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
