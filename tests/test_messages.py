"""Messages outside the verifier name the values a person needs to fix the problem."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshauth
from meshauth._challenge import read_challenge
from meshauth.asgi import MeshAuthMiddleware
from meshauth.cli import main
from meshauth.testing import Mesh


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps({"caller": scope["meshauth.principal"].caller}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def test_key_file_variable_unset_names_it_and_keygen() -> None:
    with pytest.raises(meshauth.ConfigurationError) as caught:
        meshauth.ServiceIdentity.from_env({"MESHAUTH_SERVICE": "orders"})
    message = str(caught.value)
    assert "MESHAUTH_KEY_FILE is not set" in message
    assert "meshauth keygen --service orders" in message


def test_service_variable_unset_is_named() -> None:
    with pytest.raises(meshauth.ConfigurationError, match="MESHAUTH_SERVICE is not set"):
        meshauth.ServiceIdentity.from_env({"MESHAUTH_KEY_FILE": "keys/orders.pem"})


def test_missing_key_file_names_path_and_keygen(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "orders.pem"
    with pytest.raises(meshauth.ConfigurationError) as caught:
        meshauth.ServiceIdentity.from_env({"MESHAUTH_SERVICE": "orders", "MESHAUTH_KEY_FILE": str(missing)})
    message = str(caught.value)
    assert str(missing) in message and "does not exist" in message
    assert f"meshauth keygen --service orders --out {missing.parent}" in message
    assert caught.value.reason == "invalid_key"


def test_registry_add_refuses_an_expired_key_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = tmp_path / "registry.json"
    key = tmp_path / "orders.pem"
    key.write_bytes(meshauth.SigningKey.generate().to_pem())
    add = ["registry", "add", str(registry), "--key", str(key), "--service", "orders", "--exp", "2020-01-01"]
    assert main(add) == 2
    err = capsys.readouterr().err
    assert "--exp 2020-01-01T00:00:00Z" in err and "in the past" in err and "--force" in err
    assert not registry.exists()
    assert main([*add, "--force"]) == 0
    assert json.loads(registry.read_text())["keys"][0]["exp"] == 1577836800


def test_missing_response_asks_about_the_callees_identity(serve_asgi: Callable[..., str]) -> None:
    # A real-time mesh: the loopback callee's middleware and the caller share the wall clock.
    live = Mesh(["orders", "payments"])
    url = serve_asgi(MeshAuthMiddleware(_hello, live.verifier("payments")), lifespan="off")
    auth = meshauth.ServiceAuth(live.identity("orders"), audience="payments", verify_responses=live.keys)
    with httpx.Client(auth=auth) as client, pytest.raises(meshauth.ResponseAuthError) as caught:
        client.get(url + "/charges")
    assert caught.value.reason == "missing_response"
    assert "did the callee's middleware get identity=?" in str(caught.value)
    assert "'payments'" in str(caught.value)


def test_wrong_audience_names_realm_and_audience_and_is_not_retried(
    serve_asgi: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    live = Mesh(["orders", "payments", "billing"])
    seen: list[str] = []

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await app(scope, receive, send)

    app = MeshAuthMiddleware(_hello, live.verifier("billing"))
    url = serve_asgi(counting, lifespan="off")
    auth = meshauth.ServiceAuth(live.identity("orders"), audience="payments")
    with caplog.at_level(logging.WARNING, logger="meshauth"), httpx.Client(auth=auth) as client:
        response = client.get(url + "/charges")
    assert response.status_code == 401
    assert seen == ["/charges"], "a wrong audience is not cured by a new token: no retry"
    warnings = [r.getMessage() for r in caplog.records if r.name == "meshauth" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "realm 'billing'" in warnings[0] and "audience 'payments'" in warnings[0]
    assert "wrong_audience" in warnings[0] and "ServiceAuth" in warnings[0]


@pytest.mark.parametrize("reason", ["expired", "unknown_kid", "key_expired", "replayed", "bad_signature"])
def test_curable_reasons_are_retried(reason: str) -> None:
    challenge = read_challenge([f'Bearer realm="payments", error="invalid_token", error_description="{reason}"'])
    assert challenge.curable and challenge.realm == "payments" and challenge.reason == reason


@pytest.mark.parametrize("reason", ["wrong_audience", "not_yet_valid", "lifetime_too_long", "issuer_mismatch"])
def test_other_reasons_are_not_retried(reason: str) -> None:
    challenge = read_challenge([f'Bearer realm="payments", error="invalid_token", error_description="{reason}"'])
    assert challenge.invalid_token and not challenge.curable
