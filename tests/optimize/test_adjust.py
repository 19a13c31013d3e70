"""Adjusted recipes: one step away from the running variant, in the direction the field asks."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.core.errors import UserInputError
from slmops.model.card import LineageCard, StepRecord
from slmops.optimize.adjust import adjusted_recipe
from slmops.optimize.recipe import compile_recipe


def card(variant: str, steps: list[tuple[str, dict[str, Any]]]) -> LineageCard:
    chain = [
        StepRecord(
            pass_name=name,
            pass_version=1,
            config=cfg,
            input_digest="sha256:" + "0" * 64,
            output_digest="sha256:" + "1" * 64,
            input_bytes=1,
            output_bytes=1,
            wall_time_s=0.1,
            peak_rss_bytes=1,
            baseline_rss_bytes=1,
            tool_versions={},
            started_at="2026-11-29T00:00:00+00:00",
        )
        for name, cfg in steps
    ]
    return LineageCard(
        format="gguf",
        digest="sha256:" + "2" * 64,
        size_bytes=1,
        origin_digest="sha256:" + "3" * 64,
        chain=chain,
        variant=variant,
    )


PRUNED_Q4 = card(
    "ffn33-gguf-q4_k_m",
    [
        ("prune-structured", {"target": "ffn", "ratio": 0.33, "round_to": 256}),
        ("export-gguf", {"outtype": "f16"}),
        ("quantize-gguf", {"type": "Q4_K_M"}),
    ],
)


def steps(recipe: Any, name: str) -> list[tuple[str, dict[str, Any]]]:
    return [next(iter(s.items())) for s in recipe.variants[name]]


def test_higher_precision_moves_up_the_ladder_and_drops_pruning() -> None:
    r = adjusted_recipe(PRUNED_Q4, "higher-precision")
    assert set(r.variants) == {"next-gguf-q5_k_m", "next-gguf-q6_k", "next-unpruned-gguf-q4_k_m"}
    assert steps(r, "next-gguf-q5_k_m")[-1] == ("quantize-gguf", {"type": "Q5_K_M"})
    assert steps(r, "next-gguf-q5_k_m")[0][0] == "prune-structured"  # only precision changed
    assert [n for n, _ in steps(r, "next-unpruned-gguf-q4_k_m")] == ["export-gguf", "quantize-gguf"]
    compile_recipe(r)  # every chain is a valid recipe


def test_smaller_moves_down_and_adds_pruning_only_when_absent() -> None:
    r = adjusted_recipe(PRUNED_Q4, "smaller")
    assert set(r.variants) == {"next-gguf-q4_0", "next-gguf-q3_k_m"}
    plain = card(
        "gguf-q8_0", [("export-gguf", {"outtype": "f16"}), ("quantize-gguf", {"type": "Q8_0"})]
    )
    r2 = adjusted_recipe(plain, "smaller", rungs=1)
    assert set(r2.variants) == {"next-gguf-q6_k", "next-ffn25-gguf-q8_0"}
    assert steps(r2, "next-ffn25-gguf-q8_0")[0][0] == "prune-structured"
    compile_recipe(r2)


def test_f16_export_gains_or_loses_a_quantize_step() -> None:
    f16 = card("gguf-f16", [("export-gguf", {"outtype": "f16"})])
    r = adjusted_recipe(f16, "smaller", rungs=1)
    assert steps(r, "next-gguf-q8_0") == [
        ("export-gguf", {"outtype": "f16"}),
        ("quantize-gguf", {"type": "Q8_0"}),
    ]
    q8 = card(
        "gguf-q8_0", [("export-gguf", {"outtype": "f16"}), ("quantize-gguf", {"type": "Q8_0"})]
    )
    up = adjusted_recipe(q8, "higher-precision", rungs=1)
    assert steps(up, "next-gguf-f16") == [("export-gguf", {"outtype": "f16"})]


def test_onnx_ladder_and_the_ends_of_ladders() -> None:
    int4 = card("onnx-int4", [("export-onnx", {"precision": "int4"})])
    assert set(adjusted_recipe(int4, "higher-precision").variants) == {
        "next-onnx-int8",
        "next-onnx-fp16",
    }
    with pytest.raises(UserInputError, match="bottom of the onnx ladder"):
        adjusted_recipe(int4, "smaller")
    f16 = card("gguf-f16", [("export-gguf", {"outtype": "f16"})])
    with pytest.raises(UserInputError, match="top of the gguf ladder"):
        adjusted_recipe(f16, "higher-precision")
    with pytest.raises(UserInputError, match="original model"):
        adjusted_recipe(card("orig", []), "smaller")
