"""kill -9 at every phase of an install, in a real child process, then restart and recover.

The child runs Installer.apply with SLMOPS_AGENT_CRASH_AT set, which makes it SIGKILL itself at
that point (no cleanup code runs). A fresh SlotStore.recover() must then find a complete,
verified model (the old one, or the new one once the switch happened) that loads in llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.agent import CRASH_ENV
from slmops.agent.fetch import LayoutSource
from slmops.agent.health import health_check
from slmops.agent.install import Installer
from slmops.agent.slots import MARKER, SlotStore
from slmops.protocol.device import DesiredModel
from slmops.protocol.fleet import DeviceActionState as S

Desired = Callable[[Path, str], DesiredModel]

CHILD = """
import json, sys
from pathlib import Path
from slmops.agent.fetch import LayoutSource
from slmops.agent.install import Installer
from slmops.protocol.device import DesiredModel
data, bundle, pub, desired = sys.argv[1:5]
inst = Installer(Path(data), [Path(pub)], threads=1)
final = inst.apply(
    DesiredModel.model_validate_json(desired),
    LayoutSource(Path(bundle), piece=4096),
    lambda s: print(s.state.value, flush=True),
)
print("final", final.state.value, final.detail, flush=True)
"""


def _run_child(data: Path, bundle: Path, pub: Path, desired: DesiredModel, phase: str) -> Any:
    env = {**os.environ, CRASH_ENV: phase}
    args = [str(data), str(bundle), str(pub), desired.model_dump_json()]
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def v1_template(bundles: Any, desired: Desired, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("crash") / "data"
    final = Installer(data, [bundles.pub], threads=1).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), lambda s: None
    )
    assert final.state is S.ACTIVE, final.detail
    return data


@pytest.mark.parametrize(
    ("phase", "expect"),
    [
        ("download-mid", "1.0.0"),
        ("verify", "1.0.0"),
        ("install", "1.0.0"),
        ("health", "1.0.0"),
        ("switch", "1.0.0"),
        ("switched", "1.1.0"),
    ],
)
def test_kill_9_then_restart_serves_a_complete_model(
    v1_template: Path, bundles: Any, desired: Desired, tmp_path: Path, phase: str, expect: str
) -> None:
    data = tmp_path / "data"
    shutil.copytree(v1_template, data)
    proc = _run_child(data, bundles.v2, bundles.pub, desired(bundles.v2, "1.1.0"), phase)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    assert "final" not in proc.stdout
    store = SlotStore(data)
    rec = store.recover(full=True)
    assert rec.active is not None and rec.active.version == expect, rec.actions
    path, model = store.active()  # type: ignore[misc]
    assert store.check(path.name, model, full=True) is None  # type: ignore[arg-type]
    assert health_check(path, threads=1).ok
    # a restarted agent finishes the job from where the staging folder left it
    final = Installer(data, [bundles.pub], threads=1).apply(
        desired(bundles.v2, "1.1.0"), LayoutSource(bundles.v2), lambda s: None
    )
    assert final.state is S.ACTIVE, final.detail
    assert SlotStore(data).active()[1].version == "1.1.0"  # type: ignore[index]


def test_download_resumes_from_the_part_file(
    v1_template: Path, bundles: Any, desired: Desired, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(v1_template, data)
    want = desired(bundles.v2, "1.1.0")
    proc = _run_child(data, bundles.v2, bundles.pub, want, "download-mid")
    assert proc.returncode == -signal.SIGKILL
    parts = list((data / "staging").rglob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    have = parts[0].stat().st_size
    inst = Installer(data, [bundles.pub], threads=1)
    final = inst.apply(want, LayoutSource(bundles.v2, piece=4096), lambda s: None)
    assert final.state is S.ACTIVE, final.detail
    assert inst.last_fetch is not None and inst.last_fetch.resumed == have
    path, _ = SlotStore(data).active()  # type: ignore[misc]
    layers = json.loads((path / MARKER).read_bytes())["files"]
    assert inst.last_fetch.bytes + have == sum(f["size"] for f in layers), "nothing fetched twice"
