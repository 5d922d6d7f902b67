"""The policy judges exactly the path the app routes, against real servers.

Each attack here once reached a handler the policy forbids: uvicorn with
Starlette and gunicorn with Flask route on the raw path, with its ``..``
segments, while the policy judged the path without them; gunicorn takes
``SCRIPT_NAME`` from a request header, and Flask routes on ``PATH_INFO``
alone. Requests are sent with ``http.client``, which sends the target as
given (httpx would remove the dot-segments before sending).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.testing import LoopbackServer

POLICY = {
    "rules": [
        {"name": "admins", "callers": ["admin"], "paths": ["/admin/**"]},
        {"name": "orders reads public", "callers": ["orders"], "methods": ["GET"], "paths": ["/public"]},
        {"name": "orders reads files", "callers": ["orders"], "methods": ["GET"], "paths": ["/files/**"]},
        {"name": "orders follows live", "callers": ["orders"], "methods": ["WEBSOCKET"], "paths": ["/live"]},
    ]
}
WEBSOCKET_MAX_AGE = 1.0
DOT_ATTACKS = ["/admin/../public", "/admin/%2e%2e/public", "/admin/.%2e/public", "/admin/x/../../public"]


class Keys:
    """Real keys and a registry file, for servers in other processes (real clocks)."""

    def __init__(self, directory: Path) -> None:
        self.keys = {name: meshauth.SigningKey.generate() for name in ("admin", "orders", "svc")}
        self.registry = directory / "registry.json"
        document = {"keys": [key.public_jwk(iss=name) for name, key in self.keys.items()]}
        self.registry.write_text(json.dumps(document))
        self.policy = directory / "policy.json"
        self.policy.write_text(json.dumps(POLICY))

    def token(self, caller: str) -> str:
        return meshauth.ServiceIdentity(caller, self.keys[caller]).token_for("svc")


def get(base: str, target: str, token: str, method: str = "GET", **headers: str) -> tuple[int, str]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, target, headers={"Authorization": f"Bearer {token}", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# -- uvicorn + Starlette ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starlette_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Keys]]:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def admin(request: Request) -> PlainTextResponse:
        return PlainTextResponse("admin handler")

    async def public(request: Request) -> PlainTextResponse:
        return PlainTextResponse("public handler")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text("echo " + await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    keys = Keys(tmp_path_factory.mktemp("starlette"))
    app = Starlette(
        routes=[
            Route("/admin/{rest:path}", admin),
            Route("/public", public),
            WebSocketRoute("/live", echo),
            WebSocketRoute("/public", echo),
        ]
    )
    verifier = meshauth.Verifier("svc", meshauth.JWKSFile(keys.registry))
    policy = meshauth.Policy.from_file(keys.policy)
    wrapped = MeshAuthMiddleware(app, verifier, policy=policy, websocket_max_age=WEBSOCKET_MAX_AGE)
    with LoopbackServer(wrapped, lifespan="off", websockets=True) as server:
        yield server.url, keys


def test_starlette_routes_what_the_policy_allows(starlette_server: tuple[str, Keys]) -> None:
    url, keys = starlette_server
    assert get(url, "/public", keys.token("orders")) == (200, "public handler")
    assert get(url, "/admin/users", keys.token("admin")) == (200, "admin handler")
    assert get(url, "/admin/users", keys.token("orders"))[0] == 403


def test_starlette_head_is_allowed_where_get_is(starlette_server: tuple[str, Keys]) -> None:
    url, keys = starlette_server
    # A HEAD health probe against a GET rule once got 403.
    assert get(url, "/public", keys.token("orders"), method="HEAD") == (200, "")
    assert get(url, "/admin/users", keys.token("orders"), method="HEAD")[0] == 403


def test_starlette_a_get_rule_does_not_open_a_websocket(starlette_server: tuple[str, Keys]) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url, keys = starlette_server
    ws_url = url.replace("http://", "ws://")
    orders = {"Authorization": f"Bearer {keys.token('orders')}"}
    # /public has a GET rule and a websocket route: the handshake is method WEBSOCKET, refused.
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url + "/public", additional_headers=orders, open_timeout=10)
    assert refused.value.response.status_code == 403
    # A rule naming WEBSOCKET opens it; websocket_max_age closes it (1008) although the token lives on.
    with connect(ws_url + "/live", additional_headers=orders, open_timeout=10) as socket:
        socket.send("hello")
        assert socket.recv(timeout=10) == "echo hello"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert time.monotonic() - started < WEBSOCKET_MAX_AGE + 5


@pytest.mark.parametrize("target", DOT_ATTACKS)
def test_starlette_dot_segments_never_reach_the_admin_handler(starlette_server: tuple[str, Keys], target: str) -> None:
    url, keys = starlette_server
    status, body = get(url, target, keys.token("orders"))
    assert (status, json.loads(body)) == (400, {"error": "bad_request", "reason": "bad_path"})


# -- gunicorn + Flask ------------------------------------------------------------------------------

FLASK_APP = """
    import os
    from flask import Flask
    import meshauth
    from meshauth.flask import MeshAuth

    app = Flask(__name__)

    @app.get("/admin/<path:rest>")
    def admin(rest):
        return "admin handler"

    @app.get("/public")
    def public():
        return "public handler"

    @app.get("/files/<path:rest>")
    def files(rest):
        return "files handler"

    @app.get("/healthz")
    def healthz():
        return "ok"

    verifier = meshauth.Verifier("svc", meshauth.JWKSFile(os.environ["REGISTRY"]))
    MeshAuth(app, verifier=verifier, policy=meshauth.Policy.from_file(os.environ["POLICY"]), exclude=["/healthz"])
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Keys]]:
    pytest.importorskip("gunicorn")
    directory = tmp_path_factory.mktemp("gunicorn")
    keys = Keys(directory)
    (directory / "flask_app.py").write_text(textwrap.dedent(FLASK_APP))
    port = _free_port()
    env: dict[str, Any] = {**os.environ, "REGISTRY": str(keys.registry), "POLICY": str(keys.policy)}
    # Default forwarded_allow_ips (127.0.0.1): the SCRIPT_NAME header is honoured, as behind a sidecar.
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    process = subprocess.Popen(
        [*command, "--chdir", str(directory), "flask_app:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(url, "/healthz", "x")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not start: " + process.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
            time.sleep(0.1)
        yield url, keys
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()


def test_flask_routes_what_the_policy_allows(gunicorn_server: tuple[str, Keys]) -> None:
    url, keys = gunicorn_server
    assert get(url, "/public", keys.token("orders")) == (200, "public handler")
    assert get(url, "/files/report.pdf", keys.token("orders")) == (200, "files handler")
    assert get(url, "/admin/users", keys.token("admin")) == (200, "admin handler")
    assert get(url, "/admin/users", keys.token("orders"))[0] == 403


def test_flask_head_is_allowed_where_get_is(gunicorn_server: tuple[str, Keys]) -> None:
    url, keys = gunicorn_server
    assert get(url, "/public", keys.token("orders"), method="HEAD") == (200, "")
    assert get(url, "/admin/users", keys.token("orders"), method="HEAD")[0] == 403


@pytest.mark.parametrize("target", DOT_ATTACKS)
def test_flask_dot_segments_never_reach_the_admin_handler(gunicorn_server: tuple[str, Keys], target: str) -> None:
    url, keys = gunicorn_server
    status, body = get(url, target, keys.token("orders"))
    assert (status, json.loads(body)) == (400, {"error": "bad_request", "reason": "bad_path"})


def test_flask_judges_gunicorns_raw_uri(gunicorn_server: tuple[str, Keys]) -> None:
    url, keys = gunicorn_server
    # gunicorn decodes PATH_INFO to /files/a/b; only RAW_URI (it sets no REQUEST_URI) still shows the %2F.
    status, body = get(url, "/files/a%2Fb", keys.token("orders"))
    assert (status, json.loads(body)) == (400, {"error": "bad_request", "reason": "bad_path"})
    assert get(url, "/files/a/b", keys.token("orders")) == (200, "files handler")


def test_flask_a_script_name_header_cannot_move_the_judged_path(gunicorn_server: tuple[str, Keys]) -> None:
    url, keys = gunicorn_server
    # gunicorn strips SCRIPT_NAME from PATH_INFO and Flask routes /admin/x; /files/** must not open it.
    status, body = get(url, "/files/admin/x", keys.token("orders"), SCRIPT_NAME="/files")
    assert (status, json.loads(body)) == (400, {"error": "bad_request", "reason": "bad_path"})
