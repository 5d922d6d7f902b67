"""Every ```python block in README.md and docs/*.md runs, and every docstring example passes."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import meshauth

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_docs_exist() -> None:
    assert (ROOT / "README.md").is_file()
    assert any(p.parent.name == "docs" for p in DOCS)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{path.name}[block {number}]", "exec"), namespace)  # noqa: S102 - the docs' own examples
        except Exception as exc:
            pytest.fail(f"{path.name} block {number} failed: {type(exc).__name__}: {exc}\n{block}")


def _modules() -> list[str]:
    names = ["meshauth"]
    for info in pkgutil.walk_packages(meshauth.__path__, "meshauth."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_reference_covers_every_public_name() -> None:
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    missing = [name for name in meshauth.__all__ if not re.search(rf"\b{re.escape(name)}\b", reference)]
    assert missing == []


@pytest.mark.slow
def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    """The documentation site builds with every warning (a broken link, a page outside nav) an error."""
    site = str(tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"), "-d", site],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "django" / "index.html").is_file()


def test_no_page_cites_the_design_contract_or_imports_a_private_module() -> None:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN" not in text, f"{path.name} cites a design document the package does not ship"
        assert not re.search(r"(?:from|import) meshauth\._[a-z]", text), f"{path.name} imports a private module"
