"""Per-request cost of meshauth's ASGI middleware over a bare ASGI app.

Run: python benchmarks/bench_middleware.py [--rounds 31] [--batch 2000]

The app is driven directly (a prebuilt scope, no-op receive/send, one event
loop), so the numbers are the middleware's own CPU cost with a token the
verifier has already verified (the steady state of a service: callers reuse
their cached token). Bare and wrapped batches are interleaved and the medians
of the per-request times are compared. Budget: at most 15 us added per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import meshauth
from meshauth.asgi import MeshAuthMiddleware

Scope = MutableMapping[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]

_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def bare_app(scope: Scope, receive: Any, send: Any) -> None:
    await send(_START)
    await send(_BODY)


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    return None


def build() -> tuple[dict[str, App], Scope]:
    orders_key = meshauth.SigningKey.generate("ES256")
    payments_key = meshauth.SigningKey.generate("ES256")
    keys = meshauth.StaticKeys.from_jwks(
        {"keys": [orders_key.public_jwk(iss="orders"), payments_key.public_jwk(iss="payments")]}
    )
    token = meshauth.ServiceIdentity("orders", orders_key).token_for("payments")
    policy = meshauth.Policy.from_dict(
        {"rules": [{"callers": ["orders"], "methods": ["POST"], "paths": ["/charges", "/charges/*"]}]}
    )
    payments = meshauth.ServiceIdentity("payments", payments_key)
    apps: dict[str, App] = {
        "bare": bare_app,
        "verify": MeshAuthMiddleware(bare_app, meshauth.Verifier("payments", keys)),
        "verify+policy": MeshAuthMiddleware(bare_app, meshauth.Verifier("payments", keys), policy=policy),
        "verify+policy+identity+exclude": MeshAuthMiddleware(
            bare_app,
            meshauth.Verifier("payments", keys),
            policy=policy,
            identity=payments,
            exclude=("/healthz", "/static/*"),
        ),
    }
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/charges/c_42",
        "raw_path": b"/charges/c_42",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"payments.internal:8002"),
            (b"user-agent", b"python-httpx/0.28.1"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"connection", b"keep-alive"),
            (b"content-type", b"application/json"),
            (b"content-length", b"17"),
            (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            (b"authorization", b"Bearer " + token.encode("ascii")),
        ],
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8002),
    }
    return apps, scope


async def batch(app: App, scope: Scope, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await app(scope, receive, send)
    return (time.perf_counter() - started) / n


async def measure(rounds: int, n: int) -> dict[str, float]:
    apps, scope = build()
    for app in apps.values():  # warm up: verify the token once, fill caches
        await batch(app, scope, 200)
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            samples[name].append(await batch(app, scope, n))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    medians = asyncio.run(measure(args.rounds, args.batch))
    bare = medians["bare"]
    print(f"bare app: {bare * 1e6:.2f} us/request")
    for name, value in medians.items():
        if name == "bare":
            continue
        added = (value - bare) * 1e6
        verdict = "ok" if added <= 15 else "OVER BUDGET"
        print(f"{name:32s} {value * 1e6:7.2f} us/request, +{added:.2f} us over bare (budget 15 us: {verdict})")


if __name__ == "__main__":
    main()
