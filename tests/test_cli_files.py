"""Registry and key files under concurrent and killed runs of the command line (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import meshauth


def _meshauth(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "meshauth", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_registry_adds_all_land(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    kids = []
    for n in range(8):
        key = meshauth.SigningKey.generate()
        (tmp_path / f"s{n}.jwk.json").write_text(json.dumps(key.public_jwk(f"service{n}")))
        kids.append(key.kid)
    runs = [_meshauth("registry", "add", str(registry), str(tmp_path / f"s{n}.jwk.json")) for n in range(8)]
    for run in runs:
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, stderr.decode()
    document = json.loads(registry.read_text())
    assert sorted(jwk["kid"] for jwk in document["keys"]) == sorted(kids)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_registry_add_cleans_up_after_a_killed_run(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    leftover = tmp_path / ".registry.json.abc123.tmp"  # what a run killed mid-write leaves
    leftover.write_text('{"keys": [')
    key = meshauth.SigningKey.generate()
    (tmp_path / "orders.jwk.json").write_text(json.dumps(key.public_jwk("orders")))
    run = _meshauth("registry", "add", str(registry), str(tmp_path / "orders.jwk.json"))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr.decode()
    assert not leftover.exists()
    assert [jwk["kid"] for jwk in json.loads(registry.read_text())["keys"]] == [key.kid]


def test_keygen_killed_at_its_first_write_leaves_no_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    # The process dies right after writing the private key's bytes, before anything is linked into place.
    script = (
        "import os, signal\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from meshauth.cli import main\n"
        f"main(['keygen', '--service', 'orders', '--out', {str(keys)!r}])\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (keys / "orders.pem").exists()
    assert any(name.endswith(".tmp") for name in os.listdir(keys))  # the half-written temporary file
    again = _meshauth("keygen", "--service", "orders", "--out", str(keys))
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr.decode()  # not blocked by the killed run
    assert meshauth.SigningKey.from_file(keys / "orders.pem").kid
    assert [name for name in os.listdir(keys) if name.endswith(".tmp")] == []
