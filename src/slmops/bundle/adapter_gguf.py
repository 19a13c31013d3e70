"""Read a GGUF file's header (metadata and tensor shapes) without its tensor data or any library.

An adapter ships only if its LoRA tensors fit the base it names, and a device loads it only if
they fit the GGUF it runs: llama.cpp refuses a mismatched adapter at load time (or, worse, some
versions abort the process), so both sides check the shapes first, from the headers alone.

Why not the `gguf` package: the agent must stay small, and importing PyPI's `gguf` into a
process that later runs llama.cpp's own converter makes the converter pick up the wrong copy
(DESIGN.md pitfalls). The header format (GGUF v2/v3) is small: magic, version, counts, key/value
pairs, then one (name, dims, type, offset) record per tensor. Everything is bounded because the
file is untrusted: counts, string lengths and array lengths are capped before anything is read.

Agent-safe: the standard library only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from slmops.core.errors import CheckFailedError

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING = 1 << 24
MAX_ARRAY = 1 << 26
MAX_DIMS = 8
# value types (gguf spec): fixed-size scalars by type id, then string (8) and array (9)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
KEPT_ARRAY_ITEMS = 16  # arrays (vocabularies) are skipped past, not kept


class GgufHeaderError(CheckFailedError):
    """Not a GGUF file, or a header that is truncated or over a limit (exit code 1)."""


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, object] = field(default_factory=dict)  # scalars and strings only
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> dims (ggml order)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, fh: BinaryIO, where: str) -> None:
        self.fh, self.where = fh, where

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GgufHeaderError("GGUF header is truncated", where=self.where)
        return data

    def unpack(self, fmt: str) -> object:
        value: object = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING:
            raise GgufHeaderError(f"GGUF string of {n} bytes is over the limit", where=self.where)
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        if n > MAX_STRING:
            raise GgufHeaderError(f"GGUF string of {n} bytes is over the limit", where=self.where)
        self.fh.seek(n, 1)

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if count > MAX_ARRAY:
                raise GgufHeaderError(f"GGUF array of {count} items", where=self.where)
            if item in _SCALARS:  # fixed size: jump over it
                self.fh.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            elif item == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                raise GgufHeaderError(f"GGUF array of type {item} not supported", where=self.where)
            return None
        raise GgufHeaderError(f"unknown GGUF value type {kind}", where=self.where)


def read_header(path: Path) -> GgufHeader:
    """The metadata scalars and every tensor's shape of a GGUF file (reads the header only)."""
    try:
        with Path(path).open("rb") as fh:
            return parse_header(fh, str(path))
    except OSError as exc:
        raise GgufHeaderError(f"cannot read the GGUF file: {exc.strerror}", where=path) from None


def parse_header(fh: BinaryIO, where: str) -> GgufHeader:
    """`read_header` over an open, seekable binary file (a bundle blob, a staged download)."""
    r = _Reader(fh, where)
    if r.take(4) != MAGIC:
        raise GgufHeaderError(
            "not a GGUF file (bad magic)",
            where=where,
            hint="an adapter must be the adapter.gguf that `slmops adapt` writes",
        )
    version = r.u32()
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} is not supported", where=where)
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GgufHeaderError(
            f"GGUF header declares {n_tensors} tensors and {n_kv} keys", where=where
        )
    header = GgufHeader(version)
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.u32())
        if value is not None:
            header.metadata[key] = value
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > MAX_DIMS:
            raise GgufHeaderError(f"tensor {name!r} has {n_dims} dimensions", where=where)
        dims = tuple(r.u64() for _ in range(n_dims))
        r.u32()  # ggml type
        r.u64()  # offset
        header.tensors[name] = dims
    return header


def lora_pairs(adapter: GgufHeader, where: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """Base tensor name -> the (in, out) shape a LoRA pair implies, and the rank.

    llama.cpp's LoRA tensors are ``NAME.lora_a`` with dims (in, r) and ``NAME.lora_b`` with
    dims (r, out), in ggml order; the base tensor NAME has dims (in, out). Every pair must be
    complete and every pair must have the same rank.
    """
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, dims in adapter.tensors.items():
        base, dot, part = name.rpartition(".")
        if not dot or part not in ("lora_a", "lora_b"):
            raise GgufHeaderError(f"tensor {name!r} is not a LoRA tensor", where=where)
        pairs.setdefault(base, {})[part] = dims
    if not pairs:
        raise GgufHeaderError("the adapter holds no LoRA tensors", where=where)
    shapes: dict[str, tuple[int, ...]] = {}
    ranks: set[int] = set()
    for base, pair in sorted(pairs.items()):
        a, b = pair.get("lora_a"), pair.get("lora_b")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise GgufHeaderError(
                f"LoRA pair for {base!r} is incomplete or its rank does not match "
                f"(lora_a {a}, lora_b {b})",
                where=where,
                hint="the adapter file is corrupt; export it again with `slmops adapt`",
            )
        ranks.add(a[1])
        shapes[base] = (a[0], b[1])
    if len(ranks) != 1:
        raise GgufHeaderError(f"LoRA pairs have different ranks {sorted(ranks)}", where=where)
    return shapes, ranks.pop()


def shape_mismatches(
    shapes: dict[str, tuple[int, ...]], base: GgufHeader, *, limit: int = 3
) -> list[str]:
    """Sentences naming the LoRA targets the base lacks or whose shape differs (empty: fits)."""
    problems: list[str] = []
    for name, want in sorted(shapes.items()):
        got = base.tensors.get(name)
        if got is None:
            problems.append(f"the base has no tensor {name}")
        elif tuple(got) != tuple(want):
            problems.append(f"{name} is {list(got)} in the base, the adapter fits {list(want)}")
        if len(problems) >= limit:
            break
    return problems
