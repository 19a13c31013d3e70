"""Runs one pass in a child process: isolates memory, measures the step's own peak RSS.

The engine starts `python -m slmops.optimize.worker SPEC.json RESULT.json`. A crash or an
out-of-memory kill of the child cannot corrupt the engine, and the child's peak RSS is exactly
what this step cost (the figure a 16 GB box must accommodate).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from slmops.core.errors import SlmopsError
from slmops.core.resources import current_rss_bytes, peak_rss_bytes


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict[str, object]
    try:
        from slmops.model.handle import open_model
        from slmops.optimize.passes.base import build_pass

        p = build_pass(spec["pass"], spec["options"])
        p.prepare()
        baseline = current_rss_bytes()
        model = open_model(spec["input"])
        t0 = time.perf_counter()
        res = p.run(model, Path(spec["output"]))
        wall = time.perf_counter() - t0
        result = {
            "ok": True,
            "wall_time_s": wall,
            "peak_rss_bytes": peak_rss_bytes(),
            "baseline_rss_bytes": baseline,
            "result": asdict(res),
        }
    except SlmopsError as exc:
        result = {"ok": False, "error": exc.to_dict()}
    except MemoryError:
        result = {
            "ok": False,
            "error": {"error": "ResourceError", "message": "out of memory", "exit_code": 2},
        }
    except Exception as exc:  # reported to the engine with the traceback, never swallowed
        result = {
            "ok": False,
            "error": {
                "error": "ToolError",
                "message": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
                "exit_code": 1,
            },
        }
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
