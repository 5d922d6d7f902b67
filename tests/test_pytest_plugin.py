"""The pytest plugin registered by the package, as a user's test suite sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import meshauth
from meshauth.testing import FakeClock, MemoryKeys, Mesh

USER_TESTS = """
import time

import httpx
import pytest

import meshauth


def test_fixtures_work_together(meshauth_identity, meshauth_verifier, meshauth_clock, meshauth_registry):
    token = meshauth_identity.token_for("payments")
    assert meshauth_verifier.verify(token).caller == "orders"
    assert abs(meshauth_clock() - time.time()) < 60
    meshauth_clock.advance(3600)
    with pytest.raises(meshauth.TokenExpired):
        meshauth_verifier.verify(token)
    assert len(meshauth_registry.to_jwks()["keys"]) == 2


def test_mesh_tokens_verify_on_the_real_clock(meshauth_mesh, meshauth_registry):
    real = meshauth.Verifier("payments", meshauth_registry)
    assert real.verify(meshauth_mesh.identity("orders").token_for("payments")).caller == "orders"
"""


def _run_user_suite(tmp_path: Path, *args: str, names: bool = True) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    ini = textwrap.dedent(
        """\
        [pytest]
        filterwarnings = error
        addopts = --strict-markers --strict-config -p no:cacheprovider
        """
    )
    if names:
        ini += "meshauth_caller = orders\nmeshauth_service = payments\n"
    (tmp_path / "pytest.ini").write_text(ini)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_", "PYTEST_"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_entry_point_plugin_gives_a_user_suite_its_fixtures(tmp_path: Path) -> None:
    result = _run_user_suite(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


@pytest.mark.slow
def test_plugin_can_be_turned_off(tmp_path: Path) -> None:
    result = _run_user_suite(tmp_path, "-p", "no:meshauth", names=False)
    assert result.returncode != 0
    assert "fixture 'meshauth_identity' not found" in result.stdout


def test_fixtures_in_this_suite(
    meshauth_clock: FakeClock,
    meshauth_mesh: Mesh,
    meshauth_identity: meshauth.ServiceIdentity,
    meshauth_registry: MemoryKeys,
    meshauth_verifier: meshauth.Verifier,
) -> None:
    assert meshauth_identity.name == "client" and meshauth_verifier.audience == "service"
    assert meshauth_mesh.keys is meshauth_registry and meshauth_mesh.clock is meshauth_clock
    principal = meshauth_verifier.verify(meshauth_identity.token_for("service"))
    assert principal.caller == "client"


def test_mesh_starts_at_the_real_time() -> None:
    import time

    mesh = Mesh(["orders", "payments"])
    assert abs(mesh.clock() - time.time()) < 5
    token = mesh.identity("orders").token_for("payments")
    assert meshauth.Verifier("payments", mesh.keys).verify(token).caller == "orders"
