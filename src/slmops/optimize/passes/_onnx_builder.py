"""Run onnxruntime-genai's model builder, with fixes for transformers 5 configs and for memory.

transformers 5 stores Gemma 3's RoPE settings per layer type (`rope_parameters:
{full_attention: {...}, sliding_attention: {...}}`, no `rope_local_base_freq`); the pinned
builder (0.18) reads the flat transformers 4 form and fails with KeyError 'rope_type' on every
Gemma 3 checkpoint. Before its Gemma3 model class starts, the nested form is flattened the way the
builder's own Gemma 4 class does it: global parameters stay in `rope_parameters`, the local
(sliding-window) theta goes to `rope_local_base_freq`.

Second, memory: the builder holds the whole fp32 graph in memory and, to quantize it, copies
it into a ModelProto (``ir.to_proto``): two fp32 copies of every weight plus the untied output
layer (peak RSS 3.9 GB for Gemma 3 270M, 3.7x its fp32 size). Before quantizing, the fp32 graph
is written to the temporary cache folder and reloaded as external (memory-mapped) tensors, so
the quantizer reads one weight at a time from the page cache.

Third, what was left of the peak (2.28x the fp32 model above the worker's baseline for Gemma 3
270M int4) came from three places, now bounded to a few MB each with the same output bytes:
- onnx-ir writes a torch tensor through ``.contiguous()``: a full copy of every transposed
  MatMul weight (the 262k x 640 output layer of Gemma 3 is 670 MB). ``write_torch_tensor``
  writes the same bytes block by block.
- every page of the memory-mapped safetensors read while writing stayed resident until the
  graph was dropped (1x the fp32 model): once written, the clean pages are unmapped
  (``FileMappings``; they stay in the page cache).
- ORT's quantizer hands a whole weight to its C++ kernel; memory-mapped from the spill, the
  output layer became resident again: ``quantize_in_row_blocks`` feeds it a few k-blocks at a
  time (each block is quantized on its own, so the arrays are identical).
Measured side by side (worker peak above baseline / fp32 size): Gemma 3 270M int4 2.28x -> 0.85x
(peak 2.48 -> 0.94 GB; the rest is the builder's imports and Gemma's 262k-token tokenizer), and
the slope between a 29 MB and a 646 MB Llama 1.33x -> 0.40x, at the same CPU time; the outputs'
sha256 are unchanged (tests/optimize/test_onnx_memory.py). Everything else runs unchanged:

    python -m slmops.optimize.passes._onnx_builder -i MODEL -o OUT -p int4 -e cpu
"""

from __future__ import annotations

import functools
import os
import runpy
from pathlib import Path
from typing import Any


