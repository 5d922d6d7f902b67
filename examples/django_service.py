"""A Django service (plain view and REST framework view) behind meshauth, called over loopback.

Run: python examples/django_service.py   (needs: pip install '.[drf]')

Everything lives in this one file so it runs as is: a real project puts the
``MESHAUTH`` and ``MIDDLEWARE`` settings in ``settings.py`` and the views in an app.
"""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import django
import httpx
from django.conf import settings

import meshauth
from meshauth.testing import Mesh

# Throw-away keys for the demo; a service loads its own with ServiceIdentity.from_env().
MESH = Mesh(["orders", "payments", "billing"])

settings.configure(
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["rest_framework"],
    MIDDLEWARE=["meshauth.django.MeshAuthMiddleware"],
    MESHAUTH={
        "VERIFIER": MESH.verifier("payments"),
        "POLICY": meshauth.Policy.from_dict(
            {"rules": [{"callers": ["orders"], "methods": ["GET", "POST"], "paths": ["/charges", "/api/charges"]}]}
        ),
        "EXCLUDE": ["/healthz"],
    },
    REST_FRAMEWORK={"UNAUTHENTICATED_USER": None},
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from rest_framework.permissions import IsAuthenticated  # noqa: E402
from rest_framework.request import Request  # noqa: E402
from rest_framework.response import Response  # noqa: E402
from rest_framework.views import APIView  # noqa: E402

from meshauth.django import MeshAuthentication  # noqa: E402


def charges(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"view": "django", "caller": request.principal.caller})  # type: ignore[attr-defined]


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


class ApiCharges(APIView):
    authentication_classes = (MeshAuthentication,)
    permission_classes = (IsAuthenticated,)

    def get(self, request: Request) -> Response:
        return Response({"view": "drf", "user": request.user.username, "caller": request.auth.caller})


urlpatterns = [path("charges", charges), path("api/charges", ApiCharges.as_view()), path("healthz", healthz)]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        as_orders = httpx.Client(auth=meshauth.ServiceAuth(MESH.identity("orders"), audience="payments"))
        as_billing = httpx.Client(auth=meshauth.ServiceAuth(MESH.identity("billing"), audience="payments"))
        with as_orders, as_billing:
            for client, who, route in ((as_orders, "orders", "/charges"), (as_orders, "orders", "/api/charges")):
                response = client.get(base + route)
                print(f"{who} GET {route}: {response.status_code} {response.json()}")
            response = as_billing.get(base + "/charges")
            print(f"billing GET /charges: {response.status_code} {response.json()}")
            response = httpx.get(base + "/charges")
            print(f"anonymous GET /charges: {response.status_code} {response.json()}")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
