"""Gateway overhead on loopback: requests straight to an upstream vs. through the gateway, same run.

Run: python benchmarks/bench_gateway.py [--requests 2000] [--concurrency 16] [--json]

Starts processes on free loopback ports: a trivial upstream app and a plain
proxy under uvicorn (h11), and ``python -m meshauth.gateway`` (its own h11
server) in front of the upstream, then drives them from this process with a
raw-socket keep-alive load generator (one connection per request in flight;
httpx's connection pool would be the bottleneck at 50 connections):

1. latency: sequential requests (concurrency 1), alternating direct and
   through-gateway in small rounds, so both see the same machine state; the
   gateway's added p50 is ``p50(gateway) - p50(direct)`` (budget: at most 1 ms);
2. paced: one connection at 100 requests/second, for the added p99 (budget: at most 5 ms);
3. throughput: ``--requests`` requests with ``--concurrency`` in flight, again
   in alternating rounds; requests/second, p50 and p99 for each target (budget:
   the gateway serves at least 0.25x what the upstream serves directly).

A third target, a plain httpx pass-through proxy with no authentication (in
this file), shows what any extra Python proxy hop costs on the machine, so the
gateway's own share can be told apart from the hop's.

``gateway_rows()`` runs the same measurement, smaller with ``quick=True`` and
without the plain proxy, and returns the DESIGN section 7 rows for
``benchmarks/run.py`` (added p50 and p99, and throughput as the median of the
per-round gateway/direct ratios).

Each gateway request carries an RS256 user token (2048-bit key) that the
gateway verifies, checks against the route policy, turns into a fresh ES256
delegated token and forwards; direct requests carry the same header. The run
is bounded in requests and in time (``--max-seconds``) and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

import meshauth

if __package__:
    from ._harness import Row
else:  # run as a script: benchmarks/ is on sys.path
    from _harness import Row  # type: ignore[no-redef]

BUDGET_MS = 1.0  # added p50 (DESIGN 7)
BUDGET_P99_MS = 5.0  # added p99 at PACED_RATE (DESIGN 7)
BUDGET_THROUGHPUT = 0.25  # gateway / direct requests per second at 50 connections (DESIGN 7)
PACED_RATE = 100.0
ROUNDS = 10


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def plain_proxy_app(upstream: str) -> Any:
    """The floor: an httpx-based pass-through proxy with no authentication at all."""
    clients: list[httpx.AsyncClient] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not clients:
            clients.append(httpx.AsyncClient(trust_env=False))
        client = clients[0]
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"connection")]
        request = client.build_request(scope["method"], upstream + scope["path"], headers=headers)
        response = await client.send(request, stream=True)
        hop = (b"connection", b"transfer-encoding", b"keep-alive")
        out = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in hop]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await response.aclose()

    return app


def serve(port: int, upstream: str | None) -> None:
    import uvicorn  # noqa: PLC0415 - only the server processes need it

    app = plain_proxy_app(upstream) if upstream else upstream_app
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {deadline_s} s")


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(  # noqa: S603 - this interpreter running this script or the package
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


@contextmanager
def processes(directory: Path, *, proxy: bool = True) -> Iterator[tuple[dict[str, str], str]]:
    """Start upstream, plain proxy (unless ``proxy=False``) and gateway; yield ({target: URL}, user token)."""
    upstream_port, proxy_port, gateway_port = free_port(), free_port(), free_port()
    gateway_key = meshauth.SigningKey.generate()
    (directory / "gateway.pem").write_bytes(gateway_key.to_pem())
    (directory / "registry.json").write_text(json.dumps({"keys": [gateway_key.public_jwk(iss="gateway")]}))
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True), "kid": "idp-1"}
    (directory / "idp-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (directory / "gateway.toml").write_text(
        f"""
listen = "127.0.0.1:{gateway_port}"
service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"
audit_log = "audit.jsonl"

[[issuers]]
issuer = "https://idp.example.com"
jwks = "idp-jwks.json"
audience = "api-gateway"
algorithms = ["RS256"]

