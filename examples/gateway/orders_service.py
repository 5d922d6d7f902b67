"""The upstream "orders" service: meshauth middleware in front of an app that says who called.

python orders_service.py            # http://127.0.0.1:8001, needs keys/orders.pem's key in registry.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import uvicorn

import meshauth
from meshauth.asgi import MeshAuthMiddleware

HERE = Path(__file__).resolve().parent


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    principal = scope["meshauth.principal"]
    body = json.dumps(
        {
            "path": scope["path"],
            "subject": principal.subject,
            "caller": principal.caller,
            "transaction": principal.transaction,
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    verifier = meshauth.Verifier("orders", meshauth.JWKSFile(HERE / "registry.json"))
    # End users' calls arrive delegated; only the gateway may delegate.
    policy = meshauth.Policy.from_dict({"default": "allow", "delegators": ["gateway"]})
    uvicorn.run(MeshAuthMiddleware(app, verifier, policy=policy), host="127.0.0.1", port=8001, access_log=False)


if __name__ == "__main__":
    main()
