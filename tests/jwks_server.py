"""A scriptable JWKS registry on 127.0.0.1 for the JWKSEndpoint tests.

The server is a ``ThreadingHTTPServer`` whose answers the tests script:
document, status, headers, one-off answers, a gate that holds requests until
released, hanging or dropped connections.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meshauth import SigningKey
from meshauth._jwks_endpoint import JWKSEndpoint

PATH = "/.well-known/jwks.json"
WAIT = 10.0  # bound on every wait for another thread; never reached when things work

# Generated once: EC key generation is the slow part.
ORDERS = SigningKey.generate("ES256")


def no_wait(attempt: int) -> float:
    """A ``retry_wait`` without pauses."""
    return 0.0


def jwks(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(entries)}


def body_of(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode("utf-8")


class JWKSServer:
    """A JWKS registry on 127.0.0.1 whose behaviour each test scripts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.body = body_of(jwks(ORDERS.public_jwk(iss="orders")))
        self.status = 200
        self.headers: dict[str, str] = {"Content-Type": "application/jwk-set+json", "Cache-Control": "max-age=300"}
        self.etag: str | None = None  # when set, If-None-Match is honoured
        self.mode = "normal"  # normal | close | hang | chunked
        self.one_off: list[Any] = []  # answers used once, before the defaults: a mode or (status, headers, body)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.held = 0  # requests waiting at the gate
        self.released = threading.Event()  # set at teardown: frees hanging handlers
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # scripting
    def publish(self, *entries: dict[str, Any], max_age: int | None = 300, etag: str | None = None) -> None:
        with self.lock:
            self.body = body_of(jwks(*entries))
            self.status = 200
            self.headers = {"Content-Type": "application/jwk-set+json"}
            if max_age is not None:
                self.headers["Cache-Control"] = f"max-age={max_age}"
            self.etag = etag

    def fail_with(self, status: int) -> None:
        with self.lock:
            self.status = status

    def hold(self) -> None:
        """Hold every request at the gate until :meth:`release`."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def count(self, path: str = PATH) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p == path)

    def last_headers(self) -> dict[str, str]:
        with self.lock:
            return self.requests[-1][1]

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            time.sleep(0.005)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{PATH}"

    # serving
    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((handler.path, {k.lower(): v for k, v in handler.headers.items()}))
        if not self.gate.is_set():
            with self.lock:
                self.held += 1
            self.gate.wait(WAIT)
            with self.lock:
                self.held -= 1
        with self.lock:
            one_off = self.one_off.pop(0) if self.one_off else None
            mode = one_off if isinstance(one_off, str) else self.mode
            if isinstance(one_off, tuple):
                status, headers, body = one_off
            else:
                status, headers, body = self.status, dict(self.headers), self.body
            etag = self.etag
        if handler.path == "/moved":
            status, headers = 200, {"Content-Type": "application/jwk-set+json"}
        if mode == "close":
            return  # no response at all: the client sees the connection drop
        if mode == "hang":
            self.released.wait(WAIT)
            return
        if status != 200 and not body.startswith(b"{"):
            body = b""
        if etag is not None and status == 200:
            headers["ETag"] = etag
            if handler.headers.get("If-None-Match") == etag:
                status, body = 304, b""
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if mode == "chunked":
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            for start in range(0, len(body), 4096):
                chunk = body[start : start + 4096]
                handler.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            handler.wfile.write(b"0\r\n\r\n")
            return
        if "Content-Length" not in headers:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if status != 304:
            handler.wfile.write(body)

    def __enter__(self) -> JWKSServer:
        script = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.close_connection = True
                # The client may give up first (timeouts, size limits): expected.
                with contextlib.suppress(OSError):
                    script.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.02,), name="jwks-test-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self.gate.set()
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(WAIT)


def settle(endpoint: JWKSEndpoint) -> None:
    """Wait for background refreshes of ``endpoint`` to finish (bounded)."""
    deadline = time.monotonic() + WAIT
    while endpoint._cache.flight is not None or endpoint._threads:
        for thread in list(endpoint._threads):
            thread.join(WAIT)
        if time.monotonic() > deadline:
            raise AssertionError("background refresh did not finish")
        time.sleep(0.001)


def gzip_bomb(compressed_bytes: int = 1 << 20) -> bytes:
    """A gzip body of about ``compressed_bytes`` that inflates about 1000-fold (1 MiB -> ~1 GiB).

    Built from one full-flush segment of 1 MiB of zeros repeated (a full flush
    resets the compressor, so the segments are identical): no gigabyte is ever
    made here. The trailer's checksum is wrong, which a reader never reaches.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = compressor.compress(b'{"keys": [') + compressor.flush(zlib.Z_FULL_FLUSH)
    segment = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return head + segment * max(1, compressed_bytes // len(segment)) + compressor.flush()
