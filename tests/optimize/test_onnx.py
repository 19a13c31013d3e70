"""export-onnx on a tiny model, loaded and run in the real ONNX Runtime GenAI."""

from pathlib import Path

import pytest

from slmops.model.handle import ModelFormat, open_model
from slmops.optimize.passes.base import build_pass


def _generate(onnx_dir: Path, prompt_ids: list[int]) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_export_onnx_precisions(tiny_model: Path, tmp_path: Path, precision: str) -> None:
    p = build_pass("export-onnx", {"precision": precision, "block_size": 32})
    out = tmp_path / precision
    out.mkdir()
    res = p.run(open_model(tiny_model), out)
    assert res.quantization == precision.upper()
    assert open_model(out).format is ModelFormat.ONNX
    seq = _generate(out, [0, 5, 6, 7])
    assert seq[:4] == [0, 5, 6, 7] and len(seq) > 4


def test_int4_is_smaller_than_fp32(tiny_model: Path, tmp_path: Path) -> None:
    from slmops.model.handle import weights_bytes

    sizes = {}
    for prec in ("fp32", "int4"):
        out = tmp_path / prec
        out.mkdir()
        build_pass("export-onnx", {"precision": prec}).run(open_model(tiny_model), out)
        sizes[prec] = weights_bytes(out)
    assert sizes["int4"] < 0.5 * sizes["fp32"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "phi3"])
def test_llama_family_exports_and_runs(
    tiny_arch_models: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    out = tmp_path / arch
    out.mkdir()
    build_pass("export-onnx", {"precision": "int4"}).run(open_model(tiny_arch_models[arch]), out)
    seq = _generate(out, [0, 5, 6, 7])
    assert len(seq) > 4
