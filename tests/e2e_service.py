"""An upstream service for the gateway's end-to-end tests: meshauth middleware in front of an echo app.

Run: python tests/e2e_service.py --name orders --port 8001 --registry registry.json

Every authenticated request is answered with JSON describing what the service
saw: the verified principal, the path and query, and the trace headers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn

import meshauth
from meshauth.asgi import MeshAuthMiddleware


def echo_app(name: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        principal = scope.get("meshauth.principal")
        document = {
            "service": name,
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "traceparent": headers.get("traceparent"),
            "x_forwarded_for": headers.get("x-forwarded-for"),
            "leaked_user_token": "x-forwarded-authorization" in headers,
        }
        if principal is not None:
            document.update(
                caller=principal.caller,
                subject=principal.subject,
                transaction=principal.transaction,
                txn_issuer=principal.txn_issuer,
                scopes=sorted(principal.scopes),
            )
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--registry", required=True)
    args = parser.parse_args()
    verifier = meshauth.Verifier(args.name, meshauth.JWKSFile(args.registry))
    # Only the gateway may call on behalf of end users.
    policy = meshauth.Policy.from_dict({"default": "allow", "delegators": ["gateway"]})
    app = MeshAuthMiddleware(echo_app(args.name), verifier, policy=policy, exclude=("/healthz",))
    uvicorn.run(app, host="127.0.0.1", port=args.port, lifespan="off", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
