"""A service still on ``requests`` calls a meshauth-protected WSGI service over loopback.

Run: python examples/requests_client.py   (needs: pip install '.[requests]')
"""

from __future__ import annotations

import json
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import requests

from meshauth.requests import ServiceAuth
from meshauth.testing import Mesh
from meshauth.wsgi import MeshAuthMiddleware

# Throw-away keys for the demo; a service loads its own with ServiceIdentity.from_env().
MESH = Mesh(["orders", "payments"])


def payments(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    caller = environ["meshauth.principal"].caller
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"charged_for": caller}).encode()]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    app = MeshAuthMiddleware(payments, MESH.verifier("payments"))
    server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_port}"
    try:
        with requests.Session() as session:
            # The audience by host, as for meshauth.ServiceAuth on httpx.
            session.auth = ServiceAuth(MESH.identity("orders"), audience={host: "payments"})
            response = session.post(f"http://{host}/charges", json={"amount": 42}, timeout=10)
            print(f"orders -> payments: {response.status_code} {response.json()}")
        response = requests.post(f"http://{host}/charges", timeout=10)
        print(f"no credentials: {response.status_code} {response.json()}")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
