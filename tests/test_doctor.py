"""meshauth doctor: a good setup, and each broken one, against a real loopback registry server."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import meshauth
from meshauth.cli import main

WELL_KNOWN = "/.well-known/jwks.json"


@dataclasses.dataclass
class Served:
    """What the loopback registry answers."""

    document: dict[str, Any]
    status: int = 200
    date_offset: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: {"Cache-Control": "max-age=300"})


class RegistryServer:
    def __init__(self, served: Served) -> None:
        self.served = served
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(state.served.document).encode()
                status = state.served.status if self.path == WELL_KNOWN else 404
                self.send_response_only(status)
                self.send_header("Date", email.utils.formatdate(time.time() + state.served.date_offset, usegmt=True))
                self.send_header("Content-Type", "application/jwk-set+json")
                for name, value in state.served.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{WELL_KNOWN}"


@dataclasses.dataclass
class Setup:
    root: Path
    key: meshauth.SigningKey
    key_file: Path
    policy: Path
    served: Served
    url: str

    def args(self, **changes: str | None) -> list[str]:
        values: dict[str, str | None] = {
            "--service": "orders",
            "--key-file": str(self.key_file),
            "--registry": self.url,
            "--policy": str(self.policy),
        }
        values.update({f"--{name.replace('_', '-')}": value for name, value in changes.items()})
        return [item for name, value in values.items() if value is not None for item in (name, value)]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    key = meshauth.SigningKey.generate()
    key_file = tmp_path / "orders.pem"
    key_file.write_bytes(key.to_pem())
    key_file.chmod(0o600)
    payments = meshauth.SigningKey.generate()
    document = {"keys": [key.public_jwk(iss="orders"), payments.public_jwk(iss="payments")]}
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rules]]\ncallers = ["payments"]\nmethods = ["GET"]\npaths = ["/orders/*"]\n')
    server = RegistryServer(Served(document))
    server.thread.start()
    try:
        yield Setup(tmp_path, key, key_file, policy, server.served, server.url)
    finally:
        server.server.shutdown()
        server.server.server_close()


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    code = main(["doctor", "--json", *args])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, {check["name"]: check for check in report["checks"]}


def test_good_setup(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", *setup.args()]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["OK"] * 8
    assert any("clock" in line and "within" in line for line in lines)
    assert any("registry" in line and "2 keys" in line for line in lines)


def test_settings_from_the_environment(
    setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHAUTH_SERVICE", "orders")
    monkeypatch.setenv("MESHAUTH_KEY_FILE", str(setup.key_file))
    monkeypatch.setenv("MESHAUTH_REGISTRY", setup.url)
    monkeypatch.delenv("MESHAUTH_POLICY", raising=False)
    code, checks = doctor(capsys)
    assert code == 0
    assert checks["key in registry"]["status"] == "ok" and checks["policy"]["status"] == "skip"


def test_key_file_unset_missing_and_unreadable(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = doctor(capsys, *setup.args(key_file=None))
    assert code == 1
    assert checks["key file"]["message"] == "MESHAUTH_KEY_FILE is not set"
    assert "meshauth keygen --service orders" in checks["key file"]["fix"]
    assert checks["key in registry"]["status"] == "skip"

    missing = setup.root / "keys" / "orders.pem"
    code, checks = doctor(capsys, *setup.args(key_file=str(missing)))
    assert code == 1 and checks["key file"]["message"] == f"{missing} does not exist"
    assert f"meshauth keygen --service orders --out {missing.parent}" in checks["key file"]["fix"]

    garbage = setup.root / "garbage.pem"
    garbage.write_text("not a key")
    code, checks = doctor(capsys, *setup.args(key_file=str(garbage)))
    assert code == 1 and "is not a usable private key" in checks["key file"]["message"]


def test_key_file_readable_by_others(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.key_file.chmod(0o644)
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    assert checks["key file mode"]["message"].endswith("is mode 0644: other users can read the private key")
    assert checks["key file mode"]["fix"] == f"chmod 600 {setup.key_file}"


def test_key_not_in_registry_or_owned_by_another(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.served.document = {"keys": [setup.served.document["keys"][1]]}
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    assert checks["key in registry"]["message"] == f"key {setup.key.kid} is not in the registry"
    assert checks["key in registry"]["fix"] == (
        f"publish it: `meshauth registry add {setup.url} --key {setup.key_file} --service orders`"
    )
    setup.served.document = {"keys": [setup.key.public_jwk(iss="billing")]}
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    assert checks["key in registry"]["message"] == f"key {setup.key.kid} is registered to 'billing', not 'orders'"


def test_expired_key(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    expired = int(time.time()) - 7200
    setup.served.document = {"keys": [setup.key.public_jwk(iss="orders", exp=expired)]}
    code, checks = doctor(capsys, *setup.args(policy=None))
    assert code == 1
    message = checks["key in registry"]["message"]
    assert f"key {setup.key.kid} of 'orders' expired " in message and "(2 h ago)" in message
    assert "meshauth keygen --service orders" in checks["key in registry"]["fix"]


def test_registry_404_and_unreachable(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = setup.url.replace(WELL_KNOWN, "/jwks")
    code, checks = doctor(capsys, *setup.args(registry=wrong))
    assert code == 1 and checks["registry"]["message"] == f"{wrong} answered HTTP 404"
    assert "/.well-known/jwks.json" in checks["registry"]["fix"]
    assert checks["clock"]["status"] == "skip"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}{WELL_KNOWN}"
    code, checks = doctor(capsys, *setup.args(registry=closed))
    assert code == 1 and checks["registry"]["message"] == f"{closed} is unreachable (ConnectError)"


def test_stale_cache_in_front_of_the_registry(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.served.headers = {"Cache-Control": "max-age=60", "Age": "900"}
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    assert checks["registry freshness"]["message"] == f"{setup.url} came from a cache 900 s old, past its max-age=60"


@pytest.mark.parametrize(("offset", "direction"), [(120.0, "behind"), (-300.0, "ahead of")])
def test_clock_skew_against_the_registry_date(
    setup: Setup, capsys: pytest.CaptureFixture[str], offset: float, direction: str
) -> None:
    setup.served.date_offset = offset
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    message = checks["clock"]["message"]
    assert message.startswith("this host's clock is ") and f"s {direction} the registry server's" in message
    assert abs(int(message.split()[4]) - abs(offset)) <= 2
    assert "NTP" in checks["clock"]["fix"]


def test_policy_names_a_caller_without_a_key(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.policy.write_text('[[rules]]\ncallers = ["paymnets", "billing-*"]\nmethods = ["GET"]\npaths = ["/x"]\n')
    code, checks = doctor(capsys, *setup.args())
    assert code == 1
    assert checks["policy"]["message"] == (
        f"{setup.policy} names callers with no key in the registry: 'paymnets' (did you mean 'payments'?), 'billing-*'"
    )


def test_policy_that_does_not_load(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.policy.write_text("[[rules]]\ncallers = 3\n")
    code, checks = doctor(capsys, *setup.args())
    assert code == 1 and checks["policy"]["message"].startswith(f"{setup.policy} does not load:")


def test_file_registry_and_help(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    registry = setup.root / "registry.json"
    registry.write_text(json.dumps(setup.served.document))
    code, checks = doctor(capsys, *setup.args(registry=str(registry)))
    assert code == 0 and checks["clock"]["status"] == "skip"
    assert checks["registry freshness"]["message"].startswith(f"{registry} last changed ")
    assert main(["doctor", "--help"]) == 0
    assert "MESHAUTH_REGISTRY" in capsys.readouterr().out


def test_redis_registry_is_skipped_with_a_pointer(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = doctor(capsys, *setup.args(registry="redis://user:secret@127.0.0.1:6379/0", policy=None))
    assert code == 0 and checks["registry"]["status"] == "skip"
    assert checks["registry"]["fix"] == "list its keys with `meshauth registry --redis redis://127.0.0.1:6379/0 list`"
    assert "secret" not in json.dumps(checks)
