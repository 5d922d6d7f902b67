"""The meshauth command line (meshauth.cli): every command, every exit code."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import meshauth
from meshauth.cli import main
from meshauth.cli._common import _duration, _timestamp_arg
from meshauth.testing import FakeClock

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``meshauth ARGS...`` in-process; return (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _keygen(cli: Run, out: Path, service: str, *extra: str) -> dict[str, Any]:
    code, stdout, stderr = cli("keygen", "--service", service, "--out", str(out), "--json", *extra)
    assert code == 0, stderr
    result: dict[str, Any] = json.loads(stdout)
    return result


@pytest.fixture
def orders(cli: Run, tmp_path: Path) -> dict[str, Any]:
    """Keys of service 'orders' in tmp_path/keys (the --json output of keygen)."""
    return _keygen(cli, tmp_path / "keys", "orders")


@pytest.fixture
def registry(cli: Run, tmp_path: Path, orders: dict[str, Any]) -> Path:
    """A registry file holding the orders key."""
    path = tmp_path / "registry.json"
    code, _, stderr = cli("registry", "add", str(path), orders["public_jwk"])
    assert code == 0, stderr
    return path


def _mint(cli: Run, key: dict[str, Any], *extra: str, aud: str = "payments") -> str:
    code, stdout, stderr = cli("mint", "--key", key["private_key"], "--service", key["service"], "--aud", aud, *extra)
    assert code == 0, stderr
    return stdout.strip()


def _registry_kids(path: Path) -> list[str]:
    return [jwk["kid"] for jwk in json.loads(path.read_text())["keys"]]


# -- keygen ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_keygen_writes_a_0600_private_key_and_the_public_jwk(cli: Run, tmp_path: Path, alg: str) -> None:
    code, stdout, stderr = cli("keygen", "--service", "orders", "--alg", alg, "--out", str(tmp_path / "keys"))
    assert code == 0, stderr
    pem, jwk_file = tmp_path / "keys" / "orders.pem", tmp_path / "keys" / "orders.jwk.json"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) & 0o077 == 0
    key = meshauth.SigningKey.from_file(pem)
    assert key.alg == alg
    assert json.loads(jwk_file.read_text()) == key.public_jwk(iss="orders")
    assert re.search(rf"^kid\s+{re.escape(key.kid)}$", stdout, re.MULTILINE)
    assert "PRIVATE KEY" not in stdout


def test_keygen_json_names_the_files(cli: Run, tmp_path: Path) -> None:
    result = _keygen(cli, tmp_path, "billing-eu", "--alg", "EdDSA")
    assert result == {
        "service": "billing-eu",
        "kid": meshauth.SigningKey.from_file(tmp_path / "billing-eu.pem").kid,
        "alg": "EdDSA",
        "private_key": str(tmp_path / "billing-eu.pem"),
        "public_jwk": str(tmp_path / "billing-eu.jwk.json"),
    }


def test_keygen_refuses_to_overwrite_and_force_replaces_keeping_0600(cli: Run, tmp_path: Path) -> None:
    first = _keygen(cli, tmp_path, "orders")
    pem = tmp_path / "orders.pem"
    before = pem.read_bytes()
    code, stdout, stderr = cli("keygen", "--service", "orders", "--out", str(tmp_path))
    assert code == 2
    assert "already exists" in stderr and "--force" in stderr
    assert stdout == ""
    assert pem.read_bytes() == before
    # A replaced key is 0600 even if the old file had been opened up.
    pem.chmod(0o644)
    second = _keygen(cli, tmp_path, "orders", "--force")
    assert second["kid"] != first["kid"]
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert meshauth.SigningKey.from_file(pem).kid == second["kid"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


def test_keygen_encrypts_with_a_password_from_the_environment(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERS_KEY_PASSWORD", "correct horse")
    result = _keygen(cli, tmp_path, "orders", "--password-env", "ORDERS_KEY_PASSWORD")
    with pytest.raises(meshauth.ConfigurationError):
        meshauth.SigningKey.from_file(result["private_key"])
    assert meshauth.SigningKey.from_file(result["private_key"], "correct horse").kid == result["kid"]
    # mint reads the same variable
    token = _mint(cli, result, "--password-env", "ORDERS_KEY_PASSWORD")
    assert token.count(".") == 2
    code, _, stderr = cli("mint", "--key", result["private_key"], "--service", "orders", "--aud", "payments")
    assert code == 2
    assert "error:" in stderr


def test_keygen_usage_errors(cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_PASSWORD_VAR", raising=False)
    code, _, stderr = cli("keygen", "--service", "../evil", "--out", str(tmp_path))
    assert code == 2
    assert "a service name is" in stderr
    code, _, stderr = cli("keygen", "--service", "x", "--out", str(tmp_path), "--password-env", "NO_SUCH_PASSWORD_VAR")
    assert code == 2
    assert "NO_SUCH_PASSWORD_VAR" in stderr
    code, _, stderr = cli("keygen", "--service", "x", "--out", str(tmp_path), "--alg", "HS256")
    assert code == 2
    assert "invalid choice" in stderr
    assert list(tmp_path.iterdir()) == []


# -- registry ----------------------------------------------------------------------------


def test_registry_add_list_remove_round_trip(cli: Run, tmp_path: Path, orders: dict[str, Any]) -> None:
    path = tmp_path / "registry.json"
    payments = _keygen(cli, tmp_path / "keys", "payments", "--alg", "EdDSA")
    code, stdout, _ = cli("registry", "add", str(path), orders["public_jwk"])
    assert code == 0
    assert f"added {orders['kid']} (orders, ES256, valid)" in stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    code, stdout, _ = cli(
        "registry", "add", str(path), "--key", payments["private_key"], "--service", "payments", "--json"
    )
    assert code == 0
    assert json.loads(stdout)["added"][0]["kid"] == payments["kid"]
    assert _registry_kids(path) == [orders["kid"], payments["kid"]]
    meshauth.StaticKeys.from_jwks(path.read_bytes())  # a document any verifier loads

    code, stdout, _ = cli("registry", "list", str(path), "--json")
    assert code == 0
    listing = json.loads(stdout)
    assert [(k["kid"], k["service"], k["alg"], k["status"]) for k in listing["keys"]] == [
        (orders["kid"], "orders", "ES256", "valid"),
        (payments["kid"], "payments", "EdDSA", "valid"),
    ]
    code, stdout, _ = cli("registry", "list", str(path))
    assert code == 0
    header, *rows = stdout.splitlines()
    assert header.split() == ["KID", "SERVICE", "ALG", "STATUS", "NOT", "BEFORE", "EXPIRES"]
    assert rows[1].split()[:4] == [payments["kid"], "payments", "EdDSA", "valid"]

    # "--": a kid is base64url and may start with "-", which argparse would read as an option
    code, stdout, _ = cli("registry", "remove", str(path), "--", orders["kid"])
    assert code == 0
    assert f"removed {orders['kid']} (orders)" in stdout
    assert _registry_kids(path) == [payments["kid"]]
    code, stdout, _ = cli("registry", "remove", "--json", str(path), "--", payments["kid"])
    assert json.loads(stdout) == {"file": str(path), "removed": [{"kid": payments["kid"], "service": "payments"}]}
    code, stdout, _ = cli("registry", "list", str(path))
    assert code == 0
    assert "no keys" in stdout


def test_registry_add_refuses_a_duplicate_and_leaves_the_file_alone(
    cli: Run, registry: Path, orders: dict[str, Any]
) -> None:
    before = registry.read_bytes()
    code, stdout, stderr = cli("registry", "add", str(registry), orders["public_jwk"])
    assert code == 2
    assert "already in" in stderr and orders["kid"] in stderr
    assert stdout == ""
    assert registry.read_bytes() == before


def test_registry_add_refuses_a_private_jwk(cli: Run, tmp_path: Path) -> None:
    key = meshauth.SigningKey.generate()
    secret = meshauth._jws.b64url_encode(os.urandom(32))  # shaped like a real "d"; only its presence matters
    private_jwk = {**key.public_jwk(iss="orders"), "d": secret}
    leaked = tmp_path / "leaked.jwk.json"
    leaked.write_text(json.dumps(private_jwk))
    path = tmp_path / "registry.json"
    code, stdout, stderr = cli("registry", "add", str(path), str(leaked))
    assert code == 2
    assert "private key members" in stderr and str(leaked) in stderr
    assert secret not in stdout + stderr
    assert not path.exists()


@pytest.mark.parametrize("source", ["jwk file", "--key"])
def test_registry_add_refuses_an_owner_that_is_not_a_service_name(
    cli: Run, tmp_path: Path, registry: Path, source: str
) -> None:
    """A registry entry owned by "orders*" would act as a glob in policies: refused, nothing written."""
    billing = _keygen(cli, tmp_path / "keys", "billing")
    if source == "jwk file":
        jwk = {**json.loads(Path(billing["public_jwk"]).read_text()), "iss": "orders*"}
        globbed = tmp_path / "globbed.jwk.json"
        globbed.write_text(json.dumps(jwk))
        argv = [str(globbed)]
    else:
        argv = ["--key", billing["private_key"], "--service", "orders*"]
    before = registry.read_bytes()
    for target in (registry, tmp_path / "new-registry.json"):
        code, stdout, stderr = cli("registry", "add", str(target), *argv)
        assert code == 2, stderr
        # The message names what to fix: the JWK's 'iss', or the --service option.
        named = "'iss' (owning service): a service name is" if source == "jwk file" else "--service: a service name is"
        assert named in stderr and "'orders*'" in stderr, stderr
        assert stdout == ""
    assert registry.read_bytes() == before
    assert not (tmp_path / "new-registry.json").exists()


def test_registry_add_validity_window_and_status(cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    soon = _keygen(cli, tmp_path, "soon")
    old = _keygen(cli, tmp_path, "old")
    code, _, stderr = cli("registry", "add", str(path), soon["public_jwk"], "--nbf", "+1d", "--exp", "2100-01-01")
    assert code == 0, stderr
    code, _, stderr = cli(
        "registry", "add", str(path), old["public_jwk"], "--nbf", "0", "--exp", "2001-09-09T01:46:40Z", "--force"
    )
    assert code == 0, stderr
    keys = json.loads(path.read_text())["keys"]
    assert keys[0]["exp"] == 4102444800
    assert keys[1] == {**keys[1], "nbf": 0, "exp": 1_000_000_000}
    code, stdout, _ = cli("registry", "list", str(path), "--json")
    assert [k["status"] for k in json.loads(stdout)["keys"]] == ["not-yet", "expired"]
    code, stdout, _ = cli("registry", "list", str(path))
    assert "2100-01-01T00:00:00Z" in stdout and "2001-09-09T01:46:40Z" in stdout


def test_registry_usage_errors(cli: Run, tmp_path: Path, registry: Path, orders: dict[str, Any]) -> None:
    before = registry.read_bytes()
    code, _, stderr = cli("registry", "remove", str(registry), "no-such-kid")
    assert code == 2
    assert "not in" in stderr
    code, _, stderr = cli("registry", "add", str(registry))
    assert code == 2
    assert "nothing to add" in stderr
    code, _, stderr = cli("registry", "add", str(registry), orders["public_jwk"], "--exp", "yesterday-ish")
    assert code == 2
    assert "is not a time" in stderr
    code, _, stderr = cli("registry", "add", str(registry), "--key", orders["private_key"])
    assert code == 2
    assert "--key and --service go together" in stderr
    assert registry.read_bytes() == before
    broken = tmp_path / "broken.json"
    broken.write_text('{"keys": [], "keys": []}')
    code, _, stderr = cli("registry", "add", str(broken), orders["public_jwk"])
    assert code == 2
    assert "invalid_registry" in stderr
    assert broken.read_text() == '{"keys": [], "keys": []}'
    code, _, stderr = cli("registry", "list", str(tmp_path / "missing.json"))
    assert code == 2
    assert "cannot read registry file" in stderr


def test_registry_list_shows_the_good_keys_of_a_broken_file(cli: Run, registry: Path, orders: dict[str, Any]) -> None:
    document = json.loads(registry.read_text())
    document["keys"].append({"kid": "bad", "alg": "HS256", "kty": "oct", "iss": "x"})
    registry.write_text(json.dumps(document))
    code, stdout, stderr = cli("registry", "list", str(registry))
    assert code == 0
    assert orders["kid"] in stdout
    assert "skipped an invalid entry" in stderr and "'bad'" in stderr


def test_registry_check_passes_a_healthy_registry(cli: Run, registry: Path) -> None:
    code, stdout, _ = cli("registry", "check", str(registry))
    assert code == 0
    assert "ok (0 errors, 0 warnings)" in stdout


def test_registry_check_warns_then_fails_as_the_only_key_nears_its_end(
    cli: Run, registry: Path, orders: dict[str, Any]
) -> None:
    document = json.loads(registry.read_text())
    document["keys"][0]["exp"] = int(time.time()) + 5 * 3600  # signing coverage ends in under a day
    registry.write_text(json.dumps(document))
    code, stdout, _ = cli("registry", "check", str(registry))
    assert code == 0
    assert re.search(rf"WARNING\s+key_expires_soon\s+orders\s+{re.escape(orders['kid'])}", stdout)

    document["keys"][0]["exp"] = int(time.time()) + 600  # less than a token lifetime + leeway left
    registry.write_text(json.dumps(document))
    code, stdout, _ = cli("registry", "check", str(registry), "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["ok"] is False and report["errors"] >= 1
    assert {"severity", "code", "service", "kid", "message"} <= set(report["findings"][0])
    assert report["findings"][0]["severity"] == "error" and report["findings"][0]["service"] == "orders"
    code, stdout, _ = cli("registry", "check", str(registry))
    assert code == 1
    assert "FAILED" in stdout


def test_registry_check_unreadable_file_is_a_usage_error(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("[]")
    code, _, stderr = cli("registry", "check", str(tmp_path / "r.json"))
    assert code == 2
    assert "'keys' array" in stderr


def test_registry_serve_publishes_the_file_until_stopped(
    registry: Path, orders: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx
    import uvicorn

    servers: list[uvicorn.Server] = []

    class RecordingServer(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", RecordingServer)
    result: list[int] = []
    argv = ["registry", "serve", str(registry), "--port", "0", "--max-age", "42"]
    thread = threading.Thread(target=lambda: result.append(main(argv)))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (servers and servers[0].started) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert servers and servers[0].started
        found = re.search(r"at (http://127\.0\.0\.1:\d+/\.well-known/jwks\.json) ", capsys.readouterr().out)
        assert found, "serve prints the URL it serves at"
        response = httpx.get(found[1], timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/jwk-set+json")
        assert "max-age=42" in response.headers["cache-control"]
        assert [jwk["kid"] for jwk in response.json()["keys"]] == [orders["kid"]]
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert result == [0]


def test_registry_serve_refuses_a_bad_file_before_serving(cli: Run, tmp_path: Path) -> None:
    code, stdout, stderr = cli("registry", "serve", str(tmp_path / "missing.json"), "--port", "0")
    assert code == 2
    assert "cannot read registry file" in stderr
    assert "serving" not in stdout


# -- mint and verify ---------------------------------------------------------------------


def test_mint_prints_only_the_token_and_verify_accepts_it(cli: Run, registry: Path, orders: dict[str, Any]) -> None:
    token = _mint(cli, orders)
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)
    code, stdout, stderr = cli("verify", token, "--registry", str(registry), "--aud", "payments")
    assert code == 0, stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stdout.splitlines())
    assert fields["caller"] == fields["subject"] == "orders"
    assert fields["kid"] == orders["kid"]
    assert fields["alg"] == "ES256"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(expires in (4m \d+s|5m)\)", fields["expires"])
    assert token not in stdout + stderr


def test_delegated_token_round_trip_with_json(cli: Run, registry: Path, orders: dict[str, Any]) -> None:
    token = _mint(cli, orders, "--scope", "charges:write charges:read", "--ttl", "60")
    code, stdout, _ = cli("verify", token, "--registry", str(registry), "--aud", "payments", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result == {
        **result,
        "accepted": True,
        "caller": "orders",
        "subject": "orders",
        "transaction": None,
        "audience": "payments",
        "scopes": ["charges:read", "charges:write"],
        "kid": orders["kid"],
        "alg": "ES256",
    }
    assert result["expires_at"] - result["issued_at"] == 60
    assert 0 < result["expires_in"] <= 60


def test_verify_reads_the_token_from_stdin(
    cli: Run, registry: Path, orders: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Bearer {_mint(cli, orders)}\n"))
    code, stdout, _ = cli("verify", "-", "--registry", str(registry), "--aud", "payments")
    assert code == 0
    assert "caller" in stdout
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, stderr = cli("verify", "-", "--registry", str(registry), "--aud", "payments")
    assert code == 2
    assert "no token given on stdin" in stderr


def test_verify_wrong_audience_exits_1_with_expected_and_found(
    cli: Run, registry: Path, orders: dict[str, Any]
) -> None:
    token = _mint(cli, orders)
    code, stdout, stderr = cli("verify", token, "--registry", str(registry), "--aud", "billing")
    assert code == 1
    assert stdout == ""
    assert stderr.strip() == (
        "rejected: wrong_audience: the token is for 'payments', not for 'billing': the caller must ask for a "
        "token for 'billing' (expected 'billing', found 'payments')"
    )
    code, stdout, stderr = cli("verify", token, "--registry", str(registry), "--aud", "billing", "--json")
    assert code == 1
    assert json.loads(stdout) == {
        "accepted": False,
        "reason": "wrong_audience",
        "detail": "the token is for 'payments', not for 'billing': the caller must ask for a token for 'billing'",
        "expected": "billing",
        "actual": "payments",
        "kid": orders["kid"],
    }
    assert stderr.startswith("rejected: wrong_audience")


def test_verify_expired_token_exits_1(cli: Run, registry: Path, orders: dict[str, Any]) -> None:
    key = meshauth.SigningKey.from_file(orders["private_key"])
    past = meshauth.ServiceIdentity("orders", key, clock=FakeClock(time.time() - 3600))
    code, _, stderr = cli("verify", past.mint("payments"), "--registry", str(registry), "--aud", "payments")
    assert code == 1
    assert stderr.startswith("rejected: expired: the token expired 20")
    assert re.search(r"Z, 3[0-9]{3} s ago \(now 20[0-9-]+T[0-9:]+Z, leeway 30 s\) \(expected 'exp after 20", stderr)


def test_verify_unknown_kid_and_malformed_token_exit_1(cli: Run, registry: Path, tmp_path: Path) -> None:
    stranger = _keygen(cli, tmp_path / "other", "orders")
    code, _, stderr = cli("verify", _mint(cli, stranger), "--registry", str(registry), "--aud", "payments")
    assert code == 1
    assert stderr.startswith(f"rejected: unknown_kid: no key {stranger['kid']!r} in ")
    # The registry's size and age, and whom the token claims to come from.
    assert re.search(r" in \d+ keys?, read \d+ s ago; the token claims to come from 'orders' \(unverified\)", stderr)
    code, _, stderr = cli("verify", "not-a-token", "--registry", str(registry), "--aud", "payments")
    assert code == 1
    assert stderr.startswith("rejected: malformed: a compact JWS has exactly three segments (expected 3, found 1)")


def test_verify_missing_registry_file_exits_2(cli: Run, tmp_path: Path, orders: dict[str, Any]) -> None:
    code, stdout, stderr = cli("verify", _mint(cli, orders), "--registry", str(tmp_path / "nope.json"), "--aud", "x")
    assert code == 2
    assert stdout == ""
    assert "cannot read registry file" in stderr and "nope.json" in stderr
    assert "rejected" not in stderr


def test_verify_against_a_registry_url(cli: Run, registry: Path, orders: dict[str, Any]) -> None:
    from meshauth.testing import LoopbackServer

    with LoopbackServer(meshauth.jwks_app(meshauth.JWKSFile(registry))) as server:
        url = server.url + "/.well-known/jwks.json"  # loopback: plain http is allowed
        code, stdout, stderr = cli("verify", _mint(cli, orders), "--registry", url, "--aud", "payments")
        assert code == 0, stderr
        assert "orders" in stdout
        code, _, stderr = cli("verify", _mint(cli, orders), "--registry", url, "--aud", "billing")
        assert code == 1
        assert "wrong_audience" in stderr


def test_verify_refuses_plain_http_to_a_remote_registry(cli: Run, orders: dict[str, Any]) -> None:
    code, _, stderr = cli("verify", _mint(cli, orders), "--registry", "http://keys.example.com/", "--aud", "payments")
    assert code == 2
    assert "http" in stderr


def test_verify_unreachable_registry_exits_2_without_judging_the_token(cli: Run, orders: dict[str, Any]) -> None:
    import socket

    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    code, _, stderr = cli("verify", _mint(cli, orders), "--registry", url, "--aud", "payments")
    assert code == 2
    assert "registry unavailable, the token was not judged" in stderr


def test_mint_usage_errors(cli: Run, tmp_path: Path, orders: dict[str, Any]) -> None:
    code, stdout, stderr = cli(
        "mint", "--key", orders["private_key"], "--service", "orders", "--aud", "payments", "--subject", "alice"
    )
    assert code == 2
    assert "unrecognized arguments: --subject" in stderr
    assert stdout == ""
    code, _, stderr = cli("mint", "--key", str(tmp_path / "none.pem"), "--service", "orders", "--aud", "payments")
    assert code == 2
    assert "cannot read key file" in stderr
    code, _, stderr = cli("mint", "--key", orders["private_key"], "--service", "orders", "--aud", "p", "--ttl", "0")
    assert code == 2
    assert "--ttl" in stderr
    code, _, stderr = cli("mint", "--key", orders["private_key"], "--service", "orders")
    assert code == 2
    assert "--aud" in stderr


def test_mint_warns_about_a_readable_key_and_a_long_ttl(cli: Run, orders: dict[str, Any]) -> None:
    os.chmod(orders["private_key"], 0o644)
    code, stdout, stderr = cli(
        "mint", "--key", orders["private_key"], "--service", "orders", "--aud", "payments", "--ttl", "3600"
    )
    assert code == 0
    assert stdout.count(".") == 2
    assert "mode 0644" in stderr and "over 900 s" in stderr


# -- inspect -------------------------------------------------------------------------------


def test_inspect_marks_the_output_unverified_and_never_prints_the_signature(cli: Run, orders: dict[str, Any]) -> None:
    token = _mint(cli, orders)
    signature = token.rsplit(".", 1)[1]
    code, stdout, stderr = cli("inspect", token)
    assert code == 0
    assert stdout.splitlines()[0] == "UNVERIFIED: signature not checked"
    assert signature not in stdout + stderr
    assert re.search(r"^signature\s+64 bytes \(not shown, not checked\)$", stdout, re.MULTILINE)
    assert '"typ": "meshauth+jwt"' in stdout and '"sub": "orders"' in stdout
    assert re.search(r"^expires\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(expires in (4m \d+s|5m)\)$", stdout, re.MULTILINE)
    assert "problems" not in stdout


def test_inspect_json_and_an_expired_token(cli: Run, orders: dict[str, Any]) -> None:
    key = meshauth.SigningKey.from_file(orders["private_key"])
    token = meshauth.ServiceIdentity("orders", key, clock=FakeClock(time.time() - 3 * 3600)).mint("payments")
    code, stdout, stderr = cli("inspect", token, "--json")
    assert code == 0
    assert "UNVERIFIED" in stderr
    result = json.loads(stdout)
    assert result["verified"] is False
    assert result["header"] == {"alg": "ES256", "kid": orders["kid"], "typ": "meshauth+jwt"}
    assert result["claims"]["iss"] == "orders"
    assert result["signature_bytes"] == 64
    assert result["times"]["exp"]["relative"] in ("expired 2h 55m ago", "expired 2h 54m ago")
    assert result["times"]["iat"]["utc"].endswith("Z")
    assert token.rsplit(".", 1)[1] not in stdout + stderr


def test_inspect_explains_what_is_wrong_and_exits_1(cli: Run, orders: dict[str, Any]) -> None:
    header, payload, _ = _mint(cli, orders).split(".")
    padded = f"{header}.{payload}==.c2ln"
    code, stdout, _ = cli("inspect", padded)
    assert code == 1
    assert stdout.startswith("UNVERIFIED: signature not checked\n")
    assert '"iss": "orders"' in stdout  # decoded leniently all the same
    assert "payload is not base64url" in stdout
    assert "signature: 3 bytes, ES256 signatures are 64" in stdout

    code, stdout, _ = cli("inspect", "x.y.z.w.v")
    assert code == 1
    assert "encrypted JWE" in stdout

    hostile = meshauth._jws.b64url_encode(b'{"alg":"none","jku":"https://evil"}')
    claims = meshauth._jws.b64url_encode(b'{"iss":"\\u001b[2Jx","exp":1.5,"exp":2}')
    code, stdout, _ = cli("inspect", f"{hostile}.{claims}.")
    assert code == 1
    assert "\x1b" not in stdout
    assert "forbidden members ['jku']" in stdout
    assert "alg 'none' is not one of" in stdout
    assert "duplicate member" in stdout
    assert "required claims missing" in stdout
    assert "signature: empty" in stdout

    deep = meshauth._jws.b64url_encode(b"[" * 500 + b"]" * 500)
    code, stdout, _ = cli("inspect", f"{header}.{deep}.c2ln")
    assert code == 1
    assert "not shown: nested deeper than 16 levels" in stdout


# -- help, usage errors, optional commands ----------------------------------------------------

SUBCOMMANDS = [
    [],
    ["keygen"],
    ["registry"],
    ["registry", "add"],
    ["registry", "remove"],
    ["registry", "list"],
    ["registry", "check"],
    ["registry", "serve"],
    ["mint"],
    ["verify"],
    ["inspect"],
    ["gateway"],
]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c) or "meshauth")
def test_every_command_has_help_with_an_example(cli: Run, command: list[str]) -> None:
    code, stdout, stderr = cli(*command, "--help")
    assert code == 0
    assert stdout.startswith(f"usage: meshauth {' '.join(command)}".rstrip())
    assert "example:" in stdout
    assert stderr == ""


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], [], ["registry"], ["verify", "t", "--registry", "r.json"], ["inspect", "t", "--bogus"]],
    ids=["unknown command", "no command", "no registry action", "missing option", "unknown option"],
)
def test_usage_errors_exit_2(cli: Run, argv: list[str]) -> None:
    code, stdout, stderr = cli(*argv)
    assert code == 2
    assert stdout == ""
    assert "usage: meshauth" in stderr


def test_version(cli: Run) -> None:
    code, stdout, _ = cli("--version")
    assert code == 0
    assert stdout.strip() == f"meshauth {meshauth.__version__}"


def test_demo_hands_its_arguments_to_the_demo_module(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    import meshauth.cli

    monkeypatch.delattr(meshauth.cli, "_demo", raising=False)
    monkeypatch.setitem(sys.modules, "meshauth.cli._demo", None)  # as if not installed
    code, _, stderr = cli("demo")
    assert code == 2
    assert "demo not available" in stderr
    received: list[list[str]] = []
    module = types.ModuleType("meshauth.cli._demo")
    module.main = lambda argv: received.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "meshauth.cli._demo", module)
    code, _, _ = cli("demo", "--help", "--port", "0")
    assert code == 7
    assert received == [["--help", "--port", "0"]]


def test_gateway_runs_the_gateway_module(cli: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "meshauth.gateway", None)
    code, _, stderr = cli("gateway", "--config", "gateway.toml")
    assert code == 2
    assert "gateway not available" in stderr

    def serve(path: str) -> int:
        if path.endswith("bad.toml"):
            raise meshauth.ConfigurationError(f"{path}: unknown key 'lisen'", reason="invalid_config")
        return 0

    module = types.ModuleType("meshauth.gateway")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "meshauth.gateway", module)
    assert cli("gateway", "--config", str(tmp_path / "gateway.toml"))[0] == 0
    code, _, stderr = cli("gateway", "--config", "bad.toml")
    assert code == 2
    assert stderr.strip() == "error: invalid_config: bad.toml: unknown key 'lisen'"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.6, "1m"), (252, "4m 12s"), (3 * 3600 + 5, "3h"), (3 * 3600 + 120, "3h 2m"), (-90061, "1d 1h")],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_time_arguments() -> None:
    assert _timestamp_arg("1700000000") == 1_700_000_000
    assert _timestamp_arg("2030-01-31") == 1_896_048_000
    assert _timestamp_arg("2030-01-31T02:00:00+02:00") == 1_896_048_000
    assert abs(_timestamp_arg("+1h") - (time.time() + 3600)) < 60
    with pytest.raises(Exception, match="not a time"):
        _timestamp_arg("next tuesday")


# -- the real console entry point ---------------------------------------------------------------


@pytest.mark.slow
def test_python_dash_m_meshauth_round_trip(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshauth", *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    helped = run("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: meshauth")
    assert run("keygen", "--service", "orders", "--out", "keys").returncode == 0
    assert run("registry", "add", "registry.json", "keys/orders.jwk.json").returncode == 0
    minted = run("mint", "--key", "keys/orders.pem", "--service", "orders", "--aud", "payments")
    assert minted.returncode == 0
    token = minted.stdout.strip()
    verified = run("verify", token, "--registry", "registry.json", "--aud", "payments", "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["caller"] == "orders"
    rejected = run("verify", token, "--registry", "registry.json", "--aud", "billing")
    assert rejected.returncode == 1
    assert rejected.stderr.startswith("rejected: wrong_audience")


def test_registry_check_against_the_published_registry(cli: Run, registry: Path, tmp_path: Path) -> None:
    published = tmp_path / "published.json"
    published.write_text(registry.read_text())
    empty = tmp_path / "next.json"
    empty.write_text(json.dumps({"keys": []}))
    code, stdout, _ = cli("registry", "check", str(empty), "--previous", str(published), "--json")
    assert code == 1
    codes = {finding["code"] for finding in json.loads(stdout)["findings"]}
    assert "removed_too_early" in codes  # removing the only key revokes every live token at once

    code, stdout, _ = cli("registry", "check", str(registry), "--service", "orders", "--service", "payments")
    assert code == 1
    assert re.search(r"ERROR\s+no_valid_key\s+payments", stdout)
