"""Join untrusted names under a root folder without ever leaving it.

The agent builds paths from what a control plane or a bundle says (digests, layer titles). A
schema check is the first line; this is the second, at the place where the path is made: the
result is resolved (symlinks followed) and must stay under the resolved root, or nothing is
written at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from slmops.core.errors import CheckFailedError


class PathEscapeError(CheckFailedError):
    """A path built from untrusted data would leave its root folder (exit code 1)."""


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts...``, refused unless it resolves to ``root`` itself or below it.

    Each part must be a relative path without NUL bytes; absolute parts and ``..`` that climb
    out (directly or through a symlink) raise PathEscapeError naming the offending part.
    """
    base = Path(os.path.realpath(root))
    for part in parts:
        if "\x00" in part or os.path.isabs(part) or part.startswith("\\"):
            raise PathEscapeError(
                f"refused path part {part[:120]!r}: absolute or with a NUL byte",
                where=root,
                hint="the name came from untrusted data (a server or a bundle); do not use it",
            )
    joined = Path(os.path.realpath(base.joinpath(*parts)))
    if joined != base and base not in joined.parents:
        raise PathEscapeError(
            f"refused path {'/'.join(parts)[:200]!r}: it resolves outside {base}",
            where=root,
            hint="the name came from untrusted data (a server or a bundle); do not use it",
        )
    return joined
