"""Content digests: files and directory trees, streamed so memory stays flat."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20

# Files that describe an artifact rather than being part of it; excluded from tree digests so a
# card can record the digest of the directory that contains it.
METADATA_FILES = frozenset({"slmops-card.json"})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-serialisable object in canonical form (sorted keys, no spaces)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def tree_files(root: Path) -> list[Path]:
    """Regular files under root, sorted, excluding metadata files and hidden temp files."""
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.name not in METADATA_FILES and not p.name.startswith(".slmops-tmp")
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def tree_digest(root: Path) -> str:
    """Digest over (relative path, file digest) pairs: renaming or editing any file changes it."""
    if root.is_file():
        return sha256_file(root)
    entries = [(p.relative_to(root).as_posix(), sha256_file(p)) for p in tree_files(root)]
    return sha256_json(entries)


def tree_size(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in tree_files(root))
