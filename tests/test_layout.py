"""The test tree's own layout rules, checked so they hold as suites are added.

Shared pieces live in tests/factories/ (and helpers.py, control_plane.py, pg.py): a test module
that imports another test module runs that module's fixtures and import-time work wherever it is
imported, and breaks as soon as the module is moved or split. And because the folders have no
__init__.py (pytest's default "prepend" import mode puts each test's folder on sys.path and
imports it by basename), two test files with the same basename in different folders collide
when both are collected.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent
LOAD_BY_PATH = re.compile(r'"test_\w+\.py"')


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_module_imports_another() -> None:
    test_modules = {p.stem for p in TESTS.rglob("test_*.py")}
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in test_modules or top.startswith("test_"):
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno} imports {name}")
        # loading a test file by path (importlib) is the same coupling in disguise
        if path.name != "test_layout.py" and LOAD_BY_PATH.search(path.read_text()):
            offenders.append(f"{path.relative_to(TESTS)} loads a test_*.py file by path")
    assert offenders == [], (
        "test modules must import shared pieces from tests/factories/ (or helpers.py, "
        "control_plane.py), not from other test modules; move the helper there:\n"
        + "\n".join(offenders)
    )


def test_test_file_basenames_are_unique() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        where[path.name].append(str(path.parent.relative_to(TESTS)))
    clashes = {name: dirs for name, dirs in where.items() if len(dirs) > 1}
    assert clashes == {}, (
        f"test files sharing a basename collide under pytest's prepend import mode: {clashes}; "
        "rename one of them (e.g. prefix it with its folder's concept)"
    )
