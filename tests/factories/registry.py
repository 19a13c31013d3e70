"""tests/bundle/conftest.py's helpers for suites outside tests/bundle (Debian's docker-registry:
binary path, install hint, ``run_registry``; bundle layout builders), loaded by path since
conftest modules are not importable by name from another folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any


def registry_helpers() -> Any:
    path = Path(__file__).parents[1] / "bundle" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_bundle_registry_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module
