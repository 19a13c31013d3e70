"""export-onnx memory fixes: same bytes as the unpatched builder, pages released only when safe.

The builder wrapper writes torch tensors in row chunks and unmaps the model file's pages once
written (see _onnx_builder.py). Both must leave the output byte for byte what the
onnxruntime-genai builder itself writes, and a page changed in memory must never be dropped.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slmops.optimize.passes import _onnx_builder
from slmops.optimize.passes._onnx_builder import FileMappings, write_torch_tensor

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")

BUILDER_ARGS = ["-e", "cpu", "--extra_options", "block_size=32", "is_symmetric=true"]
# A tiny chunk so that every transposed MatMul weight of the tiny model is written in pieces.
PATCHED = (
    "from slmops.optimize.passes import _onnx_builder as b; b.WRITE_CHUNK_BYTES = 1024; b.main()"
)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name in ("model.onnx", "model.onnx.data")
    }


def _build(head: list[str], model: Path, out: Path, precision: str, cache: Path) -> None:
    cmd = [sys.executable, *head, "-i", str(model), "-o", str(out), "-p", precision]
    cmd += ["-c", str(cache), *BUILDER_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_output_is_byte_identical_to_the_plain_builder(
    tiny_model: Path, tmp_path: Path, precision: str
) -> None:
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    _build(["-m", "onnxruntime_genai.models.builder"], tiny_model, ref, precision, tmp_path / "c1")
    _build(["-c", PATCHED], tiny_model, ours, precision, tmp_path / "c2")
    want = _digests(ref)
    assert set(want) == {"model.onnx", "model.onnx.data"}
    assert _digests(ours) == want


def _rss_kb(path: Path) -> int:
    """Resident KB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@linux_only
def test_clean_file_pages_are_released_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    values = np.arange(1 << 20, dtype=np.float32)  # 4 MB
    values.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="c")  # private, writable: as torch maps safetensors
    assert float(mm.sum(dtype=np.float64)) == float(values.sum(dtype=np.float64))
    assert _rss_kb(path) >= 4000
    released = FileMappings().release(mm.ctypes.data, mm.nbytes)
    assert released >= mm.nbytes
    assert _rss_kb(path) < 100
    assert np.array_equal(mm, values)  # read again from the page cache
    del mm


@linux_only
def test_a_mapping_changed_in_memory_is_never_released(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    np.arange(1 << 20, dtype=np.float32).tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="c")
    mm[0] = -1.0  # copy-on-write: only this process's memory holds the new value
    assert FileMappings().release(mm.ctypes.data, mm.nbytes) == 0
    assert mm[0] == -1.0 and mm[1] == 1.0
    del mm


def _torch_cases() -> dict[str, object]:
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g)
    return {
        "contiguous": w,
        "transposed": w.T,  # how the builder hands over MatMul weights
        "transposed-bf16": w.to(torch.bfloat16).T,
        "every-other-column": w[:, ::2],
        "permuted-3d": torch.randn(6, 50, 40, generator=g).permute(2, 0, 1),
    }


@pytest.mark.parametrize("case", list(_torch_cases()))
def test_torch_tensor_written_in_chunks_has_the_contiguous_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    import torch

    monkeypatch.setattr(_onnx_builder, "WRITE_CHUNK_BYTES", 256)
    t = _torch_cases()[case]
    assert isinstance(t, torch.Tensor)
    c = t.contiguous()
    want = (c.view(torch.int16) if c.dtype == torch.bfloat16 else c).numpy().tobytes()
    path = tmp_path / "data"
    with path.open("wb") as f:  # a tensor is written at an offset inside the external data file
        f.write(b"head")
        write_torch_tensor(t, f)
        f.write(b"tail")
    assert path.read_bytes() == b"head" + want + b"tail"


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_row_block_quantization_matches_ort(
    monkeypatch: pytest.MonkeyPatch, bits: int, symmetric: bool
) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    monkeypatch.setattr(_onnx_builder, "WRITE_CHUNK_BYTES", 4096)  # a few k-blocks per call
    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, quant_format=QuantFormat.QOperator, bits=bits
    )
    quantizer = mnq.DefaultWeightOnlyQuantizer(config)
    # 9 k-blocks, the last one partial: odd packed zero points and a zero-padded block
    weight = np.random.default_rng(0).standard_normal((32 * 8 + 5, 96)).astype(np.float32)
    original = mnq.DefaultWeightOnlyQuantizer.qbits_block_quant
    want = original(quantizer, weight)
    got = _onnx_builder.quantize_in_row_blocks(quantizer, weight, original)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
