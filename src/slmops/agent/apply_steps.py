"""What the model installer (install.py) and the adapter installer (adapters.py) share: the
error a step raises with its stage, the staging folder of one target, and how any exception
becomes a failed status (stage + detail). One place, so a model and an adapter that fail the
same way are reported the same way (the control plane's rollout gates count these stages).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from slmops.core.errors import CheckFailedError, ResourceError, SlmopsError
from slmops.core.safepath import safe_join
from slmops.protocol.digest import is_digest
from slmops.protocol.fleet import DeviceActionState as S


class StepFailed(Exception):
    """A step refused its input; `stage` is where, `detail` why (reported as they are)."""

    def __init__(self, stage: S, detail: str) -> None:
        super().__init__(detail)
        self.stage, self.detail = stage, detail


def staging_dir(data_dir: Path, folder: str, digest: str, what: str) -> Path:
    """``DATA/folder/<first 32 hex of digest>`` for this target; other targets' leftovers in
    ``folder`` are dropped (disk is scarce), this one's are kept (downloads resume). The digest
    comes from the server, so a malformed one is refused before it names a path."""
    if not is_digest(digest):
        raise StepFailed(S.DOWNLOADING, f"refused malformed {what} digest {digest!r}")
    name = digest.split(":", 1)[1][:32]
    staging = safe_join(data_dir, folder, name)
    root = Path(data_dir) / folder
    if root.is_dir():
        for p in root.iterdir():
            if p.name != name:
                shutil.rmtree(p, ignore_errors=True)
    return staging


def disk_full(exc: OSError, where: Path | None = None) -> Exception:
    """A full disk as the ResourceError operators understand; any other OSError unchanged."""
    if exc.errno == errno.ENOSPC:
        return ResourceError("no space left on device", where=where, hint="free disk space")
    return exc


def failure(exc: Exception, stage: S) -> tuple[S, str]:
    """The (stage, detail) of a failed apply, for `exc` raised while in `stage`."""
    if isinstance(exc, StepFailed):
        return exc.stage, exc.detail
    if isinstance(exc, CheckFailedError):
        # bytes that do not match their digest are a verification failure wherever caught
        return (S.VERIFYING if stage in (S.DOWNLOADING, S.VERIFYING) else stage), exc.render()
    if isinstance(exc, OSError):
        exc = disk_full(exc)
    if isinstance(exc, SlmopsError):
        return stage, exc.render()
    if isinstance(exc, OSError):
        return stage, f"{type(exc).__name__}: {exc}"
    return stage, f"unexpected {type(exc).__name__}: {exc}"  # a bug: reported, not fatal
