"""meshauth.wsgi.MeshAuthMiddleware: PEP 3333 behaviour, statuses, audit, mutual auth, a real server."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
from opentelemetry.trace import StatusCode

import meshauth
from meshauth._jws import body_digest
from meshauth.testing import FakeClock, Mesh
from meshauth.wsgi import MeshAuthMiddleware

REALM = 'Bearer realm="payments"'
NONCE = "n0nce-abcdefghijklmnop"
POLICY = {
    "rules": [
        {"callers": ["orders"], "methods": ["POST"], "paths": ["/charges", "/charges/*"]},
        {"callers": ["billing"], "methods": ["GET"], "paths": ["/reports/**"], "scopes": ["reports:read"]},
    ],
}


class Body:
    """A response iterable that records whether the server closed it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


class App:
    """A recording WSGI app: answers ``status`` with the principal it saw."""

    def __init__(self, status: str = "200 OK") -> None:
        self.status = status
        self.environs: list[dict[str, Any]] = []
        self.bodies: list[Body] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.environs.append(environ)
        principal = environ.get("meshauth.principal")
        start_response(self.status, [("Content-Type", "application/json")])
        body = Body([json.dumps({"caller": principal.caller if principal else None}).encode()])
        self.bodies.append(body)
        return body

    @property
    def called(self) -> bool:
        return bool(self.environs)


