"""An upstream service for the gateway's end-to-end tests: meshauth middleware in front of an echo app.

Run: python tests/e2e_service.py --name orders --port 8001 --registry registry.json

Every authenticated request is answered with JSON describing what the service
saw: the verified principal, the path and query, and the trace headers. With
``--key`` and ``--call payments=URL``, a request to ``.../checkout`` first calls
``payments`` (``POST /charges``) inside the same transaction
(``ServiceAuth(on_behalf_of=principal)``) and adds its answer. ``--audit`` writes
the service's audit records to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import uvicorn

import meshauth
import meshauth.audit
from meshauth.asgi import MeshAuthMiddleware


def echo_app(name: str, identity: meshauth.ServiceIdentity | None = None, calls: dict[str, str] | None = None) -> Any:
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
        if identity is not None and calls and scope["path"].endswith("/checkout") and principal is not None:
            ((audience, url),) = calls.items()
            auth = meshauth.ServiceAuth(identity, audience, on_behalf_of=principal)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                answer = await client.post("/charges", auth=auth)
            document[audience] = answer.json() if answer.status_code == 200 else {"status": answer.status_code}
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--key", help="this service's private key, to call others")
    parser.add_argument("--call", action="append", default=[], metavar="NAME=URL", help="the service to call")
    parser.add_argument("--delegators", default="gateway", help="comma-separated callers allowed in a transaction")
    parser.add_argument("--audit", help="write audit records to this JSON-lines file")
    args = parser.parse_args()
    if args.audit:
        meshauth.audit.configure(args.audit)
    identity = meshauth.ServiceIdentity(args.name, meshauth.SigningKey.from_file(args.key)) if args.key else None
    calls = dict(item.split("=", 1) for item in args.call)
    verifier = meshauth.Verifier(args.name, meshauth.JWKSFile(args.registry))
    # Only the named services (by default the gateway) may call inside a user's transaction.
    policy = meshauth.Policy.from_dict({"default": "allow", "delegators": args.delegators.split(",")})
    app = MeshAuthMiddleware(echo_app(args.name, identity, calls), verifier, policy=policy, exclude=("/healthz",))
    uvicorn.run(app, host="127.0.0.1", port=args.port, lifespan="off", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
