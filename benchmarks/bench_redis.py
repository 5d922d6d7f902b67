"""The Redis registry (DESIGN sections 7 and 10), measured with real processes against a real Redis.

Run from the repository root (a Redis server on 127.0.0.1:6379, ``pip install -e '.[redis]'``)::

    python benchmarks/bench_redis.py                # full run (about a minute)
    python benchmarks/bench_redis.py --check        # exit 1 if a budget is missed
    python benchmarks/bench_redis.py --redis redis://host:6379/0 --json out.json

* revocation: 8 verifier processes follow the registry (``RedisKeys``); a key is published, every
  verifier holds it, then it is revoked. Per revocation, the time from calling ``revoke`` until all
  8 processes have dropped the key; p50 and p99 over 20 revocations. Budget p99 <= 1 s, goal 100 ms.
* rotation: a payments process verifies with ``RedisKeys``; this process calls it at 100 requests/s
  through ``ServiceAuth`` with an ``ephemeral`` identity rotating every 3 s. Budget: 0 failed requests.
* cold load: 10,000 services, one key each, loaded by ``RedisKeys`` in a fresh process: time and
  memory (traced Python allocations of the loaded registry).
* hot path: Redis commands per verification (the server's command counter around 1,000 verifications).

``measure()`` returns the figures as a dict, for benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import redis

import meshauth
from meshauth._redis_common import Namespace
from meshauth.redis import RedisKeys, RedisPublisher

DEFAULT_URL = "redis://127.0.0.1:6379/0"
HERE = os.path.abspath(__file__)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _drop(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=5000))
    for start in range(0, len(keys), 5000):
        client.delete(*keys[start : start + 5000])
    client.close()


# -- child processes --------------------------------------------------------------------------


def _verifier_process(url: str, namespace: str) -> None:
    """Follow the registry; for each ``KID`` line on stdin: wait for it, say ready, time its removal."""
    keys = RedisKeys(url, namespace)
    print("up", flush=True)
    for line in sys.stdin:
        kid = line.strip()
        while keys.keyset.get(kid) is None:
            time.sleep(0.001)
        print("holding", flush=True)
        while keys.keyset.get(kid) is not None:
            time.sleep(0.001)
        print(f"{time.time():.6f}", flush=True)
    keys.close()


def _payments_process(url: str, namespace: str) -> None:
    """A payments service on loopback that verifies each request's token with RedisKeys."""
    verifier = meshauth.Verifier("payments", RedisKeys(url, namespace))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            try:
                verifier.verify(token, audit=False)
                status, body = 200, b"ok"
            except meshauth.TokenError as exc:
                status, body = 401, exc.reason.encode()
                self.server.rejections.append(exc.reason)  # type: ignore[attr-defined]
            self.send_response(status)
            if status == 401:
                self.send_header(
                    "WWW-Authenticate", f'Bearer error="invalid_token", error_description="{body.decode()}"'
                )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.rejections = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.readline()  # until told to stop
    print(json.dumps(server.rejections), flush=True)  # type: ignore[attr-defined]


def _cold_load_process(url: str, namespace: str) -> None:
    started = time.perf_counter()
    keys = RedisKeys(url, namespace, follow=False, startup_timeout=60, timeout=30)
    elapsed = time.perf_counter() - started
    keys.close()
    # Memory from a second load with allocation tracing on (tracing slows the load: not timed).
    tracemalloc.start()
    traced = RedisKeys(url, namespace, follow=False, startup_timeout=60, timeout=30)
    current, peak = tracemalloc.get_traced_memory()
    print(json.dumps({"seconds": elapsed, "keys": len(traced), "memory_bytes": current, "peak_bytes": peak}))
    traced.close()


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - this very script, in another role
        [sys.executable, HERE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )


# -- measurements -----------------------------------------------------------------------------


def bench_revocation(url: str, verifiers: int = 8, revocations: int = 20) -> dict[str, float]:
    """Seconds from ``revoke`` until every verifier process dropped the key: p50/p99 over revocations."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    publisher = RedisPublisher(url, namespace)
    children = [_child("--verifier", url, namespace) for _ in range(verifiers)]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "up"
        all_applied: list[float] = []
        each: list[float] = []
        for _ in range(revocations):
            key = meshauth.SigningKey.generate()
            now = int(time.time())
            publisher.publish(key.record("orders", not_before=now, expires=now + 600))
            for child in children:
                assert child.stdin is not None
                child.stdin.write(key.kid + "\n")
            for child in children:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "holding"
            started = time.time()
            publisher.revoke(key.kid)
            applied = [float(child.stdout.readline()) - started for child in children if child.stdout]
            each.extend(applied)
            all_applied.append(max(applied))
            time.sleep(0.05)
    finally:
        for child in children:
            child.communicate(timeout=30)
        _drop(url, namespace)
    return {
        "revocation_all_p50_s": statistics.median(all_applied),
        "revocation_all_p99_s": _percentile(all_applied, 0.99),
        "revocation_each_p50_s": statistics.median(each),
        "revocation_each_p99_s": _percentile(each, 0.99),
        "revocations": revocations,
        "verifier_processes": verifiers,
    }


def bench_rotation(url: str, seconds: float = 20.0, rate: float = 100.0, rotate_every: float = 3.0) -> dict[str, Any]:
    """Requests at ``rate``/s while the caller's key rotates every ``rotate_every`` s: failures counted."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    payments = _child("--payments", url, namespace)
    me = None
    try:
        assert payments.stdout is not None
        assert payments.stdin is not None
        port = int(payments.stdout.readline())
        me = meshauth.ServiceIdentity.ephemeral(
            "orders", RedisPublisher(url, namespace), ttl=10, key_ttl=30, rotate_every=rotate_every,
            propagation=0.5, leeway=5, check_every=0.1,
        )  # fmt: skip
        kids = {me.key.kid}
        statuses: dict[int, int] = {}
        sent = 0
        with httpx.Client(auth=meshauth.ServiceAuth(me, audience="payments"), timeout=5) as client:
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                status = client.get(f"http://127.0.0.1:{port}/charges").status_code
                statuses[status] = statuses.get(status, 0) + 1
                kids.add(me.key.kid)
                sent += 1
                time.sleep(max(0.0, sent / rate - (time.monotonic() - started)))
        payments.stdin.write("stop\n")
        rejections = json.loads(payments.stdout.readline())
    finally:
        if me is not None:
            me.close()
        payments.communicate(timeout=30)
        _drop(url, namespace)
    failed = sum(count for status, count in statuses.items() if status != 200)
    return {
        "rotation_requests": sent,
        "rotation_rate_per_s": sent / elapsed,
        "rotation_keys_used": len(kids),
        "rotation_failed_requests": failed,
        "rotation_server_rejections": len(rejections),
    }


