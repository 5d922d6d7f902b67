"""The strict tooling of pyproject.toml holds: mypy --strict and ruff are part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("meshauth", "tests", "examples", "benchmarks")


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is part of the 'test' extra")
    return found


def _assert_passes(name: str, *args: str, timeout: float) -> None:
    result = subprocess.run(
        [_tool(name), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    _assert_passes("mypy", "--no-incremental", "--cache-dir", "/dev/null", "meshauth", timeout=600)


def test_ruff_check() -> None:
    _assert_passes("ruff", "check", "--no-cache", *LINTED, timeout=300)


def test_ruff_format() -> None:
    _assert_passes("ruff", "format", "--check", "--no-cache", *LINTED, timeout=300)
