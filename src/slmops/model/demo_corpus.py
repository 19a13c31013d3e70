"""The demo corpus: docstrings of the Python standard library, which every install has offline.

Order is deterministic (sorted file paths, source order inside a file) so that a seed fully
determines the model. Every 20th docstring goes to the held-out file used for evaluation; a
separate slice of training text is written for calibration so calibration never sees held-out text.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
}
HELDOUT_EVERY = 20


@dataclass
class Corpus:
    train_docs: list[str]
    heldout_docs: list[str]
    files: int

    @property
    def train(self) -> str:
        return "\n\n".join(self.train_docs)

    @property
    def heldout(self) -> str:
        return "\n\n".join(self.heldout_docs)

    @property
    def calibration_docs(self) -> list[str]:
        """About 200 training docstrings spread over the corpus; never held-out text."""
        return self.train_docs[:: max(1, len(self.train_docs) // 200)][:200]

    @property
    def calibration(self) -> str:
        return "\n\n".join(self.calibration_docs)

    @property
    def docstrings(self) -> int:
        return len(self.train_docs) + len(self.heldout_docs)


def _docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc.strip())
    return out


def build_corpus(stdlib: Path | None = None, *, limit_chars: int | None = None) -> Corpus:
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    docs: list[str] = []
    seen: set[str] = set()
    chars = 0
    for f in files:
        for d in _docstrings(f):
            # The stdlib repeats docstrings (e.g. decimal and _pydecimal); duplicates would leak
            # held-out text into training.
            if d not in seen:
                seen.add(d)
                docs.append(d)
                chars += len(d)
        if limit_chars and chars > limit_chars:
            break
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return Corpus(train_docs=train, heldout_docs=held, files=len(files))
