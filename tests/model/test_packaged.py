"""Packaged real models: chunks from downloaded wheels, checked, assembled atomically."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from slmops.core.errors import ModelFormatError, UserInputError
from slmops.model.packaged import GEMMA3_270M, find_packaged_gguf, packaged_model


def _fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]):
    monkeypatch.setenv("SLMOPS_MODEL_CACHE", str(tmp_path))
    packages = tuple(f"fake_model_part{i}" for i in range(1, len(chunks) + 1))
    files = tuple(f"fake.gguf.part{i:02d}" for i in range(len(chunks)))
    model = replace(
        GEMMA3_270M,
        name="fake-model",
        file_name="fake.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        packages=packages,
        chunk_files=files,
    )
    return model, packages, files


def _wheels(model, packages, files, chunks) -> None:  # type: ignore[no-untyped-def]
    model.cache_dir.mkdir(parents=True, exist_ok=True)
    for package, name, data in zip(packages, files, chunks, strict=True):
        with zipfile.ZipFile(model.cache_dir / f"{package}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{package}/data/{name}", data)


def test_chunks_from_wheels_assemble_to_the_published_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 7]
    model, packages, files = _fake_model(tmp_path, monkeypatch, chunks)
    _wheels(model, packages, files, chunks)
    path = find_packaged_gguf(model)
    assert path.read_bytes() == b"".join(chunks)
    assert find_packaged_gguf(model) == path  # second call: checked marker, no re-assembly


def test_missing_packages_say_how_to_fetch_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, *_ = _fake_model(tmp_path, monkeypatch, [b"x"])
    with pytest.raises(UserInputError) as exc:
        find_packaged_gguf(model)
    assert exc.value.exit_code == 2
    assert "make fetch-real-model" in (exc.value.hint or "")


def test_a_corrupt_chunk_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    model, packages, files = _fake_model(tmp_path, monkeypatch, chunks)
    _wheels(model, packages, files, [chunks[0], b"tampered"])
    with pytest.raises(ModelFormatError, match="sha256"):
        find_packaged_gguf(model)
    assert not (model.cache_dir / model.file_name).exists()
    assert sorted(p.name for p in model.cache_dir.iterdir()) == sorted(
        f"{p}-1.0.0-py3-none-any.whl" for p in packages
    )  # no temp file left beside the wheels


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(UserInputError) as exc:
        packaged_model("gemma-9000")
    assert "gemma-3-270m" in (exc.value.hint or "")
