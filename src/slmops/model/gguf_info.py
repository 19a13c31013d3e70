"""What a GGUF file is, read from its own header: architecture, quantization, per-tensor types.

Users arrive with GGUF files they downloaded, so nothing about such a file is trusted: the magic,
the version, every tensor's extent (a truncated download is the common failure) and the
architecture (llama.cpp refuses names it does not know, and it should fail here, with the file
named, rather than deep inside a runtime on a device). The header is read with the `gguf`
package's memory-mapped GGUFReader, so a multi-GB file costs page-cache, not RSS.

The architecture list comes from the gguf-py vendored with our llama.cpp (it matches the
runtime's own version and knows newer models than the PyPI `gguf`), loaded as a standalone
module so it never displaces the PyPI package the rest of the process uses.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from slmops.core.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_CONVERTER = "convert_hf_to_gguf.py"
# Scalar metadata worth keeping in a card (the tokenizer arrays are megabytes).
_KEPT_KEYS = (
    "general.name",
    "general.basename",
    "general.size_label",
    "general.finetune",
    "general.license",
    "general.quantization_version",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
)


@dataclass
class GgufInfo:
    """Facts about one GGUF file, as its header states them."""

    path: Path
    version: int
    architecture: str
    file_type: str  # llama.cpp's file type name: Q4_K_M, Q8_0, F16, ... ("unknown" if absent)
    parameters: int
    context_length: int | None
    tensor_types: dict[str, int]  # tensor count per ggml type, most frequent first
    tensor_type_bytes: dict[str, int]  # bytes per ggml type
    tensors: dict[str, str]  # tensor name -> ggml type, in file order
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "gguf_version": self.version,
            "architecture": self.architecture,
            "quantization": self.file_type,
            "parameters": self.parameters,
            "context_length": self.context_length,
            "tensor_count": len(self.tensors),
            "tensor_types": self.tensor_types,
            "tensor_type_bytes": self.tensor_type_bytes,
            "tensors": self.tensors,
            "metadata": self.metadata,
        }


def _llama_cpp_tools_dir() -> Path | None:
    """Where `make install` put llama.cpp's Python tools (same lookup as the export passes;
    model/ must not import optimize/)."""
    candidates = []
    if env := os.environ.get("SLMOPS_LLAMA_CPP_DIR"):
        candidates.append(Path(env))
    candidates.append(Path(sys.prefix) / "share" / "slmops" / "llama.cpp")
    return next((c for c in candidates if (c / _CONVERTER).exists()), None)


@cache
def _constants() -> tuple[ModuleType, str]:
    """The gguf constants module to trust, and where it came from.

    The vendored one is loaded from its file under a private module name: its `constants.py`
    imports only the standard library, and the PyPI `gguf` in sys.modules stays untouched.
    """
    tools = _llama_cpp_tools_dir()
    if tools is not None:
        path = tools / "gguf-py" / "gguf" / "constants.py"
        spec = importlib.util.spec_from_file_location("_slmops_vendored_gguf_constants", path)
        if spec is not None and spec.loader is not None and path.exists():
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # enum/dataclass machinery looks the module up
            try:
                spec.loader.exec_module(mod)
                return mod, f"llama.cpp gguf-py ({path})"
            except Exception:  # an unusable vendored copy: fall back to the PyPI one
                del sys.modules[spec.name]
    import gguf.constants

    return gguf.constants, f"gguf {_pypi_gguf_version()} (PyPI)"


def _pypi_gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def known_architectures() -> tuple[frozenset[str], str]:
    """Architecture names llama.cpp knows, and the source of the list."""
    mod, source = _constants()
    return frozenset(str(v) for v in mod.MODEL_ARCH_NAMES.values()), source


def file_type_name(value: int) -> str:
    """llama.cpp's name for a `general.file_type` value: 15 -> Q4_K_M, 0 -> F32."""
    mod, _ = _constants()
    try:
        name = str(mod.LlamaFileType(value).name)
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _bad(path: Path, what: str, hint: str | None = None) -> ModelFormatError:
    return ModelFormatError(
        what,
        where=path,
        hint=hint
        or "re-download the file (compare its sha256 with the publisher's) or re-export it",
    )


