"""Per-request overhead of ``meshauth.ServiceAuth`` against a trivial ``httpx.Auth``.

Budget (DESIGN section 7): with a cached token, ``ServiceAuth`` costs at most
2x an ``httpx.Auth`` that adds one constant header.

Two measurements, each interleaving both auths in one process so that machine
noise hits them alike:

* ``flow``: driving ``auth.sync_auth_flow(request)`` directly (the auth's own
  cost, nothing else);
* ``client``: a full ``httpx.Client.get`` through ``httpx.MockTransport`` (what
  a caller sees; the client's own work dilutes the difference).

Run: ``python benchmarks/bench_service_auth.py [--rounds 31] [--batch 2000]``.
Prints the median time per request of each auth and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Generator

import httpx

from meshauth._httpx import ServiceAuth
from meshauth.testing import Mesh


class ConstantHeaderAuth(httpx.Auth):
    """The baseline: the cheapest useful auth, one fixed header."""

    def __init__(self, value: str) -> None:
        self.value = value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.value
        yield request


def _drive(auth: httpx.Auth, request: httpx.Request, response: httpx.Response) -> None:
    flow = auth.sync_auth_flow(request)
    next(flow)
    try:
        flow.send(response)
    except StopIteration:
        pass
    else:  # pragma: no cover - the benchmark's responses never trigger a retry
        raise AssertionError("unexpected second request")


def _flow_runner(auth: httpx.Auth, batch: int) -> Callable[[], float]:
    requests = [httpx.Request("GET", "http://payments.internal/charges") for _ in range(batch)]
    response = httpx.Response(200)

    def run() -> float:
        started = time.perf_counter()
        for request in requests:
            _drive(auth, request, response)
        return (time.perf_counter() - started) / batch

    return run


def _client_runner(auth: httpx.Auth, batch: int) -> Callable[[], float]:
    response = httpx.Response(200)
    client = httpx.Client(auth=auth, transport=httpx.MockTransport(lambda request: response))

    def run() -> float:
        get = client.get
        started = time.perf_counter()
        for _ in range(batch):
            get("http://payments.internal/charges")
        return (time.perf_counter() - started) / batch

    return run


def _compare(name: str, baseline: Callable[[], float], candidate: Callable[[], float], rounds: int) -> float:
    baseline()  # warm up caches and the token
    candidate()
    base_times: list[float] = []
    cand_times: list[float] = []
    for index in range(rounds):
        # Alternate which one goes first so drift does not favour either.
        if index % 2:
            cand_times.append(candidate())
            base_times.append(baseline())
        else:
            base_times.append(baseline())
            cand_times.append(candidate())
    base = statistics.median(base_times)
    cand = statistics.median(cand_times)
    ratio = cand / base
    print(
        f"{name:<7} trivial auth {base * 1e6:8.2f} us/request   "
        f"ServiceAuth {cand * 1e6:8.2f} us/request   ratio {ratio:5.2f}x"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per measurement")
    parser.add_argument("--batch", type=int, default=2000, help="requests per round")
    args = parser.parse_args()

    mesh = Mesh(["orders", "payments"])
    identity = mesh.identity("orders")
    # The baseline's header is as long as a real one, so header encoding costs the same.
    trivial = ConstantHeaderAuth("Bearer " + identity.token_for("payments"))
    service = ServiceAuth(identity, audience="payments")

    flow_ratio = _compare("flow", _flow_runner(trivial, args.batch), _flow_runner(service, args.batch), args.rounds)
    client_ratio = _compare(
        "client", _client_runner(trivial, args.batch), _client_runner(service, args.batch), args.rounds
    )
    budget = 2.0
    verdict = "within" if max(flow_ratio, client_ratio) <= budget else "OVER"
    print(f"budget {budget:.1f}x: {verdict} (flow {flow_ratio:.2f}x, client {client_ratio:.2f}x)")


if __name__ == "__main__":
    main()
