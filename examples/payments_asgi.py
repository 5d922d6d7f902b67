"""payments: a FastAPI service behind meshauth's ASGI middleware, with mutual auth.

Run: python examples/payments_asgi.py            (uvicorn on 127.0.0.1:8002)

Only ``orders`` may create charges (the policy below); every response to a
caller that sent a ``Meshauth-Nonce`` carries a ``Meshauth-Response`` token
signed by payments. ``/healthz`` needs no token.

Keys: with ``MESHAUTH_KEY_FILE`` set, the service name comes from
``MESHAUTH_SERVICE`` (default ``payments``), the private key from that PEM file
and the registry from the JWKS file named by ``MESHAUTH_REGISTRY``. Otherwise
demo keys for orders, payments and storefront are generated once into
``$MESHAUTH_DEMO_DIR`` (default: ``<tmp>/meshauth-demo``) with a shared
``registry.json``, so the examples find each other. See examples/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

import meshauth
from meshauth.asgi import MeshAuthMiddleware
from meshauth.fastapi import CurrentPrincipal

DEMO_SERVICES = ("orders", "payments", "storefront")

POLICY = {
    "default": "deny",
    "rules": [
        {"callers": ["orders"], "methods": ["POST"], "paths": ["/charges"]},
        {"callers": ["orders"], "methods": ["GET"], "paths": ["/charges/*"]},
    ],
}


class ChargeRequest(BaseModel):
    order_id: str
    amount_cents: int


def create_app(
    identity: meshauth.ServiceIdentity,
    keys: meshauth.KeySource,
    *,
    clock: Callable[[], float] = time.time,
) -> MeshAuthMiddleware:
    """The payments ASGI app: FastAPI routes wrapped in the meshauth middleware."""
    api = FastAPI(title="payments")
    charges: dict[str, dict[str, Any]] = {}

    @api.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @api.post("/charges", status_code=201)
    def create_charge(charge: ChargeRequest, principal: CurrentPrincipal) -> dict[str, Any]:
        charge_id = f"ch_{secrets.token_hex(6)}"
        charges[charge_id] = {
            "id": charge_id,
            "order_id": charge.order_id,
            "amount_cents": charge.amount_cents,
            "requested_by": principal.caller,
            "on_behalf_of": principal.subject,
        }
        return charges[charge_id]

    @api.get("/charges/{charge_id}")
    def get_charge(charge_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
        return charges.get(charge_id, {"id": charge_id, "status": "unknown"})

    verifier = meshauth.Verifier(identity.name, keys, clock=clock)
    return MeshAuthMiddleware(
        api,
        verifier,
        policy=meshauth.Policy.from_dict(POLICY),
        identity=identity,
        exclude=["/healthz"],
    )


# -- keys: from the environment, or a demo directory ------------------------------------


def demo_dir() -> Path:
    return Path(os.environ.get("MESHAUTH_DEMO_DIR") or Path(tempfile.gettempdir()) / "meshauth-demo")


def ensure_demo_keys(directory: Path) -> Path:
    """Create a key per demo service (once) and the shared registry.json; return its path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = directory / "registry.json"
    document = json.loads(registry.read_text()) if registry.exists() else {"keys": []}
    owners = {jwk.get("iss") for jwk in document["keys"]}
    changed = False
    for service in DEMO_SERVICES:
        pem = directory / f"{service}.pem"
        if not pem.exists():
            pem.write_bytes(meshauth.SigningKey.generate("ES256").to_pem())
            pem.chmod(0o600)
        if service not in owners:
            document["keys"].append(meshauth.SigningKey.from_file(pem).public_jwk(iss=service))
            changed = True
    if changed:
        # Written whole and renamed: a reader never sees half a registry.
        partial = registry.with_suffix(".json.tmp")
        partial.write_text(json.dumps(document, indent=2))
        partial.replace(registry)
    return registry


def load_identity(default_service: str) -> tuple[meshauth.ServiceIdentity, meshauth.JWKSFile]:
    """This service's identity and the shared registry (environment first, demo keys otherwise)."""
    if os.environ.get("MESHAUTH_KEY_FILE"):
        registry_path = os.environ.get("MESHAUTH_REGISTRY")
        if not registry_path:
            raise SystemExit("MESHAUTH_REGISTRY must name the registry (JWKS) file when MESHAUTH_KEY_FILE is set")
        environ = {"MESHAUTH_SERVICE": default_service, **os.environ}
        return meshauth.ServiceIdentity.from_env(environ), meshauth.JWKSFile(registry_path)
    directory = demo_dir()
    registry = ensure_demo_keys(directory)
    key = meshauth.SigningKey.from_file(directory / f"{default_service}.pem")
    return meshauth.ServiceIdentity(default_service, key), meshauth.JWKSFile(registry)


def main() -> None:
    parser = argparse.ArgumentParser(description="the payments example service")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    identity, keys = load_identity("payments")
    print(f"payments: listening on http://127.0.0.1:{args.port} (registry {keys.path})")
    uvicorn.run(create_app(identity, keys), host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