def _check_header(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise _bad(path, f"cannot read the file: {exc.strerror}", hint="check the path") from None
    if head[:4] != GGUF_MAGIC:
        shown = head[:4].decode("latin-1").encode("unicode_escape").decode()
        raise _bad(
            path,
            f"not a GGUF file: it starts with {shown!r}, not the GGUF magic 'GGUF'",
            hint="pass a .gguf model file (llama.cpp format); a renamed file of another format "
            "cannot be imported",
        )
    if len(head) < 8:
        raise _bad(path, "truncated GGUF file: it ends inside the header")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise _bad(
            path,
            f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
            hint="convert the model with a current llama.cpp, or upgrade slmops",
        )
    return version


# Arrays longer than this are read in one numpy view (numbers) or skipped (strings): the reader's
# per-element parsing takes ~40 s on a 262k-token vocabulary, which no metadata read needs.
_FAST_ARRAY_MIN = 1024


def _reader(path: Path) -> Any:
    """GGUFReader with two changes: every tensor's extent is checked against the file before it
    is mapped (a truncated file is reported as such, not as a numpy reshape error), and long
    metadata arrays (the tokenizer's) are read in one step or skipped."""
    import numpy as np
    from gguf import GGUFReader, ReaderField
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    class _Checked(GGUFReader):  # type: ignore[misc]
        def _truncated(self, what: str, end: int) -> ModelFormatError:
            return _bad(
                path,
                f"truncated GGUF file: {what} ends at byte {end:,} but the file has "
                f"{int(self.data.nbytes):,} bytes",
            )

        def _fast_array(self, offs: int) -> tuple[int, list[Any], list[int], list[Any]] | None:
            raw_itype = self._get(offs, np.uint32)
            alen = self._get(offs + 4, np.uint64)
            if len(raw_itype) != 1 or len(alen) != 1:
                raise self._truncated("a metadata array header", offs + 12)
            n, start = int(alen[0]), offs + 12
            try:
                itype = GGUFValueType(int(raw_itype[0]))
            except ValueError:
                return None
            if n < _FAST_ARRAY_MIN:
                return None
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                arr = self._get(start, nptype, n)
                if arr.size != n:
                    raise self._truncated("a metadata array", start + n * arr.itemsize)
                return (
                    start + int(arr.nbytes) - offs,
                    [raw_itype, alen, arr],
                    [2],
                    [
                        GGUFValueType.ARRAY,
                        itype,
                    ],
                )
            if itype == GGUFValueType.STRING:
                order: Literal["little", "big"] = "big" if self.byte_order == "S" else "little"
                buf, size, o = self.data.data, int(self.data.nbytes), start
                for _ in range(n):
                    if o + 8 > size:
                        raise self._truncated("a metadata string array", o + 8)
                    o += 8 + int.from_bytes(buf[o : o + 8], order)
                if o > size:
                    raise self._truncated("a metadata string array", o)
                return o - offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]
            return None

        def _build_fields(self, offs: int, count: int) -> int:
            for _ in range(count):
                orig = offs
                klen, kdata = self._get_str(offs)
                offs += int(klen.nbytes + kdata.nbytes)
                raw_type = self._get(offs, np.uint32)
                offs += int(raw_type.nbytes)
                fast = self._fast_array(offs) if int(raw_type[0]) == GGUFValueType.ARRAY else None
                size, fparts, fidx, ftypes = fast or self._get_field_parts(offs, raw_type[0])
                self._push_field(
                    ReaderField(
                        orig,
                        str(bytes(kdata), encoding="utf-8"),
                        [klen, kdata, raw_type, *fparts],
                        [i + 3 for i in fidx],
                        ftypes,
                    ),
                    skip_sum=True,
                )
                offs += size
            return offs

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            for f in fields:
                _nl, name_data, _nd, dims, raw_dtype, offset_tensor = f.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                except (ValueError, KeyError):
                    raise _bad(
                        path,
                        f"tensor {name!r} has tensor type id {int(raw_dtype[0])}, "
                        "which this gguf reader does not know",
                        hint="the file may need a newer llama.cpp; upgrade llama-cpp-python and gguf",
                    ) from None
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                end = int(start_offs) + int(offset_tensor[0]) + n * type_size // block
                if end > int(self.data.nbytes):
                    raise self._truncated(f"tensor {name!r}", end)
            super()._build_tensors(start_offs, fields)

    return _Checked(path, "r")


