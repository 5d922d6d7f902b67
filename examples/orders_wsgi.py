"""orders: a Flask (WSGI) service behind meshauth that calls payments with mutual auth.

Run: python examples/orders_wsgi.py              (Flask on 127.0.0.1:8001)
     python examples/orders_wsgi.py call         (place an order as the "storefront" service)

``POST /orders`` accepts calls from ``storefront`` only, then charges the
order at payments (``http://127.0.0.1:8002`` unless ``--payments-url``)
through ``meshauth.ServiceAuth``: the call carries an orders token and a
nonce, and the answer must carry a response token signed by payments.

Keys: the same environment variables as examples/payments_asgi.py
(``MESHAUTH_SERVICE``, ``MESHAUTH_KEY_FILE``, ``MESHAUTH_REGISTRY``), or the
shared demo directory ``$MESHAUTH_DEMO_DIR`` (default ``<tmp>/meshauth-demo``).
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

import httpx
from flask import Flask, request

import meshauth
from meshauth.flask import MeshAuth, current_principal

DEMO_SERVICES = ("orders", "payments", "storefront")


def create_app(
    identity: meshauth.ServiceIdentity,
    keys: meshauth.KeySource,
    *,
    payments_url: str = "http://127.0.0.1:8002",
    payments_transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """The orders Flask app; ``payments_transport`` lets tests route payments calls in-process."""
    app = Flask("orders")
    verifier = meshauth.Verifier(identity.name, keys, clock=clock)
    auth = MeshAuth(app, verifier=verifier, identity=identity, exclude=["/healthz"])
    # One client for the app's lifetime: its token is cached and refreshed by the identity.
    payments = httpx.Client(
        base_url=payments_url,
        auth=meshauth.ServiceAuth(identity, audience="payments", verify_responses=keys),
        transport=payments_transport,
        timeout=5,
    )

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/orders")
    @auth.require(callers=["storefront"])
    def place_order() -> tuple[dict[str, Any], int]:
        principal = current_principal()
        assert principal is not None  # guaranteed by @auth.require
        body = request.get_json(silent=True) or {}
        order_id = f"o_{secrets.token_hex(4)}"
        # Raises meshauth.ResponseAuthError unless payments itself answered.
        charge = payments.post(
            "/charges", json={"order_id": order_id, "amount_cents": int(body.get("amount_cents", 0))}
        )
        charge.raise_for_status()
        return {"order_id": order_id, "placed_by": principal.caller, "charge": charge.json()}, 201

    return app


# -- keys: from the environment, or a demo directory (as in payments_asgi.py) ------------------


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
        partial = registry.with_suffix(".json.tmp")
        partial.write_text(json.dumps(document, indent=2))
        partial.replace(registry)
    return registry


def load_identity(default_service: str) -> tuple[meshauth.ServiceIdentity, meshauth.JWKSFile]:
    """A service identity and the shared registry (environment first, demo keys otherwise)."""
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


def place_order(orders_url: str, amount_cents: int) -> None:
    """Act as the storefront service: call orders with a token and check who answered."""
    storefront, keys = load_identity("storefront")
    auth = meshauth.ServiceAuth(storefront, audience="orders", verify_responses=keys)
    with httpx.Client(base_url=orders_url, auth=auth, timeout=10) as client:
        response = client.post("/orders", json={"amount_cents": amount_cents})
    print(f"{response.status_code} {json.dumps(response.json(), indent=2)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="the orders example service")
    parser.add_argument("command", nargs="?", choices=["serve", "call"], default="serve")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--payments-url", default="http://127.0.0.1:8002")
    parser.add_argument("--amount-cents", type=int, default=4200)
    args = parser.parse_args()
    if args.command == "call":
        place_order(f"http://127.0.0.1:{args.port}", args.amount_cents)
        return
    identity, keys = load_identity("orders")
    print(f"orders: listening on http://127.0.0.1:{args.port} (registry {keys.path})")
    create_app(identity, keys, payments_url=args.payments_url).run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