def bench_cold_load(url: str, services: int = 10_000) -> dict[str, float]:
    """``RedisKeys`` start-up over ``services`` services with one key each, in a fresh process."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ns = Namespace(namespace)
    client = redis.Redis.from_url(url)
    now = int(time.time())
    try:
        pipe = client.pipeline(transaction=False)
        for n in range(services):
            name = f"service-{n:05d}"
            jwk = meshauth.SigningKey.generate("ES256" if n % 2 else "EdDSA").public_jwk(name, nbf=now, exp=now + 3600)
            pipe.hset(ns.keys(name), jwk["kid"], json.dumps(jwk, separators=(",", ":")))
            pipe.sadd(ns.services, name)
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        loader = _child("--cold-load", url, namespace)
        out, _ = loader.communicate(timeout=300)
        figures = json.loads(out)
    finally:
        _drop(url, namespace)
        client.close()
    return {
        "cold_load_services": services,
        "cold_load_keys": figures["keys"],
        "cold_load_s": figures["seconds"],
        "cold_load_memory_mb": figures["memory_bytes"] / 1e6,
        "cold_load_peak_mb": figures["peak_bytes"] / 1e6,
    }


def bench_hot_path(url: str, verifications: int = 1000) -> dict[str, float]:
    """Redis commands the server processed around ``verifications`` verifications (INFO itself is one)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    key = meshauth.SigningKey.generate()
    now = int(time.time())
    RedisPublisher(url, namespace).publish(key.record("orders", not_before=now, expires=now + 600))
    keys = RedisKeys(url, namespace, follow=False)
    verifier = meshauth.Verifier("payments", keys)
    identity = meshauth.ServiceIdentity("orders", key)
    tokens = [identity.mint("payments") for _ in range(verifications)]
    client = redis.Redis.from_url(url)
    try:
        before = client.info("stats")["total_commands_processed"]
        for token in tokens:
            verifier.verify(token, audit=False)
        after = client.info("stats")["total_commands_processed"]
    finally:
        keys.close()
        _drop(url, namespace)
        client.close()
    # On a shared server other clients' commands count too: this is an upper bound.
    return {"hot_path_commands_per_verification": max(0, after - before - 1) / verifications}


def measure(url: str = DEFAULT_URL, *, quick: bool = False) -> dict[str, Any]:
    """Every figure of this benchmark (``quick``: fewer revocations, a shorter rotation, 2,000 services)."""
    figures: dict[str, Any] = {}
    figures.update(bench_hot_path(url))
    figures.update(bench_revocation(url, revocations=5 if quick else 20))
    figures.update(bench_rotation(url, seconds=8 if quick else 20))
    figures.update(bench_cold_load(url, services=2000 if quick else 10_000))
    return figures


def _report(figures: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    p99 = figures["revocation_all_p99_s"]
    return [
        (
            f"revocation applied by {figures['verifier_processes']} verifiers, {figures['revocations']} revocations",
            f"p50 {figures['revocation_all_p50_s'] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms",
            "p99 <= 1 s (goal 100 ms)",
            p99 <= 1.0,
        ),
        (
            f"rotation every 3 s at {figures['rotation_rate_per_s']:.0f} req/s: "
            f"{figures['rotation_requests']} requests, {figures['rotation_keys_used']} keys",
            f"{figures['rotation_failed_requests']} failed ({figures['rotation_server_rejections']} 401s retried)",
            "0 failed",
            figures["rotation_failed_requests"] == 0,
        ),
        (
            f"cold load of {figures['cold_load_services']:,} services' keys",
            f"{figures['cold_load_s']:.2f} s, {figures['cold_load_memory_mb']:.1f} MB",
            "",
            True,
        ),
        (
            "Redis commands per verification (hot path)",
            f"{figures['hot_path_commands_per_verification']:.3f}",
            "0",
            figures["hot_path_commands_per_verification"] < 0.01,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=DEFAULT_URL)
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--check", action="store_true", help="exit 1 if a budget is missed")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--verifier", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--payments", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--cold-load", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for role, run in (
        ("verifier", _verifier_process),
        ("payments", _payments_process),
        ("cold_load", _cold_load_process),
    ):
        if getattr(args, role):
            run(*getattr(args, role))
            return 0
    figures = measure(args.redis, quick=args.quick)
    rows = _report(figures)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, Redis at {args.redis}")
    for what, measured, budget, ok in rows:
        print(f"  {what:<75} {measured:<34} {budget:<26} {'ok' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
    return 1 if args.check and not all(ok for *_, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