def gguf_reader(path: Path) -> Any:
    """A GGUFReader that opens a 262k-vocabulary file in ~2 s instead of ~40 s (long tokenizer
    arrays are read in one step or skipped) and reports truncation plainly; scalar metadata
    reads as with the stock reader (`reader.fields[key].contents()`)."""
    return _reader(path)


def string_array(reader: Any, key: str) -> list[str] | None:
    """The strings of a metadata string array (e.g. ``tokenizer.ggml.tokens``), or None.

    ``gguf_reader`` skips long string arrays while opening (262k tokens as numpy views cost
    ~40 s); this walks the one array asked for straight from the memory map (~0.3 s).
    """
    from gguf.constants import GGUFValueType

    field = reader.get_field(key)
    if field is None or not field.types or field.types[0] != GGUFValueType.ARRAY:
        return None
    if field.types[-1] != GGUFValueType.STRING:
        return None
    if field.data:  # a short array the reader parsed itself
        return [str(v) for v in field.contents()]
    order: Literal["little", "big"] = "big" if reader.byte_order == "S" else "little"
    buf = reader.data.data
    klen, kdata = field.parts[0], field.parts[1]
    o = int(field.offset) + int(klen.nbytes) + int(kdata.nbytes) + 4  # key, value type
    o += 4  # item type
    n = int.from_bytes(buf[o : o + 8], order)
    o += 8
    out: list[str] = []
    for _ in range(n):
        size = int.from_bytes(buf[o : o + 8], order)
        out.append(bytes(buf[o + 8 : o + 8 + size]).decode("utf-8", "replace"))
        o += 8 + size
    return out


def _scalar(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_gguf_info(path: Path, *, check_architecture: bool = True) -> GgufInfo:
    """Validate a GGUF file and read its facts; ModelFormatError (exit 2) names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError("no such file", where=path, hint="check the path")
    version = _check_header(path)
    try:
        reader = _reader(path)
    except ModelFormatError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise _bad(path, f"corrupt GGUF header: {exc}") from None
    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _bad(path, "the GGUF header has no general.architecture")
    if check_architecture:
        known, source = known_architectures()
        if arch not in known:
            raise ModelFormatError(
                f"architecture {arch!r} is not one llama.cpp knows ({len(known)} known, "
                f"from {source})",
                where=path,
                hint="this file cannot run on any slmops runtime; if it was made by a newer "
                "llama.cpp, upgrade llama-cpp-python",
            )
    ft = _scalar(reader, "general.file_type")
    counts: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    tensors: dict[str, str] = {}
    params = 0
    for t in reader.tensors:
        tname = t.tensor_type.name
        counts[tname] += 1
        type_bytes[tname] += int(t.n_bytes)
        tensors[t.name] = tname
        params += int(t.n_elements)
    if isinstance(ft, int):
        file_type = file_type_name(ft)
    else:
        # No file type recorded: name the dominant type by bytes, and say it was guessed.
        file_type = f"{type_bytes.most_common(1)[0][0]} (guessed)" if type_bytes else "unknown"
    ctx = _scalar(reader, f"{arch}.context_length")
    metadata = {k: v for k in _KEPT_KEYS if (v := _scalar(reader, k)) is not None}
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.parts) > 4:  # key len, key, type, item type, length
        metadata["tokenizer.ggml.tokens.count"] = int(tokens.parts[4][0])
    return GgufInfo(
        path=path,
        version=version,
        architecture=arch,
        file_type=file_type,
        parameters=params,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        tensor_types=dict(counts.most_common()),
        tensor_type_bytes=dict(type_bytes.most_common()),
        tensors=tensors,
        metadata=metadata,
    )
