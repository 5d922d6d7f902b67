"""A real gateway process for raw-socket tests, with a logging upstream and small limits.

``LoggingUpstream`` is a plain socket server (a thread, in the test process)
that records the exact request line and headers it received and answers with
whatever extra headers the test asks for, so a test sees byte for byte what the
gateway forwarded. ``EdgeGateway`` writes a configuration (keys, registry, an
IdP key set file), starts ``python -m meshauth.gateway`` and reads its audit log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

import meshauth

IDP = "https://idp.example.com"
AUDIENCE = "api-gateway"
START_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Received:
    """One request as the upstream read it off the wire."""

    request_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key.lower() == name]
        return values[0] if values else None


class LoggingUpstream:
    """Answers every request with 200 and ``extra_headers``, recording what arrived."""

    def __init__(self, extra_headers: list[tuple[bytes, bytes]] | None = None, *, close_after: bool = False) -> None:
        self.extra_headers = extra_headers or []
        self.close_after = close_after  # close each connection after one response (an upstream without keep-alive)
        self.connections = 0
        self.received: list[Received] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        with conn:
            try:
                while not self._stop.is_set():
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    body, buffer = self._body(conn, head, buffer)
                    line, *lines = head.split(b"\r\n")
                    headers = [tuple(item.split(b": ", 1)) for item in lines]
                    self.received.append(Received(line, headers, body))  # type: ignore[arg-type]
                    reply = b'{"ok":true}'
                    extra = b"".join(name + b": " + value + b"\r\n" for name, value in self.extra_headers)
                    if b"/stream" in line:  # a streamed answer: no Content-Length
                        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(reply), reply)
                        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n" + extra + b"\r\n" + chunked)
                        continue
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + extra
                        + b"content-length: "
                        + str(len(reply)).encode()
                        + b"\r\n\r\n"
                        + reply
                    )
                    if self.close_after:
                        return
            except OSError:
                return

    @staticmethod
    def _body(conn: socket.socket, head: bytes, buffer: bytes) -> tuple[bytes, bytes]:
        lowered = head.lower()
        if b"transfer-encoding: chunked" in lowered:
            while not buffer.endswith(b"0\r\n\r\n"):
                buffer += conn.recv(65536)
            return buffer, b""
        length = 0
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(buffer) < length:
            buffer += conn.recv(65536)
        return buffer[:length], buffer[length:]


@dataclass
class EdgeGateway:
    """A configured gateway directory and, once started, its process."""

    dir: Path
    port: int
    idp_key: rsa.RSAPrivateKey
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.jsonl"

    @property
    def config(self) -> Path:
        return self.dir / "gateway.toml"

    def user_token(self, subject: str = "alice", groups: tuple[str, ...] = ("staff",)) -> str:
        now = int(time.time())
        claims = {
            "iss": IDP,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "groups": list(groups),
        }
        return jwt.encode(claims, self.idp_key, algorithm="RS256", headers={"kid": "idp-1"})

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        text = self.audit_log.read_text()
        complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def records_after(self, count: int, expected: int = 1, wait: float = 5.0) -> list[dict[str, Any]]:
        """The records written after the first ``count``, once there are ``expected`` of them."""
        deadline = time.monotonic() + wait
        while True:
            records = self.audit()[count:]
            if len(records) >= expected or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        log = (self.dir / "gateway.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshauth.gateway", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1", **self.env},
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the gateway did not start: {self.log()}")

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process, grace=15)

    def log(self) -> str:
        path = self.dir / "gateway.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def stop_process(process: subprocess.Popen[Any], grace: float = 10) -> int:
    """Terminate ``process`` (killed if it has not ended within ``grace`` seconds); its exit code.

    ``communicate`` also drains and closes any pipes, so a process writing to one cannot block.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)
    return process.returncode


def write_gateway(directory: Path, upstream_port: int, extra_config: str = "", port: int | None = None) -> EdgeGateway:
    """Keys, registry, IdP key set and ``gateway.toml`` for a gateway in front of ``upstream_port``."""
    key = meshauth.SigningKey.generate()
    (directory / "gateway.pem").write_bytes(key.to_pem())
    (directory / "registry.json").write_text(json.dumps({"keys": [key.public_jwk(iss="gateway")]}))
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True), "kid": "idp-1", "use": "sig"}
    (directory / "idp-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    port = port or free_port()
    (directory / "gateway.toml").write_text(
        f"""
listen = "127.0.0.1:{port}"
service = "gateway"
key_file = "gateway.pem"
registry = "registry.json"
audit_log = "audit.jsonl"
{extra_config}

[[issuers]]
issuer = "{IDP}"
jwks = "idp-jwks.json"
audience = "{AUDIENCE}"
algorithms = ["RS256"]

[[routes]]
prefix = "/orders"
upstream = "http://127.0.0.1:{upstream_port}"
service = "orders"
groups = ["staff"]
"""
    )
    return EdgeGateway(directory, port, idp_key, extra_config=extra_config)


@contextmanager
def running(gateway: EdgeGateway) -> Iterator[EdgeGateway]:
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
