"""The steps the model and adapter installers share (agent/apply_steps.py): how an exception
becomes a failed status, and the staging folder of one target."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from slmops.agent.apply_steps import StepFailed, failure, staging_dir
from slmops.core.errors import CheckFailedError, UserInputError
from slmops.protocol.fleet import DeviceActionState as S


def test_failure_names_the_stage_and_why() -> None:
    assert failure(StepFailed(S.HEALTH_CHECKING, "no tokens"), S.INSTALLING) == (
        S.HEALTH_CHECKING,
        "no tokens",
    )
    # bytes that do not match their digest: a verification failure even while downloading
    bad = CheckFailedError("layer does not match its digest", where="w.gguf")
    assert failure(bad, S.DOWNLOADING) == (S.VERIFYING, "w.gguf: layer does not match its digest")
    assert failure(bad, S.INSTALLING)[0] is S.INSTALLING
    stage, text = failure(OSError(errno.ENOSPC, "No space left on device"), S.INSTALLING)
    assert stage is S.INSTALLING and "no space left on device" in text and "free disk" in text
    assert (
        failure(OSError(errno.EACCES, "denied"), S.DOWNLOADING)[1]
        == "PermissionError: [Errno 13] denied"
    )
    assert failure(UserInputError("bad", hint="fix it"), S.VERIFYING)[1] == "bad\n  hint: fix it"
    assert failure(KeyError("x"), S.VERIFYING) == (S.VERIFYING, "unexpected KeyError: 'x'")


def test_staging_keeps_this_target_and_drops_the_others(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    old = tmp_path / "staging" / ("cd" * 16)
    old.mkdir(parents=True)
    mine = staging_dir(tmp_path, "staging", digest, "manifest")
    assert mine == tmp_path / "staging" / ("ab" * 16) and not old.exists()
    (mine / "blobs").mkdir(parents=True)  # a download in progress survives a second call
    assert staging_dir(tmp_path, "staging", digest, "manifest") == mine and mine.is_dir()
    with pytest.raises(StepFailed) as exc:
        staging_dir(tmp_path, "staging", "sha256:../../etc", "adapter")
    assert exc.value.stage is S.DOWNLOADING and "malformed adapter digest" in exc.value.detail
    assert mine.is_dir()  # a refused name touches nothing
