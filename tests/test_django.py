"""meshauth.django: the middleware (sync and async) and the REST framework class, with Django's test client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

django = pytest.importorskip("django")
from django.conf import settings  # noqa: E402 - after the importorskip
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

import meshauth  # noqa: E402
from meshauth._jws import body_digest  # noqa: E402
from meshauth.testing import Mesh  # noqa: E402

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="meshauth-tests-only",
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=["rest_framework"],
        MIDDLEWARE=[],
        ROOT_URLCONF=__name__,
        USE_TZ=True,
        REST_FRAMEWORK={
            "DEFAULT_AUTHENTICATION_CLASSES": [],
            "DEFAULT_PERMISSION_CLASSES": [],
            "UNAUTHENTICATED_USER": None,
        },
    )
    django.setup()

from rest_framework.permissions import IsAuthenticated  # noqa: E402
from rest_framework.response import Response  # noqa: E402
from rest_framework.views import APIView  # noqa: E402

from meshauth.django import MeshAuthentication, ServiceUser  # noqa: E402

MIDDLEWARE = ["meshauth.django.MeshAuthMiddleware"]
POLICY = {"rules": [{"callers": ["orders"], "methods": ["POST", "GET"], "paths": ["/charges", "/charges/*"]}]}


def whoami(request: HttpRequest, **route: str) -> JsonResponse:
    return JsonResponse({"caller": request.principal.caller})  # type: ignore[attr-defined]


async def awhoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"caller": request.principal.caller, "async": True})  # type: ignore[attr-defined]


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True, "principal": hasattr(request, "principal")})


class Charges(APIView):  # type: ignore[misc]
    authentication_classes = (MeshAuthentication,)
    permission_classes = (IsAuthenticated,)

    def get(self, request: Any) -> Response:
        assert isinstance(request.user, ServiceUser)
        return Response({"user": request.user.username, "caller": request.auth.caller})


urlpatterns = [
    path("charges", whoami),
    path("charges/<str:charge>", whoami),
    path("async/charges", awhoami),
    path("healthz", healthz),
    path("api/charges", Charges.as_view()),
]


@pytest.fixture
def live() -> Mesh:
    return Mesh(["orders", "payments", "billing"])


@pytest.fixture
def configure(live: Mesh) -> Iterator[Any]:
    """Apply MESHAUTH settings for one test (the middleware reads them when the client builds its chain)."""
    stack: list[Any] = []

    def apply(middleware: list[str] | None = None, **meshauth_settings: Any) -> None:
        config = {"VERIFIER": live.verifier("payments"), "EXCLUDE": ["/healthz"], **meshauth_settings}
        override = override_settings(MIDDLEWARE=MIDDLEWARE if middleware is None else middleware, MESHAUTH=config)
        override.enable()
        stack.append(override)

    yield apply
    for override in reversed(stack):
        override.disable()


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def test_principal_on_the_request(live: Mesh, configure: Any, audit_log: Any) -> None:
    configure()
    response = Client().post("/charges", **bearer(live.identity("orders").token_for("payments")))
    assert response.status_code == 200 and response.json() == {"caller": "orders"}
    [record] = audit_log.records()
    assert (record.meshauth["outcome"], record.meshauth["caller"], record.meshauth["path"]) == (
        "accepted",
        "orders",
        "/charges",
    )


def test_refusals_match_the_asgi_middleware(live: Mesh, configure: Any, audit_log: Any) -> None:
    configure()
    client = Client()
    missing = client.get("/charges")
    assert missing.status_code == 401
    assert missing.json() == {"error": "unauthorized", "reason": "missing_credentials"}
    assert missing["WWW-Authenticate"] == 'Bearer realm="payments"'
    expired = live.identity("orders").mint("payments", ttl=10)
    live.clock.advance(120)
    refused = client.get("/charges", **bearer(expired))
    assert refused.status_code == 401
    assert refused.json() == {"error": "invalid_token", "reason": "expired"}
    assert refused["WWW-Authenticate"] == 'Bearer realm="payments", error="invalid_token", error_description="expired"'
    assert [r.meshauth["reason"] for r in audit_log.records()] == ["missing_credentials", "expired"]


def test_policy_denial_and_unavailable_registry(live: Mesh, configure: Any, down_keys: Any) -> None:
    configure(POLICY=meshauth.Policy.from_dict(POLICY))
    billing = live.identity("billing").token_for("payments")
    denied = Client().get("/charges/c_1", **bearer(billing))
    assert denied.status_code == 403 and denied.json() == {"error": "forbidden", "reason": "no_matching_rule"}
    allowed = Client().get("/charges/c_1", **bearer(live.identity("orders").token_for("payments")))
    assert allowed.status_code == 200
    configure(VERIFIER=meshauth.Verifier("payments", down_keys))
    unavailable = Client().get("/charges", **bearer(billing))
    assert unavailable.status_code == 503 and unavailable["Retry-After"] == "5"
    assert unavailable.json() == {"error": "temporarily_unavailable", "reason": "keys_unavailable"}


@pytest.mark.parametrize("raw", ["/charges/../healthz", "/charges/%2e%2e/healthz", "/charges//c_1", "/charges/./c"])
def test_paths_that_would_be_rewritten_are_refused(live: Mesh, configure: Any, raw: str) -> None:
    configure(POLICY=meshauth.Policy.from_dict(POLICY))
    response = Client().get(raw, **bearer(live.identity("orders").token_for("payments")))
    assert response.status_code == 400
    assert response.json() == {"error": "bad_request", "reason": "bad_path"}


def test_excluded_path_and_settings_by_dotted_path(live: Mesh, configure: Any) -> None:
    configure(VERIFIER=f"{__name__}.make_verifier")
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True, "principal": False}
    assert Client().get("/charges").status_code == 401


def make_verifier() -> meshauth.Verifier:
    return Mesh(["payments"]).verifier("payments")


def test_mutual_auth_signs_the_response(live: Mesh, configure: Any) -> None:
    configure(IDENTITY=live.identity("payments"))
    nonce = "django-nonce-0123456789"
    response = Client().get(
        "/charges", HTTP_MESHAUTH_NONCE=nonce, **bearer(live.identity("orders").token_for("payments"))
    )
    assert response.status_code == 200
    checker = meshauth.ResponseVerifier("orders", live.keys, clock=live.clock)
    proof = checker.verify_response(response["Meshauth-Response"], service="payments", nonce=nonce, status=200)
    assert proof.claims["body_sha256"] == body_digest(response.content)
    # a refusal (no token at all) is signed too, addressed to no caller
    refused = Client().get("/charges", HTTP_MESHAUTH_NONCE=nonce)
    assert refused.status_code == 401
    proof = checker.verify_response(refused["Meshauth-Response"], service="payments", nonce=nonce, status=401)
    assert (proof.claims["aud"], proof.claims["body_sha256"]) == ("-", body_digest(refused.content))


def test_async_views(live: Mesh, configure: Any) -> None:
    configure()
    token = live.identity("orders").token_for("payments")

    async def go() -> tuple[Any, Any]:
        client = AsyncClient()
        authorized = await client.get("/async/charges", headers={"Authorization": f"Bearer {token}"})
        return authorized, await client.get("/async/charges")

    accepted, refused = asyncio.run(go())
    assert accepted.status_code == 200 and json.loads(accepted.content) == {"caller": "orders", "async": True}
    assert refused.status_code == 401 and json.loads(refused.content)["reason"] == "missing_credentials"


def test_missing_settings_are_named(configure: Any) -> None:
    with override_settings(MIDDLEWARE=MIDDLEWARE, MESHAUTH=None), pytest.raises(meshauth.MeshAuthError) as caught:
        Client().get("/charges")
    assert "settings.MESHAUTH is not set" in str(caught.value)
    with override_settings(MIDDLEWARE=MIDDLEWARE, MESHAUTH={"VERIFIER": 42}), pytest.raises(meshauth.MeshAuthError):
        Client().get("/charges")


# -- REST framework ----------------------------------------------------------------------


def test_drf_authentication_verifies_the_token(live: Mesh, configure: Any) -> None:
    configure(middleware=[])
    response = Client().get("/api/charges", **bearer(live.identity("orders").token_for("payments")))
    assert response.status_code == 200 and response.json() == {"user": "orders", "caller": "orders"}


def test_drf_refusals(live: Mesh, configure: Any, down_keys: Any) -> None:
    configure(middleware=[])
    client = Client()
    missing = client.get("/api/charges")
    assert missing.status_code == 401 and missing["WWW-Authenticate"] == 'Bearer realm="payments"'
    wrong = client.get("/api/charges", **bearer(live.identity("orders").token_for("billing")))
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid_token", "reason": "wrong_audience"}
    assert 'error_description="wrong_audience"' in wrong["WWW-Authenticate"]
    configure(middleware=[], VERIFIER=meshauth.Verifier("payments", down_keys))
    unavailable = client.get("/api/charges", **bearer(live.identity("orders").token_for("payments")))
    assert unavailable.status_code == 503
    assert unavailable.json() == {"error": "temporarily_unavailable", "reason": "keys_unavailable"}


def test_drf_reuses_the_middlewares_principal(live: Mesh, configure: Any, audit_log: Any) -> None:
    configure()
    response = Client().get("/api/charges", **bearer(live.identity("orders").token_for("payments")))
    assert response.status_code == 200 and response.json() == {"user": "orders", "caller": "orders"}
    assert len(audit_log.records()) == 1, "verified once, by the middleware"


def teapot(exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
    return 418, [("Content-Type", "text/plain")], f"refused: {type(exc).__name__}".encode()


def test_on_error_hook_by_dotted_path(live: Mesh, configure: Any) -> None:
    configure(ON_ERROR=f"{__name__}.teapot")
    response = Client().get("/charges")
    assert (response.status_code, response.content) == (418, b"refused: MissingCredentials")
    configure(ON_ERROR=42)
    with pytest.raises(meshauth.MeshAuthError, match="ON_ERROR"):
        Client().get("/charges")


def test_under_a_real_asgi_server(live: Mesh, configure: Any, serve_asgi: Any) -> None:
    import httpx
    from django.core.asgi import get_asgi_application

    configure(POLICY=meshauth.Policy.from_dict(POLICY))
    url = serve_asgi(get_asgi_application(), lifespan="off")
    auth = meshauth.ServiceAuth(live.identity("orders"), audience="payments")
    with httpx.Client(auth=auth, base_url=url) as client:
        outside_policy = client.get("/async/charges")
        sync_view = client.post("/charges/c_1")
        climbing = client.get("/charges/%2e%2e/healthz")
    assert outside_policy.status_code == 403  # the policy covers /charges only
    assert sync_view.status_code == 200 and sync_view.json() == {"caller": "orders"}
    assert climbing.status_code == 400 and climbing.json()["reason"] == "bad_path"


def test_txn_token_header(live: Mesh, configure: Any) -> None:
    configure(VERIFIER=meshauth.Verifier("payments", live.keys, txn_issuers=("billing",), clock=live.clock))
    txn = live.identity("billing").issue_txn_token("alice")
    token = live.identity("orders").token_for("payments", txn_token=txn)
    response = Client().post("/charges", HTTP_TXN_TOKEN=txn, **bearer(token))
    assert response.status_code == 200 and response.json() == {"caller": "orders"}
    folded = Client().post("/charges", HTTP_TXN_TOKEN=f"{txn},{txn}", **bearer(token))
    assert (folded.status_code, folded.json()["reason"]) == (401, "malformed")
    unbound = Client().post("/charges", HTTP_TXN_TOKEN=txn, **bearer(live.identity("orders").token_for("payments")))
    assert (unbound.status_code, unbound.json()["reason"]) == (401, "txn_mismatch")