class Result:
    """What the server saw: one start_response call, the headers and the body."""

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.status_code = int(status.split(maxsplit=1)[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.header_list = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def environ_for(method: str = "POST", path: str = "/charges", **extra: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "payments.internal",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.7",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    environ.update(extra)
    return environ


def run(app: Any, environ: dict[str, Any]) -> Result:
    calls: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        assert isinstance(status, str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers)
        calls.append((status, headers))
        return lambda data: None

    iterable = app(environ, start_response)
    try:
        body = b"".join(iterable)
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()
    assert len(calls) == 1, "start_response is called exactly once"
    return Result(calls[0][0], calls[0][1], body)


@pytest.fixture
def app() -> App:
    return App()


def test_valid_token_reaches_app(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    result = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert result.status == "200 OK"
    assert result.json() == {"caller": "orders"}
    assert app.environs[0]["meshauth.principal"].caller == "orders"
    assert app.bodies[0].closed, "the app's iterable is passed through, close() included"
    [record] = audit_log
    fields = record.meshauth
    assert (fields["event"], fields["outcome"], fields["reason"]) == ("request", "accepted", "ok")
    assert (fields["method"], fields["path"], fields["client"]) == ("POST", "/charges", "10.0.0.7")
    audit_log.assert_no_secret(token)


def test_through_httpx_wsgi_transport(mesh: Mesh, app: App, token: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    with httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://payments.internal") as http:
        assert http.post("/charges", headers={"Authorization": f"Bearer {token}"}).json() == {"caller": "orders"}
        missing = http.post("/charges")
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, REALM)
        assert missing.json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert len(app.environs) == 1


def test_missing_credentials(mesh: Mesh, app: App, audit_log: Any) -> None:
    result = run(MeshAuthMiddleware(app, mesh.verifier("payments")), environ_for())
    assert result.status == "401 Unauthorized"
    assert result.headers["www-authenticate"] == REALM
    assert result.headers["content-type"] == "application/json"
    assert result.headers["content-length"] == str(len(result.body))
    assert result.json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert not app.called
    [record] = audit_log
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", "missing_credentials")


@pytest.mark.parametrize(
    "case",
    [
        ("Basic dXNlcjpwYXNz", "wrong_scheme"),
        ("Bearer {token}, Bearer {token}", "duplicate_authorization"),  # how servers fold two headers
        ("Bearer ", "malformed"),
        ("Bearer " + "a" * 9000, "too_large"),
        ("Bearer \xff\xfe{token}", "malformed"),  # latin-1 "bytes as str" for non-ASCII bytes
        ("Bearer not.a-jwt", "malformed"),
        ("Bearer {other}", "wrong_audience"),
    ],
    ids=["wrong_scheme", "two_headers", "empty", "over_size", "non_ascii", "malformed", "wrong_audience"],
)
def test_invalid_credentials(mesh: Mesh, app: App, token: str, audit_log: Any, case: tuple[str, str]) -> None:
    header, reason = case
    other = mesh.identity("orders").mint("billing")
    value = header.format(token=token, other=other)
    result = run(MeshAuthMiddleware(app, mesh.verifier("payments")), environ_for(HTTP_AUTHORIZATION=value))
    assert result.status == "401 Unauthorized"
    assert result.headers["www-authenticate"] == (
        f'Bearer realm="payments", error="invalid_token", error_description="{reason}"'
    )
    assert result.json() == {"error": "invalid_token", "reason": reason}
    assert token.encode() not in result.body
    assert not app.called
    [record] = audit_log
    assert (record.meshauth["outcome"], record.meshauth["reason"]) == ("rejected", reason)
    audit_log.assert_no_secret(token)
    audit_log.assert_no_secret(other)


def test_expired_and_revoked(mesh: Mesh, clock: FakeClock, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    environ = environ_for(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert run(wrapped, dict(environ)).status_code == 200
    clock.advance(3600)
    assert run(wrapped, dict(environ)).json() == {"error": "invalid_token", "reason": "expired"}
    fresh = mesh.identity("orders").mint("payments")
    mesh.keys.revoke(mesh.signing_keys["orders"].kid)
    assert run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {fresh}")).json()["reason"] == "unknown_kid"
    assert len(app.environs) == 1
    assert [r.meshauth["reason"] for r in audit_log] == ["ok", "expired", "unknown_kid"]


def test_keys_unavailable_is_503(mesh: Mesh, app: App, token: str, down_keys: Any) -> None:
    wrapped = MeshAuthMiddleware(app, meshauth.Verifier("payments", down_keys, clock=mesh.clock))
    result = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert result.status == "503 Service Unavailable"
    assert result.headers["retry-after"] == "5"
    assert result.json() == {"error": "temporarily_unavailable", "reason": "keys_unavailable"}
    assert not app.called


def test_policy(mesh: Mesh, app: App, token: str, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    assert run(wrapped, environ_for(path="/charges/c_1", HTTP_AUTHORIZATION=f"Bearer {token}")).status_code == 200
    denied = run(wrapped, environ_for(method="DELETE", HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert denied.status == "403 Forbidden"
    assert "www-authenticate" not in denied.headers
    assert denied.json() == {"error": "forbidden", "reason": "no_matching_rule"}
    billing = mesh.identity("billing").token_for("payments")
    scoped = run(wrapped, environ_for(method="GET", path="/reports/x", HTTP_AUTHORIZATION=f"Bearer {billing}"))
    assert scoped.status_code == 403
    assert scoped.headers["www-authenticate"] == 'Bearer realm="payments", error="insufficient_scope"'
    assert len(app.environs) == 1
    assert [r.meshauth["outcome"] for r in audit_log] == ["accepted", "denied", "denied"]


def test_policy_path_from_request_uri_or_quoted_path_info(mesh: Mesh, app: App, token: str) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY))
    auth = f"Bearer {token}"
    # REQUEST_URI wins: an encoded slash is refused even though PATH_INFO looks fine
    result = run(wrapped, environ_for(path="/charges/a/b", REQUEST_URI="/charges/a%2Fb?x=1", HTTP_AUTHORIZATION=auth))
    assert result.json()["reason"] == "bad_path"
    # gunicorn's RAW_URI is read the same way (an encoded slash PATH_INFO no longer shows)
    result = run(wrapped, environ_for(path="/charges/a/b", RAW_URI="/charges/a%2Fb", HTTP_AUTHORIZATION=auth))
    assert result.json()["reason"] == "bad_path"
    result = run(wrapped, environ_for(path="/charges/c_2", RAW_URI="/charges/c_1", HTTP_AUTHORIZATION=auth))
    assert (result.status_code, result.json()["reason"]) == (400, "bad_path")
    # REQUEST_URI and PATH_INFO must agree
    result = run(wrapped, environ_for(path="/charges/c_2", REQUEST_URI="/charges/c_1", HTTP_AUTHORIZATION=auth))
    assert (result.status_code, result.json()["reason"]) == (400, "bad_path")
    # absolute-form request target
    result = run(
        wrapped,
        environ_for(path="/charges/c_1", REQUEST_URI="http://payments.internal/charges/c_1", HTTP_AUTHORIZATION=auth),
    )
    assert result.status_code == 200
    # without REQUEST_URI: PATH_INFO (latin-1 "bytes as str") is re-encoded; a decoded '?' stays in the path
    result = run(wrapped, environ_for(path="/charges/\xc3\xa9t\xc3\xa9?", HTTP_AUTHORIZATION=auth))
    assert result.status_code == 200
    result = run(wrapped, environ_for(path="/charges/a/../../admin", HTTP_AUTHORIZATION=auth))
    assert (result.status_code, result.json()["reason"]) == (400, "bad_path")
    # a SCRIPT_NAME the middleware was not mounted at is refused (servers may take it from a header)
    result = run(wrapped, environ_for(path="/c_1", SCRIPT_NAME="/charges", HTTP_AUTHORIZATION=auth))
    assert (result.status_code, result.json()["reason"]) == (400, "bad_path")
    # mounted: PATH_INFO under the mount is judged
    mounted = MeshAuthMiddleware(
        app, mesh.verifier("payments"), policy=meshauth.Policy.from_dict(POLICY), mount="/charges"
    )
    result = run(mounted, environ_for(path="/c_1", SCRIPT_NAME="/charges", HTTP_AUTHORIZATION=auth))
    assert result.status_code == 200
    assert len(app.environs) == 3


def test_excluded_paths(mesh: Mesh, app: App, audit_log: Any) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), exclude=["/healthz", "/static/*"])
    assert run(wrapped, environ_for(method="GET", path="/healthz")).json() == {"caller": None}
    assert run(wrapped, environ_for(method="GET", path="/static/app.js")).status_code == 200
    assert run(wrapped, environ_for(method="GET", path="/static/../charges")).status_code == 400
    assert len(app.environs) == 2
    assert len(audit_log) == 1


def test_mutual_auth(mesh: Mesh, token: str) -> None:
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    identity = mesh.identity("payments")
    for status in ("200 OK", "500 Internal Server Error"):
        app = App(status)
        wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=identity)
        result = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_MESHAUTH_NONCE=NONCE))
        assert result.status == status
        proof = checker.verify_response(
            result.headers["meshauth-response"], service="payments", nonce=NONCE, status=int(status[:3])
        )
        assert proof.claims["body_sha256"] == body_digest(result.body)
        assert app.bodies[0].closed
    app = App()
    wrapped = MeshAuthMiddleware(
        app, mesh.verifier("payments"), identity=identity, policy=meshauth.Policy.from_dict(POLICY)
    )
    unauthenticated = run(wrapped, environ_for(HTTP_MESHAUTH_NONCE=NONCE))
    assert unauthenticated.status_code == 401
    proof = checker.verify_response(
        unauthenticated.headers["meshauth-response"], service="payments", nonce=NONCE, status=401
    )
    assert proof.claims["aud"] == "-"  # the request named no caller
    assert proof.claims["body_sha256"] == body_digest(unauthenticated.body)
    denied = run(wrapped, environ_for(method="PUT", HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_MESHAUTH_NONCE=NONCE))
    assert denied.status_code == 403
    checker.verify_response(denied.headers["meshauth-response"], service="payments", nonce=NONCE)
    no_nonce = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert no_nonce.status_code == 200
    assert "meshauth-response" not in no_nonce.headers
    for bad in ("a b", "x" * 257, f"{NONCE},{NONCE}"):
        result = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_MESHAUTH_NONCE=bad))
        assert (result.status, result.json()) == (
            "400 Bad Request",
            {"error": "invalid_request", "reason": "invalid_nonce"},
        )
    assert len(app.environs) == 1


