"""JWKSEndpoint budgets (DESIGN section 7): 10,000-key cold load, O(1) lookup, single flight, flood.

Run from the repository root::

    python benchmarks/bench_jwks.py            # full run (about 10 s, most of it generating keys)
    python benchmarks/bench_jwks.py --check    # exit 1 if a budget is missed
    python benchmarks/bench_jwks.py --keys 2000 --rounds 3 --json out.json

Everything is measured in one process, on the same document, in interleaved
rounds (A, B, A, B, ...) with the garbage collector off during each timed call;
ratios are medians of per-round ratios, so machine drift cancels out.

* cold load: ``load_keys(body)`` (what JWKSEndpoint does with the fetched
  bytes; keys are parsed on first use) against PyJWKClient's cold path
  (``json.loads`` + ``PyJWKSet.from_dict`` + ``get_signing_key``) with its
  urllib fetch replaced by the same bytes. Budget <= 0.1x.
* lookup: ``get_key`` of a warm endpoint holding 10,000 keys vs 10 keys
  (budget <= 2x, i.e. O(1)); PyJWKClient's warm lookup shown for reference.
* single flight: 50 threads, then 50 asyncio tasks, verify on a cold
  endpoint served by a slow loopback HTTP server: fetch count (budget 1).
* flood: 1,000 tokens with random kids, then again after the cooldown:
  fetches per cooldown window (budget <= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from meshauth import ServiceIdentity, SigningKey, TokenError, Verifier
from meshauth._jwks_endpoint import JWKSEndpoint
from meshauth._keyset import load_keys
from meshauth.testing import FakeClock

AUDIENCE = "payments"
CONCURRENCY = 50
FLOOD = 1000


# -- the document -----------------------------------------------------------------------------


def build_document(count: int, es256_share: float) -> dict[str, Any]:
    """``count`` distinct public keys: a share of ES256, the rest Ed25519 (cheap to derive)."""
    keys = []
    es256 = round(count * es256_share)
    for index in range(count):
        if index < es256:
            key = SigningKey(ec.generate_private_key(ec.SECP256R1()))
        else:
            key = SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(os.urandom(32)))
        keys.append(key.public_jwk(iss=f"svc-{index % 100}"))
    # Interleave the two kinds, as a real registry would list them.
    keys.sort(key=lambda jwk: jwk["kid"])
    return {"keys": keys}


# -- timing -----------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Seconds for one call, garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def interleaved(ops: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Per-round timings of each operation, in a rotating order; one untimed warm-up round."""
    names = list(ops)
    for name in names:
        ops[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(ops[name]))
    return samples


def per_round_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# -- a slow loopback registry -------------------------------------------------------------------


