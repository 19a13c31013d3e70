"""export-gguf and quantize-gguf on tiny models, loaded and run in the real llama.cpp."""

from pathlib import Path

import pytest

from slmops.core.errors import ConfigError
from slmops.model.handle import ModelFormat, open_model
from slmops.optimize.passes.base import build_pass


def _run(name: str, options: dict, src: Path, out: Path) -> Path:
    p = build_pass(name, options)
    p.prepare()
    out.mkdir(parents=True)
    p.run(open_model(src), out)
    return out


def _generate(gguf_dir: Path) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(next(gguf_dir.glob("*.gguf"))), n_ctx=128, n_threads=2, verbose=False, seed=0
    )
    out = llm("Return the", max_tokens=8, temperature=0.0)
    return str(out["choices"][0]["text"])


@pytest.fixture(scope="module")
def f16_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run("export-gguf", {"outtype": "f16"}, tiny_model, tmp_path_factory.mktemp("g") / "f16")


def test_export_locally_trained_tokenizer_loads_and_generates(f16_gguf: Path) -> None:
    assert open_model(f16_gguf).format is ModelFormat.GGUF
    text = _generate(f16_gguf)
    assert isinstance(text, str)


def test_export_f32_is_twice_f16(tiny_model: Path, f16_gguf: Path, tmp_path: Path) -> None:
    f32 = _run("export-gguf", {"outtype": "f32"}, tiny_model, tmp_path / "f32")
    a = next(f32.glob("*.gguf")).stat().st_size
    b = next(f16_gguf.glob("*.gguf")).stat().st_size
    assert 1.6 < a / b < 2.1


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"])
def test_quantize_types_shrink_and_run(f16_gguf: Path, tmp_path: Path, qtype: str) -> None:
    import gguf

    out = _run("quantize-gguf", {"type": qtype}, f16_gguf, tmp_path / qtype)
    q = next(out.glob("*.gguf"))
    assert q.stat().st_size < next(f16_gguf.glob("*.gguf")).stat().st_size
    reader = gguf.GGUFReader(str(q))
    types = {t.tensor_type.name for t in reader.tensors}
    assert types - {"F32", "F16"}, f"{qtype} produced no quantized tensor: {types}"
    _generate(out)


def test_quantize_rejects_unknown_type(f16_gguf: Path, tmp_path: Path) -> None:
    p = build_pass("quantize-gguf", {"type": "Q3_Z"})
    with pytest.raises(ConfigError, match="unsupported quantization type 'Q3_Z'"):
        p.prepare()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "phi3"])
def test_llama_family_exports_and_runs(
    tiny_arch_models: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    out = _run("export-gguf", {"outtype": "f16"}, tiny_arch_models[arch], tmp_path / arch)
    q = _run("quantize-gguf", {"type": "Q8_0"}, out, tmp_path / f"{arch}-q8")
    _generate(q)
