"""The console's HTTP server: a read-only JSON API and the page's static files.

Standard library only (``http.server``). Every response forbids inline script
and framing, is never cached, and carries no CORS header; a request whose
``Host`` is not the console's own address (DNS rebinding) or that a browser
marks as coming from another site is refused, and so is any query parameter the
page does not send.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ._index import CURSOR, FILTERS, AuditIndex
from ._registry_view import RegistryView

__all__ = ["ConsoleServer", "is_loopback"]

logger = logging.getLogger("meshauth.console")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/static/console.css": ("console.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
MAX_VALUE = 256
SECONDS = re.compile(r"\A\d{1,11}(?:\.\d{1,6})?\Z")
MAX_LIMIT = 500
FOLLOW_INTERVAL = 0.25


class BadRequest(ValueError):
    """A query the page would not send."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(document: Any) -> bytes:
    """JSON with every non-ASCII character and ``<``, ``>``, ``&`` escaped (they occur only inside strings)."""
    text = json.dumps(document, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _single(query: Mapping[str, list[str]], allowed: set[str]) -> dict[str, str]:
    """Each parameter once, known, and short; empty values are dropped."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter: {unknown[0]}")
    values: dict[str, str] = {}
    for name, given in query.items():
        if len(given) != 1:
            raise BadRequest(f"query parameter {name} given {len(given)} times")
        if len(given[0]) > MAX_VALUE:
            raise BadRequest(f"query parameter {name} is longer than {MAX_VALUE} characters")
        if given[0]:
            values[name] = given[0]
    return values


def _limit(values: dict[str, str]) -> int:
    text = values.pop("limit", "100")
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


@dataclasses.dataclass(frozen=True, slots=True)
class _Api:
    index: AuditIndex
    registry: RegistryView | None

    def routes(self) -> dict[str, Callable[[dict[str, list[str]]], Any]]:
        return {
            "/api/status": self.status,
            "/api/decisions": self.decisions,
            "/api/chart": self.chart,
            "/api/keys": self.keys,
            "/api/transaction": self.transaction,
        }

    def status(self, query: dict[str, list[str]]) -> Any:
        _single(query, set())
        return self.index.status()

    def chart(self, query: dict[str, list[str]]) -> Any:
        _single(query, set())
        return self.index.chart()

    def decisions(self, query: dict[str, list[str]]) -> Any:
        values = _single(query, {*FILTERS, "limit", "cursor", "before"})
        limit = _limit(values)
        cursor = values.pop("cursor", None)
        if cursor is not None and not CURSOR.match(cursor):
            raise BadRequest("cursor is not one this console handed out")
        before = values.pop("before", None)
        if before is not None and not SECONDS.match(before):
            raise BadRequest("before must be a time in POSIX seconds")
        if values.get("outcome", "accepted") not in ("accepted", "rejected", "denied", "unavailable"):
            raise BadRequest("outcome must be accepted, rejected, denied or unavailable")
        page = self.index.decisions(
            values, before=None if before is None else float(before), cursor=cursor, limit=limit
        )
        return {"decisions": page.decisions, "next": page.next, "partial": page.partial}

    def keys(self, query: dict[str, list[str]]) -> Any:
        _single(query, set())
        if self.registry is None:
            return {"source": None, "error": None, "keys": [], "problems": [], "without_key": []}
        return self.registry.keys(self.index.callers())

    def transaction(self, query: dict[str, list[str]]) -> Any:
        values = _single(query, {"id"})
        if "id" not in values:
            raise BadRequest("id is required: a transaction or trace id")
        return self.index.transaction(values["id"])


class _Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "meshauth-console"

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "the console is read-only"}, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _serve(self, *, head: bool) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._send(HTTPStatus.FORBIDDEN, {"error": refusal}, head=head)
            return
        url = urllib.parse.urlsplit(self.path)
        static = STATIC.get(url.path)
        if static is not None:
            if url.query:
                self._send(HTTPStatus.BAD_REQUEST, {"error": "static files take no query"}, head=head)
                return
            name, content_type = static
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, body, content_type=content_type, head=head)
            return
        route = self.server.api.routes().get(url.path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not found"}, head=head)
            return
        try:
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
            document = route(query)
        except (BadRequest, ValueError, UnicodeDecodeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc) if isinstance(exc, BadRequest) else "bad query"})
            return
        except OSError as exc:  # a log that vanished or was truncated mid-read: try again
            logger.warning("meshauth console: reading an audit log failed: %s", exc)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "an audit log could not be read; try again"})
            return
        self._send(HTTPStatus.OK, document, head=head)

    def _refusal(self) -> str | None:
        host = self.headers.get("Host", "")
        if not self.server.host_allowed(host):
            return "this console answers only to its own address (Host header refused)"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return "requests from other sites are refused"
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            return "requests from other origins are refused"
        return None

    def _send(
        self,
        status: HTTPStatus,
        body: Any,
        *,
        content_type: str = "application/json",
        head: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else _json(body)
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


class ConsoleServer(ThreadingHTTPServer):
    """The console on ``host:port`` (port 0: a free one), following its logs in a background thread."""

    daemon_threads = True

    def __init__(
        self, index: AuditIndex, registry: RegistryView | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.api = _Api(index, registry)
        self.index = index
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)
        port = self.server_address[1]
        self.port = port
        # A rebinding attack reaches the console under the attacker's DNS name: only IP literals,
        # localhost and (when serving beyond loopback) this machine's own names are answered.
        self.host_names = {"localhost"} | ({socket.gethostname(), socket.getfqdn()} if not is_loopback(host) else set())
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="meshauth-console-follow", daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that went away mid-answer is not worth a traceback on the console's terminal."""
        logger.debug("meshauth console: the connection from %s failed", client_address, exc_info=True)

    def host_allowed(self, header: str) -> bool:
        """Whether a request's ``Host`` header names this console (an IP literal or a known name, and its port)."""
        name, _, port = header.lower().rpartition(":")
        if port != str(self.port):
            return False
        if name.lower() in {n.lower() for n in self.host_names}:
            return True
        try:
            ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        except ValueError:
            return False
        return True

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        return f"http://{host if ':' not in host else f'[{host}]'}:{self.server_address[1]}/"

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                more = self.index.follow()
            except OSError as exc:  # a log vanishing mid-read: noticed again on the next round
                logger.warning("meshauth console: reading the audit logs failed: %s", exc)
                more = False
            if not more:
                self._stop.wait(FOLLOW_INTERVAL)

    def start(self) -> ConsoleServer:
        """Follow the logs and serve requests in background threads; returns ``self``."""
        self.index.open()
        self._follower.start()
        threading.Thread(target=self.serve_forever, args=(0.05,), name="meshauth-console", daemon=True).start()
        return self

    def serve(self) -> None:
        """Follow the logs in the background and serve requests in this thread until :meth:`stop`."""
        self.index.open()
        self._follower.start()
        self.serve_forever()

    def stop(self) -> None:
        """Stop serving and following; close the logs."""
        self._stop.set()
        self.shutdown()
        self.server_close()
        if self._follower.is_alive():
            self._follower.join(timeout=5)
        self.index.close()
        if self.api.registry is not None:
            self.api.registry.close()

    def wait_indexed(self, timeout: float = 10.0) -> None:
        """Block until every log is counted to its end (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(log["indexed"] >= 1.0 for log in self.index.status()["logs"]):
                return
            time.sleep(0.01)
        raise TimeoutError("the audit logs were not indexed in time")
