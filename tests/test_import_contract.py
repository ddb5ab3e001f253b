"""The import contract of docs/ARCHITECTURE.md, as `make lint` checks it (lint-imports).

The real tree keeps it, and a copy of core/ with one deliberate upward import breaks it, naming
the offending import: the check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_the_layer_order() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_an_upward_import_fails_the_check(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "core", tmp_path / "core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    records = tmp_path / "core" / "data" / "records.py"
    # data sits near the bottom; study near the top: data may not import it
    records.write_text(records.read_text() + "\nimport core.study.report  # deliberate violation\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "core.data is not allowed to import core.study" in result.stdout
    assert "core.data.records -> core.study.report" in result.stdout


def test_core_may_not_import_streamlit(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "core", tmp_path / "core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fmt = tmp_path / "core" / "fmt.py"
    fmt.write_text(fmt.read_text() + "\nimport streamlit  # deliberate violation\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "core.fmt -> streamlit" in result.stdout


def test_imports_inside_functions_say_why() -> None:
    """A `core` module imports at its top; an import inside a function is kept only for a module
    that loads a heavy package (torch, transformers, pyarrow, ...), marked `# lazy: heavy (...)`
    so a reader knows the real graph (import-linter sees these too)."""
    import ast

    unmarked = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("core")
                    and "# lazy" not in lines[node.lineno - 1]
                    and "# lazy" not in lines[node.end_lineno - 1]
                ):
                    unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert unmarked == []
