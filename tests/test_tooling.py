"""The strict tooling of pyproject.toml holds: mypy --strict and ruff are part of the test suite."""

from __future__ import annotations

import ast
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


MAX_FUNCTION_LINES = 60


def test_long_functions_say_why() -> None:
    """A function in meshauth/ longer than 60 lines opens with a comment that says why ("# Long ...")."""
    unexplained = []
    for path in sorted((ROOT / "meshauth").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
                continue
            length = node.end_lineno - node.lineno + 1
            opening = lines[node.lineno - 1 : node.lineno + 15]
            if length > MAX_FUNCTION_LINES and not any(line.strip().startswith("# Long") for line in opening):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not unexplained, "split these, or say why they are long:\n" + "\n".join(unexplained)