class Registry:
    """A JWKS server on 127.0.0.1 that counts requests and answers after ``delay`` seconds."""

    def __init__(self, body: bytes, delay: float) -> None:
        self.body = body
        self.delay = delay
        self.requests = 0
        self.lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with registry.lock:
                    registry.requests += 1
                time.sleep(registry.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Cache-Control", "max-age=300")
                self.send_header("Content-Length", str(len(registry.body)))
                self.end_headers()
                self.wfile.write(registry.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def forged_token(kid: str) -> str:
    def enc(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header = enc({"alg": "ES256", "kid": kid, "typ": "meshauth+jwt"})
    payload = enc({"iss": "orders", "sub": "orders", "aud": AUDIENCE, "iat": 1, "exp": 2, "jti": kid})
    return f"{header}.{payload}.{base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b'=').decode()}"


# -- the measurements ---------------------------------------------------------------------------


def bench_cold_load(doc: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    body = json.dumps(doc).encode("utf-8")
    first_kid = doc["keys"][0]["kid"]

    class MockedPyJWKClient(jwt.PyJWKClient):
        """PyJWKClient with the same bytes instead of a urllib request."""

        def fetch_data(self) -> Any:
            data = json.loads(body)
            if self.jwk_set_cache is not None:
                self.jwk_set_cache.put(data)
            return data

    client = httpx.Client(
        transport=httpx.MockTransport(
            lambda request: httpx.Response(
                200, content=body, headers={"Content-Type": "application/jwk-set+json", "Cache-Control": "max-age=300"}
            )
        )
    )
    ops: dict[str, Callable[[], object]] = {
        "pyjwt_client": lambda: MockedPyJWKClient("https://registry.internal/jwks").get_signing_key(first_kid),
        "pyjwkset": lambda: jwt.PyJWKSet.from_dict(json.loads(body)),
        "load_keys": lambda: load_keys(body).get(first_kid),
        "endpoint": lambda: JWKSEndpoint("https://registry.internal/jwks", client=client).get_key(first_kid),
    }
    try:
        s = interleaved(ops, rounds)
    finally:
        client.close()
    size = f"{len(doc['keys']):,} keys, {len(body) / 1e6:.1f} MB"
    return [
        row("cold load", f"PyJWKClient cold get_signing_key ({size})", s["pyjwt_client"], None),
        row(
            "cold load",
            "json.loads + PyJWKSet.from_dict",
            s["pyjwkset"],
            per_round_ratio(s["pyjwkset"], s["pyjwt_client"]),
        ),
        row(
            "cold load",
            "meshauth load_keys(bytes) + first get",
            s["load_keys"],
            per_round_ratio(s["load_keys"], s["pyjwt_client"]),
            budget=0.1,
        ),
        row(
            "cold load",
            "JWKSEndpoint cold get_key (MockTransport)",
            s["endpoint"],
            per_round_ratio(s["endpoint"], s["pyjwt_client"]),
            budget=0.1,
        ),
    ]


def bench_lookup(doc: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    small = {"keys": doc["keys"][:10]}
    endpoints = []
    clients = []
    for document in (small, doc):
        body = json.dumps(document).encode("utf-8")
        client = httpx.Client(
            transport=httpx.MockTransport(
                lambda request, body=body: httpx.Response(
                    200, content=body, headers={"Content-Type": "application/json"}
                )
            )
        )
        clients.append(client)
        endpoints.append(JWKSEndpoint("https://registry.internal/jwks", client=client))
    calls = 20_000
    small_kids = [jwk["kid"] for jwk in small["keys"]] * (calls // 10)
    large_kids = [jwk["kid"] for jwk in doc["keys"][:: max(1, len(doc["keys"]) // 1000)]]
    large_kids = (large_kids * (calls // len(large_kids) + 1))[:calls]
    for endpoint, kids in zip(endpoints, (small_kids, large_kids), strict=True):
        for kid in set(kids):  # parse the looked-up keys once: lookups, not parses, are timed
            endpoint.get_key(kid)

    def lookups(get: Callable[[str], object], kids: list[str]) -> Callable[[], None]:
        def run() -> None:
            for kid in kids:
                get(kid)

        return run

    pyjwt_client = jwt.PyJWKClient("https://registry.invalid/jwks", cache_jwk_set=True, lifespan=3600)
    pyjwt_client.jwk_set_cache.put(jwt.PyJWKSet.from_dict(doc))
    last = doc["keys"][-1]["kid"]
    pyjwt_calls = 20
    ops: dict[str, Callable[[], object]] = {
        "small": lookups(endpoints[0].get_key, small_kids),
        "large": lookups(endpoints[1].get_key, large_kids),
        "pyjwt": lambda: [pyjwt_client.get_signing_key(last) for _ in range(pyjwt_calls)],
    }
    try:
        s = interleaved(ops, rounds * 3)
    finally:
        for client in clients:
            client.close()
    per_call = {name: [t / (pyjwt_calls if name == "pyjwt" else calls) for t in times] for name, times in s.items()}
    return [
        row("kid lookup", "JWKSEndpoint.get_key, 10 keys (warm)", per_call["small"], None),
        row(
            "kid lookup",
            f"JWKSEndpoint.get_key, {len(doc['keys']):,} keys (warm)",
            per_call["large"],
            per_round_ratio(per_call["large"], per_call["small"]),
            budget=2.0,
            note="O(1): one dict lookup at both sizes",
        ),
        row(
            "kid lookup",
            f"PyJWKClient.get_signing_key, {len(doc['keys']):,} keys (warm)",
            per_call["pyjwt"],
            per_round_ratio(per_call["pyjwt"], per_call["small"]),
            note="scans the key list on every call",
        ),
    ]


def bench_single_flight(body: bytes, key: SigningKey) -> list[dict[str, Any]]:
    token = ServiceIdentity("orders", key).mint(AUDIENCE)
    rows = []

    registry = Registry(body, delay=0.05)
    try:
        endpoint = JWKSEndpoint(registry.url)
        verifier = Verifier(AUDIENCE, endpoint)
        barrier = threading.Barrier(CONCURRENCY)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait(30)
                verifier.verify(token)
            except BaseException as exc:  # reported in the table
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        endpoint.close()
        note = f"loopback server, 50 ms per fetch; {len(errors)} verifications failed"
        rows.append(
            row(
                "single flight",
                f"{CONCURRENCY} threads verify, cold cache: fetches",
                None,
                registry.requests,
                budget=1,
                compare="==",
                note=note,
            )
        )
    finally:
        registry.close()

    registry = Registry(body, delay=0.05)
    try:
        endpoint = JWKSEndpoint(registry.url)
        verifier = Verifier(AUDIENCE, endpoint)

        async def main() -> int:
            results = await asyncio.gather(
                *(verifier.averify(token) for _ in range(CONCURRENCY)), return_exceptions=True
            )
            return sum(1 for r in results if isinstance(r, BaseException))

        failed = asyncio.run(main())
        note = f"httpx.AsyncClient, loopback server; {failed} verifications failed"
        rows.append(
            row(
                "single flight",
                f"{CONCURRENCY} tasks verify, cold cache: fetches",
                None,
                registry.requests,
                budget=1,
                compare="==",
                note=note,
            )
        )
    finally:
        registry.close()
    return rows


def bench_flood(body: bytes) -> list[dict[str, Any]]:
    registry = Registry(body, delay=0.0)
    clock = FakeClock()
    try:
        endpoint = JWKSEndpoint(registry.url, clock=clock, monotonic=clock, cooldown=30)
        verifier = Verifier(AUDIENCE, endpoint, clock=clock)
        endpoint.refresh()  # the cold fetch, before the flood
        windows = []
        for _ in range(2):
            before = registry.requests
            rejected = 0
            for _ in range(FLOOD):
                try:
                    verifier.verify(forged_token(secrets.token_urlsafe(16)))
                except TokenError:
                    rejected += 1
            windows.append(registry.requests - before)
            clock.advance(31)
        endpoint.close()
    finally:
        registry.close()
    note = f"{FLOOD} tokens per window, all rejected as unknown_kid; fetches per window: {windows}"
    return [
        row(
            "flood",
            f"{FLOOD} random kids: fetches per cooldown (30 s)",
            None,
            max(windows),
            budget=1,
            compare="<=",
            note=note,
        )
    ]


# -- report -----------------------------------------------------------------------------------


def row(
    section: str,
    operation: str,
    times: list[float] | None,
    value: float | None,
    *,
    budget: float | None = None,
    compare: str = "<=",
    note: str = "",
) -> dict[str, Any]:
    median = statistics.median(times) if times else None
    ok = None
    if budget is not None and value is not None:
        ok = value == budget if compare == "==" else value <= budget
    return {
        "section": section,
        "operation": operation,
        "median_s": median,
        "value": value,
        "budget": budget,
        "compare": compare,
        "ok": ok,
        "note": note,
    }


def human(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e9:.0f} ns"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'section':<14} {'operation':<58} {'median':>10} {'value':>9} {'budget':>8}  ok")
    for r in rows:
        value = (
            "" if r["value"] is None else (f"{r['value']:.3f}x" if isinstance(r["value"], float) else str(r["value"]))
        )
        budget = "" if r["budget"] is None else f"{r['compare']}{r['budget']:g}"
        ok = {None: "", True: "yes", False: "NO"}[r["ok"]]
        print(f"{r['section']:<14} {r['operation']:<58} {human(r['median_s']):>10} {value:>9} {budget:>8}  {ok}")
        if r["note"]:
            print(f"{'':<14}   {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--es256-share", type=float, default=0.5, help="fraction of ES256 keys (rest EdDSA)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check", action="store_true", help="exit 1 if a budget is missed")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    print(f"generating {args.keys:,} keys ({args.es256_share:.0%} ES256) ...", file=sys.stderr)
    doc = build_document(args.keys, args.es256_share)
    key = SigningKey.generate("ES256")
    small_doc = {"keys": [key.public_jwk(iss="orders"), *doc["keys"][:99]]}
    small_body = json.dumps(small_doc).encode("utf-8")

    rows = bench_cold_load(doc, args.rounds)
    rows += bench_lookup(doc, args.rounds)
    rows += bench_single_flight(small_body, key)
    rows += bench_flood(small_body)

    print(f"python {sys.version.split()[0]}, PyJWT {jwt.__version__}, {os.cpu_count()} CPUs")
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    missed = [r for r in rows if r["ok"] is False]
    if missed:
        print(f"{len(missed)} budget(s) missed: " + ", ".join(r["operation"] for r in missed), file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
