"""Three replicas of "orders", each with its own in-memory key, calling payments through Redis.

Needs a Redis server and the redis extra (pip install 'meshauth[redis]'):

    python examples/replicas_redis.py [--redis redis://127.0.0.1:6379/0] [--namespace demo]

Payments runs here (a WSGI app behind meshauth.wsgi.MeshAuthMiddleware on loopback) and verifies
with RedisKeys plus the shared RedisReplayCache. Each replica is its own process: it generates a
key in memory, publishes it with ServiceIdentity.ephemeral, calls payments three times and deletes
its key on exit. Payments sees three different kids, all owned by "orders".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx

import meshauth
from meshauth.redis import RedisKeys, RedisPublisher, RedisReplayCache
from meshauth.wsgi import MeshAuthMiddleware


def payments_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    principal = environ["meshauth.principal"]
    body = json.dumps({"caller": principal.caller, "kid": principal.kid}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def replica(number: int, redis_url: str, namespace: str, payments_url: str) -> None:
    publisher = RedisPublisher(redis_url, namespace)
    with meshauth.ServiceIdentity.ephemeral("orders", publisher) as me:
        auth = meshauth.ServiceAuth(me, audience="payments", fresh_tokens=True)  # one-time tokens
        with httpx.Client(auth=auth, base_url=payments_url) as client:
            for _ in range(3):
                answer = client.post("/charges").raise_for_status().json()
                mine, seen = me.key.kid[:8], answer["kid"][:8]
                # One write per line: three processes share this stdout, and print() writes the
                # text and its newline separately, so their lines could interleave.
                line = f"replica {number} (kid {mine}...): payments saw {answer['caller']} with kid {seen}..."
                sys.stdout.write(line + "\n")
                sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="example")
    parser.add_argument("--replica", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--payments", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica is not None:
        replica(args.replica, args.redis, args.namespace, args.payments)
        return
    keys = RedisKeys(args.redis, args.namespace)
    replay_cache = RedisReplayCache(args.redis, args.namespace)
    verifier = meshauth.Verifier("payments", keys, replay_cache=replay_cache, txn_issuers=())  # no user transactions
    server = make_server("127.0.0.1", 0, MeshAuthMiddleware(payments_app, verifier), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    payments_url = f"http://127.0.0.1:{server.server_port}"
    command = [sys.executable, __file__, "--redis", args.redis, "--namespace", args.namespace, "--payments"]
    # The replicas are this very script run again: each its own process with its own key.
    replicas = [subprocess.Popen([*command, payments_url, "--replica", str(n)]) for n in (1, 2, 3)]  # noqa: S603
    codes = [process.wait(60) for process in replicas]
    server.shutdown()
    left = RedisKeys(args.redis, args.namespace, follow=False)
    print(f"replicas exited {codes}; keys of orders left in the registry: {len(left.services().get('orders', []))}")
    left.close()
    keys.close()


if __name__ == "__main__":
    main()