def test_exc_info_passes_through_start_response(mesh: Mesh, token: str) -> None:
    """An app that fails after start_response calls it again with exc_info (PEP 3333)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"failed"]

    calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        calls.append((status, headers, exc_info))
        return lambda data: None

    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    body = wrapped(environ_for(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_MESHAUTH_NONCE=NONCE), start_response)
    assert list(body) == [b"failed"]
    # The body is held to be signed, so no header had gone out: only the final status is sent, signed.
    assert [c[0] for c in calls] == ["500 Internal Server Error"]
    assert any(k == "Meshauth-Response" for k, _ in calls[0][1])


def test_on_error_hook(mesh: Mesh, app: App) -> None:
    def on_error(exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
        return 418, [("Content-Type", "text/plain")], b"no"

    result = run(MeshAuthMiddleware(app, mesh.verifier("payments"), on_error=on_error), environ_for())
    assert (result.status, result.body) == ("418 I'm a Teapot", b"no")
    unknown = MeshAuthMiddleware(app, mesh.verifier("payments"), on_error=lambda exc: (599, [], b""))
    assert run(unknown, environ_for()).status == "599 Error"
    assert not app.called


def test_spans(mesh: Mesh, app: App, token: str, telemetry: Any) -> None:
    verifier = mesh.verifier("payments", tracer_provider=telemetry.tracer_provider)
    wrapped = MeshAuthMiddleware(app, verifier, policy=meshauth.Policy.from_dict(POLICY))
    run(wrapped, environ_for(HTTP_AUTHORIZATION="Bearer a.b.c"))
    [verify_span] = telemetry.spans("meshauth.verify")
    assert verify_span.status.status_code == StatusCode.ERROR
    run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}"))
    [authorize] = telemetry.spans("meshauth.authorize")
    assert (authorize.attributes["meshauth.caller"], authorize.attributes["meshauth.outcome"]) == ("orders", "accepted")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    servers: list[tuple[WSGIServer, threading.Thread]] = []

    def start(wsgi_app: Any) -> str:
        server = make_server("127.0.0.1", 0, wsgi_app, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_real_server_on_loopback(mesh: Mesh, app: App, token: str, serve: Callable[[Any], str]) -> None:
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"), identity=mesh.identity("payments"))
    base = serve(wrapped)
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    with httpx.Client(base_url=base, timeout=10) as http:
        ok = http.post("/charges", headers={"Authorization": f"Bearer {token}", "Meshauth-Nonce": NONCE})
        assert ok.json() == {"caller": "orders"}
        checker.verify_response(ok.headers["meshauth-response"], service="payments", nonce=NONCE)
        twice = http.post("/charges", headers=[("Authorization", f"Bearer {token}")] * 2)
        assert (twice.status_code, twice.json()["reason"]) == (401, "duplicate_authorization")
        missing = http.get("/charges")
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, REALM)
    assert len(app.environs) == 1


def test_txn_token_header(mesh: Mesh, app: App, audit_log: Any) -> None:
    txn = mesh.identity("gateway").issue_txn_token("alice")
    token = mesh.identity("gateway").token_for("payments", txn_token=txn)
    wrapped = MeshAuthMiddleware(app, mesh.verifier("payments"))
    inside = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_TXN_TOKEN=txn))
    assert inside.status == "200 OK"
    principal = app.environs[0]["meshauth.principal"]
    assert (principal.subject, principal.txn_issuer, principal.txn_token) == ("alice", "gateway", txn)
    # Two Txn-Token headers arrive folded with a comma (PEP 3333): malformed.
    folded = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_TXN_TOKEN=f"{txn},{txn}"))
    assert folded.status.startswith("401") and folded.json()["reason"] == "malformed"
    # The bound token without its Txn-Token.
    missing = run(wrapped, environ_for(HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert missing.json()["reason"] == "missing_txn_token"
    assert [r.meshauth["transaction"] for r in audit_log] == [principal.transaction, None, None]
    audit_log.assert_no_secret(txn)