[[routes]]
prefix = "/bench"
upstream = "http://127.0.0.1:{upstream_port}"
service = "orders"
groups = ["staff"]
scopes = ["orders:read"]
"""
    )
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://idp.example.com",
            "sub": "alice",
            "aud": "api-gateway",
            "iat": now,
            "exp": now + 3600,
            "groups": ["staff"],
            "scope": "orders:read",
        },
        idp_key,
        algorithm="RS256",
        headers={"kid": "idp-1"},
    )
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    started = {
        "upstream": _start([sys.executable, __file__, "--serve", str(upstream_port)], directory / "upstream.log"),
        "gateway": _start(
            [sys.executable, "-m", "meshauth.gateway", "--config", str(directory / "gateway.toml")],
            directory / "gateway.log",
        ),
    }
    if proxy:
        started["proxy"] = _start(
            [sys.executable, __file__, "--serve", str(proxy_port), "--upstream", upstream_url], directory / "proxy.log"
        )
    try:
        wait_until_up(f"{upstream_url}/", started["upstream"])
        wait_until_up(f"http://127.0.0.1:{gateway_port}/readyz", started["gateway"])
        targets = {"direct": f"{upstream_url}/bench/item"}
        if proxy:
            wait_until_up(f"http://127.0.0.1:{proxy_port}/", started["proxy"])
            targets["proxy"] = f"http://127.0.0.1:{proxy_port}/bench/item"
        targets["gateway"] = f"http://127.0.0.1:{gateway_port}/bench/item"
        yield targets, token
    finally:
        for process in started.values():
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class _Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: raw bytes, minimal parsing.

    httpx would be the bottleneck at 50 connections (its pool checks every
    connection on every request), measuring the client rather than the servers.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> _Connection:
        parsed = httpx.URL(url)
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        lines = [f"GET {parsed.raw_path.decode()} HTTP/1.1", f"Host: {parsed.host}:{parsed.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return cls(reader, writer, ("\r\n".join(lines) + "\r\n\r\n").encode())

    async def get(self) -> tuple[int, bytes]:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lowered = head.lower()
        if b"content-length:" in lowered:
            length = int(lowered.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await self.reader.readexactly(length)
        else:  # chunked: the benchmark's bodies are one small chunk
            body = await self.reader.readuntil(b"0\r\n\r\n")
        return status, body

    def close(self) -> None:
        self.writer.close()


async def drive(
    url: str, headers: dict[str, str], count: int, concurrency: int, rate: float | None = None
) -> tuple[list[float], float]:
    """``count`` GETs over ``concurrency`` keep-alive connections (at most ``rate`` per second each, if set).

    Returns the per-request latencies (s) and the wall time (s).
    """
    connections = [await _Connection.open(url, headers) for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = count

    async def worker(connection: _Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            if rate is not None and latencies:  # an open-loop pace: the next start is 1/rate after the last
                await asyncio.sleep(max(0.0, 1 / rate - latencies[-1]))
            started = time.perf_counter()
            status, body = await connection.get()
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status}: {body[:200]!r}")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(connection) for connection in connections))
    finally:
        for connection in connections:
            connection.close()
    return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(targets: dict[str, str], token: str, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    results: dict[str, Any] = {}
    deadline = time.monotonic() + args.max_seconds
    rounds = getattr(args, "rounds", ROUNDS)
    for url in targets.values():  # warm-up: connections, caches
        await drive(url, headers, 200, min(args.concurrency, 8))
    for phase, count, concurrency, rate in (
        ("latency", args.latency_requests, 1, None),
        ("paced", args.paced_requests, 1, PACED_RATE),
        ("throughput", args.requests, args.concurrency, None),
    ):
        samples: dict[str, list[float]] = {name: [] for name in targets}
        walls = dict.fromkeys(targets, 0.0)
        ratios: list[float] = []  # gateway / direct requests per second, within each round
        per_round = max(1, count // rounds)
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            rps: dict[str, float] = {}
            for name, url in targets.items():
                latencies, wall = await drive(url, headers, per_round, concurrency, rate)
                samples[name] += latencies
                walls[name] += wall
                rps[name] = len(latencies) / wall
            ratios.append(rps["gateway"] / rps["direct"])
        block: dict[str, Any] = {
            name: {
                "requests": len(samples[name]),
                "rps": len(samples[name]) / walls[name] if walls[name] else 0.0,
                "p50_ms": percentile(samples[name], 0.50) * 1000,
                "p99_ms": percentile(samples[name], 0.99) * 1000,
                "mean_ms": statistics.fmean(samples[name]) * 1000,
            }
            for name in samples
        }
        block["added_p50_ms"] = block["gateway"]["p50_ms"] - block["direct"]["p50_ms"]
        block["added_p99_ms"] = block["gateway"]["p99_ms"] - block["direct"]["p99_ms"]
        if "proxy" in block:
            block["proxy_added_p50_ms"] = block["proxy"]["p50_ms"] - block["direct"]["p50_ms"]
        block["rps_ratio"] = statistics.median(ratios)
        block["rounds"] = len(ratios)
        block["concurrency"] = concurrency
        results[phase] = block
    return results


def _added_row(section: str, operation: str, phase: dict[str, Any], quantile: str, budget: float) -> Row:
    """A latency budget row: the ``quantile`` (p50/p99) the gateway adds over a direct call in ``phase``."""
    direct, gateway = phase["direct"], phase["gateway"]
    return Row(
        section,
        operation,
        median_us=gateway[f"{quantile}_ms"] * 1000,
        ratio=round(phase[f"added_{quantile}_ms"], 3),
        baseline="ms over a direct call",
        budget=budget,
        unit=" ms",
        note=f"{quantile} direct {direct[f'{quantile}_ms']:.2f} ms, through the gateway "
        f"{gateway[f'{quantile}_ms']:.2f} ms ({gateway['requests']} requests each)",
    )


def gateway_rows(*, quick: bool = False) -> list[Row]:
    """The DESIGN section 7 gateway rows, for ``benchmarks/run.py`` (about 15 s with ``quick``)."""
    args = argparse.Namespace(
        requests=2000 if quick else 3000,
        latency_requests=300 if quick else 1000,
        paced_requests=300,
        concurrency=50,
        max_seconds=45.0 if quick else 120.0,
        rounds=5 if quick else ROUNDS,
    )
    with tempfile.TemporaryDirectory() as tmp, processes(Path(tmp), proxy=False) as (targets, token):
        results = asyncio.run(measure(targets, token, args))
    section = "Gateway on loopback, one worker (DESIGN 7 rows 9 and 10)"
    latency, paced, throughput = results["latency"], results["paced"], results["throughput"]
    return [
        _added_row(section, "gateway added latency, p50, one connection (ms)", latency, "p50", BUDGET_MS),
        _added_row(section, f"gateway added latency, p99 at {PACED_RATE:g} req/s (ms)", paced, "p99", BUDGET_P99_MS),
        Row(
            section,
            f"gateway throughput, {throughput['concurrency']} connections",
            median_us=1e6 / throughput["gateway"]["rps"],
            ratio=round(throughput["rps_ratio"], 3),
            baseline="a plain uvicorn app",
            budget=BUDGET_THROUGHPUT,
            compare=">=",
            note=f"req/s direct {throughput['direct']['rps']:,.0f}, through the gateway "
            f"{throughput['gateway']['rps']:,.0f}; ratio: median over {throughput['rounds']} rounds",
        ),
    ]


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "httpx": httpx.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="throughput phase, per target")
    parser.add_argument("--latency-requests", type=int, default=1000, help="latency phase, per target")
    parser.add_argument(
        "--paced-requests", type=int, default=300, help=f"paced phase ({PACED_RATE:g} req/s), per target"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new rounds after this")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.upstream)
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, processes(Path(tmp)) as (targets, token):
        results = asyncio.run(measure(targets, token, args))
    results["machine"] = {**machine(), "load_average_before": load_before}
    results["budget_added_p50_ms"] = BUDGET_MS
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        info = results["machine"]
        print(f"machine: {info['cpu']} x{info['cpus']}, Python {info['python']}, load {load_before:.2f} before the run")
        for phase in ("latency", "paced", "throughput"):
            block = results[phase]
            print(f"\n{phase} (concurrency {block['concurrency']})")
            print(f"  {'target':<8} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for name in ("direct", "proxy", "gateway"):
                row = block[name]
                print(
                    f"  {name:<8} {row['requests']:>8} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}"
                )
            print(
                f"  added p50 vs direct: gateway {block['added_p50_ms']:.2f} ms, "
                f"plain proxy {block['proxy_added_p50_ms']:.2f} ms; gateway added p99 {block['added_p99_ms']:.2f} ms"
            )
            if phase == "throughput":
                print(
                    f"  gateway / direct req/s: {block['rps_ratio']:.3f} (median of {block['rounds']} per-round ratios)"
                )
    added = results["latency"]["added_p50_ms"]
    verdict = "within" if added < BUDGET_MS else "OVER"
    print(f"\nadded p50 at concurrency 1: {added:.2f} ms ({verdict} the {BUDGET_MS:g} ms budget)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