def flatten_rope_per_layer_type(config: Any) -> None:
    """Nested per-layer-type rope_parameters -> flat global ones + rope_local_base_freq."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    local = params.get("sliding_attention") or {}
    if not hasattr(config, "rope_local_base_freq") or config.rope_local_base_freq is None:
        config.rope_local_base_freq = local.get("rope_theta", 10_000.0)
    config.rope_parameters = dict(params["full_attention"])


def _patch() -> None:
    import importlib

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)

    # builder.py imports its classes as the top-level package `builders`, not through
    # onnxruntime_genai.models.builders: patch the module object it will really use.
    gemma = importlib.import_module("builders.gemma")
    cls: Any = gemma.Gemma3Model
    original = cls.__init__

    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        flatten_rope_per_layer_type(config)
        original(self, config, *args, **kwargs)

    cls.__init__ = init
    _spill_fp32_before_quantizing(importlib.import_module("builders.base").Model)
    _write_torch_tensors_in_chunks()
    _quantize_in_row_blocks()


def _spill_fp32_before_quantizing(model_cls: Any) -> None:
    """Quantize from fp32 weights on disk instead of two in-memory copies.

    The tensors reloaded by ``ir.load`` and carried through the quantizer's ModelProto refer to
    their data file by a relative name, so the working directory is the spill folder while the
    model is quantized and saved (the builder runs alone in its own process).
    """
    import gc
    import os

    import onnx_ir as ir

    original_to_nbits, original_save = model_cls.to_nbits, model_cls.save_model

    def to_nbits(self: Any) -> Any:
        spill = os.path.join(os.path.abspath(self.cache_dir), "fp32-spill")
        os.makedirs(spill, exist_ok=True)
        path = os.path.join(spill, "model.onnx")
        ir.save(self.model, path, external_data="model.onnx.data", size_threshold_bytes=0)
        self.model = ir.load(path)
        # the builder's own handles on the in-memory graph keep every fp32 tensor alive
        self.graph, self.values = self.model.graph, {}
        gc.collect()
        os.chdir(spill)
        return original_to_nbits(self)

    def save_model(self: Any, out_dir: str) -> None:
        here = os.getcwd()
        try:
            original_save(self, os.path.abspath(out_dir))
        finally:
            os.chdir(here)

    model_cls.to_nbits, model_cls.save_model = to_nbits, save_model


# Row chunks of at most this many bytes are materialized when a strided tensor is written.
WRITE_CHUNK_BYTES = 16 << 20
MADV_DONTNEED = 4  # Linux


class FileMappings:
    """This process's memory-mapped files with no page changed in memory, read from /proc.

    A page written through a private file mapping (torch maps safetensors that way) becomes an
    anonymous copy, and MADV_DONTNEED would discard it; a mapping with no anonymous page holds
    nothing but the file's own pages (Shared or Private "Dirty" there only means not yet written
    back to disk), so its pages can be dropped and read again from the page cache when needed.
    Mappings are snapshotted before a save, which only reads the weights; each release checks
    that the mapping is still there (an address unmapped since may now be other memory).
    """

    def __init__(self) -> None:
        self.clean: list[tuple[int, int, str]] = []  # start, end, path
        try:
            text = Path("/proc/self/smaps").read_text()
        except OSError:  # not Linux: nothing is released, nothing breaks
            return
        current: tuple[int, int, str] | None = None
        for line in text.splitlines():
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                path = head[5] if len(head) == 6 else ""
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                usable = head[4] != "0" and path.startswith("/") and "(deleted)" not in path
                current = (lo, hi, path) if usable else None
            elif current is not None and head[0] == "Anonymous:" and head[1] != "0":
                current = None
            elif current is not None and head[0] == "VmFlags:":
                self.clean.append(current)
                current = None

    def release(self, address: int, nbytes: int) -> int:
        """Unmap the clean file pages overlapping [address, address + nbytes); bytes released."""
        import ctypes
        import mmap

        page = mmap.PAGESIZE
        lo, hi = address // page * page, -(-(address + nbytes) // page) * page
        done = 0
        for start, end, path in self.clean:
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            try:  # the same file still mapped at the same place
                same = os.readlink(f"/proc/self/map_files/{start:x}-{end:x}") == path
            except OSError:
                same = False
            size = ctypes.c_size_t(b - a)
            if same and _libc().madvise(ctypes.c_void_p(a), size, MADV_DONTNEED) == 0:
                done += b - a
        return done


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _memory(t: Any) -> Any:
    """The bytes of a contiguous CPU torch tensor, without a copy (any dtype, bf16 included).

    The view does not keep ``t`` alive: the caller holds ``t`` while the view is in use.
    """
    import ctypes

    return memoryview((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_torch_tensor(t: Any, file: Any, release: FileMappings | None = None) -> None:
    """Write ``t.contiguous()``'s bytes to ``file`` holding at most WRITE_CHUNK_BYTES of copies.

    Contiguous: written from the tensor's own memory, a chunk at a time. The transpose of a contiguous matrix (how
    the builder hands over every MatMul weight, ``weight.T``): the matrix is read in blocks of
    its rows, and each block's columns are written at their places in the file. Any other layout:
    slices along dim 0, one after the other (C order is row after row). With ``release``, the
    clean file pages of what was read are unmapped as it goes.
    """
    t = t.detach()
    nbytes = t.numel() * t.element_size()
    if t.is_contiguous():
        data = _memory(t)
        for i in range(0, nbytes, WRITE_CHUNK_BYTES):
            file.write(data[i : i + WRITE_CHUNK_BYTES])
            if release is not None:
                release.release(t.data_ptr() + i, min(WRITE_CHUNK_BYTES, nbytes - i))
        return
    fd = _fileno(file)
    if t.dim() == 2 and t.t().is_contiguous() and nbytes > WRITE_CHUNK_BYTES and fd is not None:
        rows, cols = t.shape
        w, es = t.t(), t.element_size()  # w: [cols, rows], contiguous
        file.flush()
        base = file.tell()
        step = max(1, WRITE_CHUNK_BYTES // max(1, rows * es))
        for j in range(0, cols, step):
            part = w[j : j + step]
            block = part.t().contiguous()  # [rows, part columns]
            data, width = _memory(block), block.shape[1] * es
            for i in range(rows):
                _pwrite_all(fd, data[i * width : (i + 1) * width], base + (i * cols + j) * es)
            if release is not None:
                release.release(part.data_ptr(), part.numel() * es)
        file.seek(base + nbytes)
        return
    row_bytes = nbytes // max(1, t.shape[0])
    step = max(1, WRITE_CHUNK_BYTES // max(1, row_bytes))
    for i in range(0, t.shape[0], step):
        piece = t[i : i + step].contiguous()  # held: the view below does not keep it alive
        file.write(_memory(piece))
    if release is not None and t.untyped_storage().nbytes():
        storage = t.untyped_storage()
        release.release(storage.data_ptr(), storage.nbytes())


def _fileno(file: Any) -> int | None:
    try:
        return int(file.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def _write_torch_tensors_in_chunks() -> None:
    """onnx-ir's TorchTensor.tofile -> write_torch_tensor; every ir.save releases model pages."""
    import onnx_ir as ir
    import torch
    from onnx_ir.tensor_adapters import TorchTensor

    original_tofile = TorchTensor.tofile
    original_save = ir.save
    state: dict[str, FileMappings | None] = {"mappings": None}

    def tofile(self: Any, file: Any) -> None:
        raw = self.raw
        if not isinstance(raw, torch.Tensor) or raw.device.type != "cpu" or raw.dim() == 0:
            original_tofile(self, file)
            return
        write_torch_tensor(raw, file, state["mappings"])

    def save(model: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        state["mappings"] = FileMappings()
        try:
            original_save(model, path, *args, **kwargs)
        finally:
            state["mappings"] = None

    TorchTensor.tofile = tofile  # type: ignore[method-assign]
    ir.save = save


def _quantize_in_row_blocks() -> None:
    """ORT's DefaultWeightOnlyQuantizer.qbits_block_quant -> quantize_in_row_blocks."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    cls: Any = mnq.DefaultWeightOnlyQuantizer
    original = cls.qbits_block_quant

    def qbits_block_quant(self: Any, weight: Any) -> Any:
        return quantize_in_row_blocks(self, weight, original)

    cls.qbits_block_quant = qbits_block_quant


def quantize_in_row_blocks(quantizer: Any, weight: Any, original: Any) -> Any:
    """MatMulNBits quantization of a large [K, N] weight a few k-blocks at a time.

    ORT's default quantizer hands the whole weight to its C++ kernel; memory-mapped from the
    spill file, all of it becomes resident (the 670 MB output layer of Gemma 3). Each (column,
    k-block) is quantized on its own, so running the kernel on row blocks (whole k-blocks, and
    whole bytes of packed zero points) and placing the results gives the same arrays; the
    weight's file pages are released after each block. Anything else goes to ``original``.
    """
    import numpy as np
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    cfg = quantizer.config
    kernels = {
        2: mnq.quantize_matmul_2bits,
        4: mnq.quantize_matmul_4bits,
        8: mnq.quantize_matmul_8bits,
    }
    if (
        cfg.quant_format != mnq.QuantFormat.QOperator
        or cfg.bits not in kernels
        or getattr(weight, "ndim", 0) != 2
        or not weight.flags.c_contiguous
        or weight.nbytes <= 2 * WRITE_CHUNK_BYTES
    ):
        return original(quantizer, weight)
    rows, cols = weight.shape
    bs, kpack = cfg.block_size, 8 // cfg.bits
    k_blocks, blob = -(-rows // bs), -(-bs // kpack)
    packed = np.zeros((cols, k_blocks, blob), dtype="uint8")
    zero_point = np.zeros((cols, -(-k_blocks // kpack)), dtype="uint8")
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    row_bytes = cols * weight.itemsize
    step = max(1, WRITE_CHUNK_BYTES // max(1, bs * row_bytes * kpack)) * kpack
    release = FileMappings()
    for kb in range(0, k_blocks, step):
        n = min(step, k_blocks - kb)
        part = weight[kb * bs : (kb + n) * bs]
        real_rows = part.shape[0]
        if real_rows < n * bs:  # as ORT does: zero-padded array, the real row count
            part = np.pad(part, ((0, n * bs - real_rows), (0, 0)), "constant")
        p = np.zeros((cols, n, blob), dtype="uint8")
        z = np.zeros((cols, -(-n // kpack)), dtype="uint8")
        sc = np.zeros((cols, n), dtype=weight.dtype)
        kernels[cfg.bits](p, part, sc, z, bs, cols, real_rows, cfg.is_symmetric)
        packed[:, kb : kb + n] = p
        scales[:, kb : kb + n] = sc
        zero_point[:, kb // kpack : kb // kpack + z.shape[1]] = z
        release.release(weight.ctypes.data + kb * bs * row_bytes, n * bs * row_bytes)
    return packed, scales, zero_point


def main() -> None:
    """Apply the fixes above, then run the builder's own command line on sys.argv."""
    _patch()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
