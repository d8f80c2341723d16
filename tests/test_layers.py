"""The import graph is a stack of layers (docs/architecture.md, "Layers"), and no import of a
flexray module hides inside a function.

The contracts live in pyproject.toml (``[tool.importlinter]``) and are checked with
import-linter's ``lint-imports``; each check is also run against a copy of the package with one
planted violation, so a check that could never fail would fail here.
"""

from __future__ import annotations

import ast
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flexray"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the flexray package under ``root`` with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def function_local_imports(package: Path) -> list[str]:
    """``path:line module`` for every import of a flexray module inside a function body
    (``TYPE_CHECKING`` blocks count too: they are function-free but hide the same cycles)."""
    found: set[tuple[str, int, str]] = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            hidden = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
            if not hidden:
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    names = ["." * inner.level + (inner.module or "")]
                elif isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                else:
                    continue
                for name in names:
                    if name.startswith((".", "flexray")):
                        found.add((str(path.relative_to(package.parent)), inner.lineno, name))
    return [f"{path}:{line} {name}" for path, line, name in sorted(found)]


def test_layers_contract_is_kept() -> None:
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout, res.stdout


def test_layers_contract_catches_an_upward_import(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PACKAGE, tmp_path / "flexray", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "flexray" / "config.py"
    config.write_text(config.read_text() + "\nfrom flexray.methods import method_class  # noqa: E402\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0, res.stdout
    assert "flexray.config -> flexray.methods" in res.stdout, res.stdout


def test_no_function_local_flexray_imports() -> None:
    offenders = function_local_imports(PACKAGE)
    print("\n".join(offenders))
    assert len(offenders) == 0, "function-local imports of flexray modules:\n" + "\n".join(offenders)


def test_the_scan_sees_local_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "flexray"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "from typing import TYPE_CHECKING\nimport json\n\nif TYPE_CHECKING:\n    from flexray.methods import base\n\n"
        "def f():\n    import os\n    from flexray.config import JobConfig\n    from . import sibling\n"
    )
    assert function_local_imports(pkg) == [
        "flexray/mod.py:5 flexray.methods", "flexray/mod.py:9 flexray.config", "flexray/mod.py:10 ."]


# ---------------------------------------------------------------- the runtime names no method

NEUTRAL = ("runtime", "fleet", "tracking", "protocol.py", "compute.py")
"""What must work for any method: none of it may name one. (The config schema may: its default
method and the async policies, which any method can use, are named values.)"""


def method_names() -> set[str]:
    """Every registered method's name and class name, lower-cased (their files are the registry's paths)."""
    from flexray.methods import _PATHS

    return {n.lower() for name, path in _PATHS.items() for n in (name, path.rpartition(":")[2])}


def mentions(package: Path, words: set[str]) -> list[str]:
    """``path:line word`` for every whole-word mention of ``words`` (case-insensitive) under ``NEUTRAL``."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(words))) + r")\b", re.IGNORECASE)
    found = []
    for part in NEUTRAL:
        for path in sorted((package / part).rglob("*.py")) if (package / part).is_dir() else [package / part]:
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(package.parent)}:{line_no} {m.group(1)}" for m in pattern.finditer(line)]
    return found


def test_no_method_is_named_where_every_method_runs(tmp_path: Path) -> None:
    names = method_names()
    assert {"splitfed", "tiled", "fedavg", "heterofl", "distreal"} <= names
    assert mentions(PACKAGE, names) == []
    planted = tmp_path / "flexray"  # the check can fail: a planted mention is found
    shutil.copytree(PACKAGE, planted, ignore=shutil.ignore_patterns("__pycache__"))
    (planted / "runtime" / "rounds.py").write_text((planted / "runtime" / "rounds.py").read_text() + "\n# if SplitFed\n")
    assert mentions(planted, names) == ["flexray/runtime/rounds.py:" + str(
        len((planted / "runtime" / "rounds.py").read_text().splitlines())) + " SplitFed"]


def test_the_split_server_lives_only_in_the_split_methods_files() -> None:
    own = {PACKAGE / "methods" / "split_server.py", PACKAGE / "methods" / "splitfed.py"}
    outside = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if p not in own and re.search(r"split_server|SplitServer", p.read_text())]
    assert outside == []
