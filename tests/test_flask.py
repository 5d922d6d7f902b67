"""meshauth.flask (MeshAuth, require, current_principal), and the two example services in-process."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from flask import Flask, g
from txn_support import in_transaction

import meshauth
from meshauth.flask import MeshAuth, current_principal, require
from meshauth.testing import Mesh

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def build(mesh: Mesh, **options: Any) -> tuple[Flask, list[str]]:
    app = Flask("payments")
    auth = MeshAuth(app, verifier=mesh.verifier("payments"), exclude=["/healthz", "/public/*"], **options)
    handled: list[str] = []

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        handled.append("whoami")
        principal = g.meshauth_principal
        return {"caller": principal.caller, "subject": principal.subject}

    @app.post("/charges")
    @auth.require(callers=["orders", "billing-*"], scopes=["charges:write"])
    def charge() -> dict[str, Any]:
        handled.append("charge")
        principal = current_principal()
        assert principal is not None
        return {"charged_by": principal.caller}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        handled.append("healthz")
        return {"ok": True, "principal": g.meshauth_principal is not None}

    @app.get("/public/needs-auth")
    @require()
    def misconfigured() -> dict[str, Any]:
        handled.append("misconfigured")
        return {}

    return app, handled


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_principal_in_g(mesh: Mesh) -> None:
    app, handled = build(mesh)
    response = app.test_client().get("/whoami", headers=in_transaction(mesh, "orders", "payments"))
    assert response.get_json() == {"caller": "orders", "subject": "alice"}
    assert handled == ["whoami"]


def test_middleware_refuses_before_flask_routes(mesh: Mesh) -> None:
    app, handled = build(mesh)
    response = app.test_client().get("/whoami", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="payments", error="invalid_token", error_description="wrong_scheme"'
    )
    assert response.get_json() == {"error": "invalid_token", "reason": "wrong_scheme"}
    assert handled == []


def test_require_checks_callers_and_scopes(mesh: Mesh) -> None:
    app, handled = build(mesh)
    client = app.test_client()
    ok = mesh.identity("orders").mint("payments", scope="charges:write")
    assert client.post("/charges", headers=auth_header(ok)).get_json() == {"charged_by": "orders"}

    unscoped = client.post("/charges", headers=auth_header(mesh.identity("orders").token_for("payments")))
    assert unscoped.status_code == 403
    assert unscoped.headers["WWW-Authenticate"] == (
        'Bearer realm="payments", error="insufficient_scope", scope="charges:write"'
    )
    assert unscoped.get_json() == {"error": "insufficient_scope", "reason": "insufficient_scope"}

    stranger = client.post(
        "/charges", headers=auth_header(mesh.identity("gateway").mint("payments", scope="charges:write"))
    )
    assert stranger.status_code == 403
    assert "WWW-Authenticate" not in stranger.headers
    assert stranger.get_json() == {"error": "forbidden", "reason": "caller_not_allowed"}
    assert handled == ["charge"]


def test_excluded_paths(mesh: Mesh) -> None:
    app, handled = build(mesh)
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"ok": True, "principal": False}
    response = client.get("/public/needs-auth")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="payments"'
    assert response.get_json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert handled == ["healthz"]


def test_mutual_auth_and_policy_through_the_extension(mesh: Mesh) -> None:
    policy = meshauth.Policy.from_dict({"rules": [{"callers": ["orders"], "paths": ["/whoami"]}]})
    app, _ = build(mesh, identity=mesh.identity("payments"), policy=policy)
    client = app.test_client()
    token = mesh.identity("orders").token_for("payments")
    response = client.get("/whoami", headers={**auth_header(token), "Meshauth-Nonce": "flask-nonce-1"})
    assert response.status_code == 200
    checker = meshauth.ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    checker.verify_response(response.headers["Meshauth-Response"], service="payments", nonce="flask-nonce-1")
    assert client.post("/charges", headers=auth_header(token)).status_code == 403


def test_application_factory(mesh: Mesh) -> None:
    auth = MeshAuth(verifier=mesh.verifier("payments"))
    app = Flask("factory")

    @app.get("/")
    def index() -> dict[str, Any]:
        principal = current_principal()
        return {"caller": principal.caller if principal else None}

    auth.init_app(app)
    assert app.extensions["meshauth"] is auth
    token = mesh.identity("billing").token_for("payments")
    assert app.test_client().get("/", headers=auth_header(token)).get_json() == {"caller": "billing"}
    with pytest.raises(RuntimeError, match="already installed"):
        auth.init_app(app)


# -- the examples, in-process ----------------------------------------------------------------


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"meshauth_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the example's models through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def examples() -> Iterator[tuple[ModuleType, ModuleType]]:
    payments, orders = _load_example("payments_asgi"), _load_example("orders_wsgi")
    yield payments, orders
    for module in (payments, orders):
        sys.modules.pop(module.__name__, None)


class SyncASGITransport(httpx.BaseTransport):
    """Lets a sync httpx client (orders, a WSGI app) call an ASGI app (payments) in-process."""

    def __init__(self, app: Any) -> None:
        self._transport = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go() -> httpx.Response:
            response = await self._transport.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run(go())


def test_examples_in_process(examples: tuple[ModuleType, ModuleType]) -> None:
    payments_example, orders_example = examples
    mesh = Mesh(["orders", "payments", "storefront"])
    payments_app = payments_example.create_app(mesh.identity("payments"), mesh.keys, clock=mesh.clock)
    orders_app = orders_example.create_app(
        mesh.identity("orders"),
        mesh.keys,
        payments_url="http://payments.internal",
        payments_transport=SyncASGITransport(payments_app),
        clock=mesh.clock,
    )
    storefront = meshauth.ServiceAuth(mesh.identity("storefront"), audience="orders", verify_responses=mesh.keys)
    with httpx.Client(transport=httpx.WSGITransport(app=orders_app), base_url="http://orders.internal") as client:
        placed = client.post("/orders", json={"amount_cents": 1250}, auth=storefront)
        assert placed.status_code == 201
        body = placed.json()
        assert body["placed_by"] == "storefront"
        assert body["charge"]["requested_by"] == "orders"
        assert body["charge"]["amount_cents"] == 1250
        assert body["charge"]["order_id"] == body["order_id"]
        assert client.get("/healthz").json() == {"ok": True}
        assert client.post("/orders").status_code == 401

    # payments' policy: only orders may charge
    with httpx.Client(transport=SyncASGITransport(payments_app), base_url="http://payments.internal") as client:
        auth = meshauth.ServiceAuth(mesh.identity("storefront"), audience="payments", verify_responses=mesh.keys)
        refused = client.post("/charges", json={"order_id": "o_1", "amount_cents": 1}, auth=auth)
        assert (refused.status_code, refused.json()) == (403, {"error": "forbidden", "reason": "no_matching_rule"})
        assert client.get("/healthz").json() == {"ok": True}


def test_example_demo_keys(
    examples: tuple[ModuleType, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payments_example, orders_example = examples
    monkeypatch.delenv("MESHAUTH_KEY_FILE", raising=False)
    monkeypatch.setenv("MESHAUTH_DEMO_DIR", str(tmp_path / "demo"))
    identity, keys = payments_example.load_identity("payments")
    assert identity.name == "payments"
    assert sorted(jwk["iss"] for jwk in keys.to_jwks()["keys"]) == ["orders", "payments", "storefront"]
    before = (tmp_path / "demo" / "registry.json").read_bytes()
    orders_identity, _ = orders_example.load_identity("orders")
    assert (tmp_path / "demo" / "registry.json").read_bytes() == before, "the second service reuses the keys"
    token = orders_identity.token_for("payments")
    assert meshauth.Verifier("payments", keys).verify(token).caller == "orders"

    monkeypatch.setenv("MESHAUTH_KEY_FILE", str(tmp_path / "demo" / "orders.pem"))
    monkeypatch.setenv("MESHAUTH_REGISTRY", str(tmp_path / "demo" / "registry.json"))
    from_env, _ = orders_example.load_identity("orders")
    assert from_env.key.kid == orders_identity.key.kid
    monkeypatch.delenv("MESHAUTH_REGISTRY")
    with pytest.raises(SystemExit, match="MESHAUTH_REGISTRY"):
        orders_example.load_identity("orders")
