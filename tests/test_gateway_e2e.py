"""End to end on loopback: real processes for the IdP key set, the gateway and three upstream services.

The IdP's JWKS is served over HTTP by ``python -m http.server``; the gateway
runs as ``python -m meshauth.gateway --config ...``; ``orders``,
``inventory`` and ``payments`` (which ``orders`` calls inside the user's
transaction) are ``tests/e2e_service.py`` (meshauth ASGI middleware in front
of an echo app) under uvicorn, each writing its own audit log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import meshauth
from tests.edge_mesh import AUDIENCE, IDP, START_DEADLINE, free_port, stop_process

pytestmark = pytest.mark.slow

SERVICE_SCRIPT = Path(__file__).with_name("e2e_service.py")


def wait_until_up(url: str, process: subprocess.Popen[bytes], *, expect: int = 200) -> None:
    deadline = time.monotonic() + START_DEADLINE
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == expect:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {START_DEADLINE} s (last: {last})")


@dataclass
class Mesh:
    """The running processes and what a test needs to talk to them."""

    dir: Path
    gateway_url: str
    audit_log: Path
    idp_key: rsa.RSAPrivateKey
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def user_token(self, subject: str = "alice", **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": IDP,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "groups": ["staff"],
            "scope": "orders:read",
        }
        claims.update(overrides)
        return jwt.encode(claims, self.idp_key, algorithm="RS256", headers={"kid": "idp-key-1"})

    def get(self, path: str, token: str | None, trace_id: str) -> httpx.Response:
        headers = {"traceparent": f"00-{trace_id}-{'1' * 16}-01"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(self.gateway_url + path, headers=headers, timeout=10.0)

    def audit_record(self, trace_id: str) -> dict[str, Any]:
        """The gateway's record for the request with this trace id (written just after the response)."""
        deadline = time.monotonic() + 5.0
        while True:
            records = [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]
            found = [r for r in records if r.get("trace_id") == trace_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"expected one audit record for {trace_id}, found {len(found)}"
                return found[0]
            time.sleep(0.02)


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    finally:
        handle.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("gateway-e2e")
    keys = {name: meshauth.SigningKey.generate() for name in ("gateway", "orders", "inventory", "payments")}
    (directory / "gateway.pem").write_bytes(keys["gateway"].to_pem())
    (directory / "orders.pem").write_bytes(keys["orders"].to_pem())
    registry = {"keys": [key.public_jwk(iss=name) for name, key in keys.items()]}
    (directory / "registry.json").write_text(json.dumps(registry))
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "idp").mkdir()
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True), "kid": "idp-key-1", "use": "sig"}
    (directory / "idp" / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    ports = {name: free_port() for name in ("idp", "gateway", "orders", "inventory", "payments", "down")}
    config = f"""
listen = "127.0.0.1:{ports["gateway"]}"
service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"
audit_log = "audit.jsonl"

[[issuers]]
issuer = "{IDP}"
jwks = "http://127.0.0.1:{ports["idp"]}/jwks.json"
audience = "{AUDIENCE}"
algorithms = ["RS256"]

[[routes]]
prefix = "/orders"
upstream = "http://127.0.0.1:{ports["orders"]}"
service = "orders"
groups = ["staff"]
scopes = ["orders:read"]

[[routes]]
prefix = "/inventory"
upstream = "http://127.0.0.1:{ports["inventory"]}"
service = "inventory"
groups = ["warehouse"]

[[routes]]
prefix = "/down"
upstream = "http://127.0.0.1:{ports["down"]}"
service = "orders"
"""
    (directory / "gateway.toml").write_text(config)
    result = Mesh(directory, f"http://127.0.0.1:{ports['gateway']}", directory / "audit.jsonl", idp_key)
    python = sys.executable
    try:
        result.processes["idp"] = start(
            [
                python,
                "-m",
                "http.server",
                str(ports["idp"]),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(directory / "idp"),
            ],
            directory / "idp.log",
        )
        extra = {
            "orders": [
                "--key",
                str(directory / "orders.pem"),
                "--call",
                f"payments=http://127.0.0.1:{ports['payments']}",
            ],
            "payments": ["--delegators", "gateway,orders"],
        }
        for name in ("orders", "inventory", "payments"):
            result.processes[name] = start(
                [
                    python,
                    str(SERVICE_SCRIPT),
                    "--name",
                    name,
                    "--port",
                    str(ports[name]),
                    "--registry",
                    str(directory / "registry.json"),
                    "--audit",
                    str(directory / f"{name}-audit.jsonl"),
                    *extra.get(name, []),
                ],
                directory / f"{name}.log",
            )
        result.processes["gateway"] = start(
            [python, "-m", "meshauth.gateway", "--config", str(directory / "gateway.toml")], directory / "gateway.log"
        )
        wait_until_up(f"http://127.0.0.1:{ports['idp']}/jwks.json", result.processes["idp"])
        for name in ("orders", "inventory", "payments"):
            wait_until_up(f"http://127.0.0.1:{ports[name]}/healthz", result.processes[name])
        wait_until_up(f"{result.gateway_url}/readyz", result.processes["gateway"])
        yield result
    except Exception:
        for log in sorted(directory.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        for process in result.processes.values():
            stop_process(process)


def trace_id() -> str:
    return uuid.uuid4().hex


def test_alice_reaches_orders_as_herself_via_the_gateway(mesh: Mesh) -> None:
    tid = trace_id()
    token = mesh.user_token()
    response = mesh.get("/orders/42?expand=items", token, tid)
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["service"] == "orders"
    assert seen["subject"] == "alice" and seen["caller"] == "gateway" and seen["txn_issuer"] == "gateway"
    assert isinstance(seen["transaction"], str) and len(seen["transaction"]) >= 22
    assert seen["path"] == "/orders/42" and seen["query"] == "expand=items"
    assert seen["x_forwarded_for"] == "127.0.0.1" and seen["leaked_user_token"] is False
    assert seen["traceparent"].split("-")[1] == tid
    record = mesh.audit_record(tid)
    assert (record["outcome"], record["reason"], record["status"]) == ("accepted", "ok", 200)
    assert record["subject"] == "alice" and record["audience"] == "orders"
    assert (record["transaction"], record["txn_issuer"]) == (seen["transaction"], "gateway")


def test_one_transaction_id_in_the_gateway_orders_and_payments_audit_logs(mesh: Mesh) -> None:
    """alice -> gateway -> orders -> payments: the gateway issues one Txn-Token, every hop logs its id."""
    tid = trace_id()
    response = mesh.get("/orders/checkout", mesh.user_token(), tid)
    assert response.status_code == 200, response.text
    seen = response.json()
    transaction = seen["transaction"]
    assert (seen["caller"], seen["subject"], seen["txn_issuer"]) == ("gateway", "alice", "gateway")
    charged = seen["payments"]
    assert (charged["caller"], charged["subject"], charged["txn_issuer"]) == ("orders", "alice", "gateway")
    assert charged["transaction"] == transaction
    assert mesh.audit_record(tid)["transaction"] == transaction
    for name, caller in (("orders", "gateway"), ("payments", "orders")):
        log = mesh.dir / f"{name}-audit.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if transaction in line]
        assert [(r["event"], r["outcome"], r["caller"], r["subject"]) for r in records] == [
            ("request", "accepted", caller, "alice")
        ], name
        assert records[0]["transaction"] == transaction and records[0]["txn_issuer"] == "gateway"
    # The Txn-Token itself is in no log.
    for log in mesh.dir.glob("*audit.jsonl"):
        assert not re.search(r"[\w-]{16,}\.[\w-]{16,}\.[\w-]{16,}", log.read_text()), log.name


def test_second_upstream_and_group_policy(mesh: Mesh) -> None:
    allowed, denied = trace_id(), trace_id()
    bob = mesh.user_token("bob", groups=["warehouse"], scope="")
    response = mesh.get("/inventory/widgets", bob, allowed)
    assert response.status_code == 200 and response.json()["service"] == "inventory"
    assert response.json()["subject"] == "bob"
    refused = mesh.get("/inventory/widgets", mesh.user_token(), denied)
    assert refused.status_code == 403 and refused.json()["reason"] == "group_required"
    assert mesh.audit_record(allowed)["outcome"] == "accepted"
    record = mesh.audit_record(denied)
    assert (record["outcome"], record["reason"], record["subject"]) == ("denied", "group_required", "alice")


@pytest.mark.parametrize("case", ["expired", "tampered", "missing"])
def test_bad_tokens_are_refused_and_audited(mesh: Mesh, case: str) -> None:
    tid = trace_id()
    now = int(time.time())
    if case == "expired":
        token: str | None = mesh.user_token(iat=now - 1000, exp=now - 600)
        reason = "expired"
    elif case == "tampered":
        header, payload, signature = mesh.user_token().split(".")
        claims = json.loads(jwt.utils.base64url_decode(payload))
        claims["sub"] = "mallory"
        token = f"{header}.{jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()}.{signature}"
        reason = "bad_signature"
    else:
        token, reason = None, "missing_credentials"
    response = mesh.get("/orders/1", token, tid)
    assert response.status_code == 401
    assert response.json()["reason"] == reason
    assert response.headers["www-authenticate"].startswith('Bearer realm="gateway"')
    record = mesh.audit_record(tid)
    assert (record["outcome"], record["reason"], record["status"]) == ("rejected", reason, 401)
    if token is not None:
        log_text = mesh.audit_log.read_text()
        assert token not in log_text and token.rsplit(".", 1)[1] not in log_text


def test_upstream_down_is_a_502(mesh: Mesh) -> None:
    tid = trace_id()
    response = mesh.get("/down/x", mesh.user_token(), tid)
    assert response.status_code == 502 and response.json()["reason"] == "upstream_unreachable"
    record = mesh.audit_record(tid)
    assert (record["outcome"], record["status"]) == ("error", 502)


def test_every_decision_is_in_the_audit_log_with_a_trace_id(mesh: Mesh) -> None:
    tids = [trace_id() for _ in range(3)]
    mesh.get("/orders", mesh.user_token(), tids[0])
    mesh.get("/orders", "not-a-token", tids[1])
    mesh.get("/nowhere", mesh.user_token(), tids[2])
    reasons = [mesh.audit_record(tid)["reason"] for tid in tids]
    assert reasons == ["ok", "malformed", "no_route"]
    records = [json.loads(line) for line in mesh.audit_log.read_text().splitlines()]
    # Besides requests, the log holds the key-set fetches (event jwks.refresh), which belong to no request.
    requests = [r for r in records if r["event"] != "jwks.refresh"]
    assert requests and all(len(r["trace_id"]) == 32 and r["event"] == "gateway.request" for r in requests)


def test_gateway_stops_cleanly(mesh: Mesh, tmp_path: Path) -> None:
    """A second gateway on the same config: SIGTERM gives exit code 0; a bad config gives 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text('service = "gateway"\n')
    result = subprocess.run(
        [sys.executable, "-m", "meshauth.gateway", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "registry: this key is required" in result.stderr
    config = (mesh.dir / "gateway.toml").read_text()
    port = free_port()
    listen_line = next(line for line in config.splitlines() if line.startswith("listen"))
    second = mesh.dir / "second.toml"
    second.write_text(config.replace(listen_line, f'listen = "127.0.0.1:{port}"'))
    process = start([sys.executable, "-m", "meshauth.gateway", "--config", str(second)], tmp_path / "second.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", process)
        process.terminate()
        assert process.wait(timeout=15) == 0
    finally:
        stop_process(process)
