"""Import boundaries that keep edge installs lean (DESIGN.md: the agent never imports torch).

Which package may import which is the import-linter contract (``[tool.importlinter]`` in
pyproject.toml, run by ``make lint``). It reads every import, lazy ones included, so it cannot
say what this test does: that the lean modules load nothing heavy *when imported*.
"""

import subprocess
import sys

LEAN_MODULES = [
    "slmops.core.errors",
    "slmops.core.config",
    "slmops.core.atomic",
    "slmops.core.digest",
    "slmops.model.handle",
    "slmops.model.card",
    "slmops.runtimes",
    "slmops.runtimes.llama_cpp",
    "slmops.runtimes.onnx_genai",
    "slmops.evaluate.perf_child",
    "slmops.optimize.passes.base",
]


def test_runtime_seam_and_core_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LEAN_MODULES)
        + "from slmops.optimize.passes.base import registry\nregistry()\n"
        + "heavy = sorted(m for m in ('torch', 'transformers', 'onnxruntime_genai', 'llama_cpp', 'matplotlib')"
        + " if m in sys.modules)\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at module level: {out.stdout}"
