"""Hardware facts the agent reports at enrollment and every check-in.

The control plane picks the variant that fits from these, so they must be true of this box:
cores and RAM from psutil, free disk of the data dir (where models land), and the runtimes
whose Python package is installed. Runtimes are detected with importlib.util.find_spec, which
locates a package without importing it: importing llama_cpp or onnxruntime_genai costs tens of
MB of RSS and native library loads, which an idle agent must not pay.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path
from typing import Literal

import psutil

from slmops import __version__
from slmops.agent.config import AgentConfig
from slmops.protocol.device import Inventory

RuntimeName = Literal["gguf", "onnx-genai"]
RUNTIME_MODULES: dict[RuntimeName, str] = {"gguf": "llama_cpp", "onnx-genai": "onnxruntime_genai"}


def available_runtimes() -> list[RuntimeName]:
    """The formats this box can run: those whose runtime package is importable (not imported)."""
    found: list[RuntimeName] = []
    for fmt, module in RUNTIME_MODULES.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(fmt)
        except (ImportError, ValueError):
            continue
    return found


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # honours taskset / cgroup cpusets
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _free_disk(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def collect(cfg: AgentConfig) -> Inventory:
    """The inventory now; model budgets default to half of the RAM and every core."""
    cores = _cores()
    ram = int(psutil.virtual_memory().total)
    model_ram = cfg.model_ram_mb * 2**20 if cfg.model_ram_mb else ram // 2
    return Inventory(
        arch=platform.machine() or "unknown",
        cores=cores,
        ram_bytes=ram,
        free_disk_bytes=_free_disk(cfg.data_dir),
        runtimes=available_runtimes(),
        agent_version=__version__,
        model_ram_bytes=max(1, model_ram),
        model_cores=min(cfg.model_cores or cores, cores),
        profile=cfg.profile,
        labels=dict(cfg.labels),
    )
