"""The recipe engine: runs every variant's chain, caching each step by what determines it.

Cache key = (input digest, pass name, pass version, options). Variants that share a prefix
(export-gguf f16 feeding three quantizations) compute it once; a re-run with nothing changed only
links cached outputs. Each step runs in a child process (see worker.py) and lands atomically,
so a killed run never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from slmops.core.atomic import (
    atomic_directory,
    clean_stale_temps,
    ensure_free_space,
    link_or_copy_tree,
    write_json_atomic,
)
from slmops.core.digest import sha256_json, tree_digest, tree_size
from slmops.core.errors import (
    ModelFormatError,
    ResourceError,
    SlmopsError,
    ToolError,
    UserInputError,
)
from slmops.core.process import die_with_parent
from slmops.model.card import LineageCard, StepRecord, read_card
from slmops.model.handle import (
    ModelFormat,
    ModelHandle,
    hf_parameter_count,
    open_model,
    weights_bytes,
)
from slmops.optimize.recipe import Recipe, Step

CACHE_DIRNAME = ".cache"
RUN_FILE = "optimize-run.json"


class Listener(Protocol):
    def plan(self, total_steps: int) -> None: ...
    def step_started(self, variant: str, index: int, pass_name: str, cached: bool) -> None: ...
    def step_finished(self, outcome: StepOutcome) -> None: ...


class _Silent:
    def plan(self, total_steps: int) -> None:
        pass

    def step_started(self, variant: str, index: int, pass_name: str, cached: bool) -> None:
        pass

    def step_finished(self, outcome: StepOutcome) -> None:
        pass


@dataclass
class StepOutcome:
    variant: str
    index: int
    pass_name: str
    key: str
    cached: bool
    wall_time_s: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    output_bytes: int
    path: Path


@dataclass
class VariantOutcome:
    name: str
    path: Path
    format: str
    kinds: list[str]
    size_bytes: int
    weights_bytes: int
    ratio_to_fp32: float
    ratio_to_input: float
    quantization: str | None = None
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return all(s.cached for s in self.steps)


@dataclass
class OptimizeRun:
    recipe: str
    model: Path
    model_digest: str
    out: Path
    fp32_bytes: int
    input_weights_bytes: int
    variants: list[VariantOutcome]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "model": str(self.model),
            "model_digest": self.model_digest,
            "out": str(self.out),
            "fp32_bytes": self.fp32_bytes,
            "input_weights_bytes": self.input_weights_bytes,
            "wall_time_s": round(self.wall_time_s, 3),
            "variants": [
                {
                    "name": v.name,
                    "path": str(v.path),
                    "format": v.format,
                    "kinds": v.kinds,
                    "quantization": v.quantization,
                    "size_bytes": v.size_bytes,
                    "weights_bytes": v.weights_bytes,
                    "ratio_to_fp32": round(v.ratio_to_fp32, 4),
                    "ratio_to_input": round(v.ratio_to_input, 4),
                    "cached": v.cached,
                    "steps": [
                        {
                            "pass": s.pass_name,
                            "key": s.key,
                            "cached": s.cached,
                            "wall_time_s": round(s.wall_time_s, 3),
                            "peak_rss_bytes": s.peak_rss_bytes,
                            "baseline_rss_bytes": s.baseline_rss_bytes,
                            "output_bytes": s.output_bytes,
                        }
                        for s in v.steps
                    ],
                }
                for v in self.variants
            ],
        }


def step_key(input_digest: str, step: Step) -> str:
    doc: dict[str, object] = {
        "input": input_digest,
        "pass": step.name,
        "version": step.pass_.version,
        "options": step.options,
    }
    content = step.pass_.config.content_digests()
    if content:  # only then: keys of steps without such options stay what they were
        doc["content"] = content
    return sha256_json(doc)[7:39]


def run_recipe(
    model_path: Path,
    recipe: Recipe,
    out: Path,
    *,
    cache_dir: Path | None = None,
    listener: Listener | None = None,
    only: list[str] | None = None,
) -> OptimizeRun:
    t0 = time.perf_counter()
    listener = listener or _Silent()
    model = open_model(model_path, expect=ModelFormat.HF)
    if out.resolve() == model.path.resolve() or model.path.resolve() in out.resolve().parents:
        raise UserInputError("--out must not be the model directory or inside it", where=out)
    names = list(recipe.variants)
    if only:
        unknown = [n for n in only if n not in recipe.variants]
        if unknown:
            raise UserInputError(
                f"unknown variant(s) {unknown}", hint="recipe variants: " + ", ".join(names)
            )
        names = [n for n in names if n in only]
    preflight(model, recipe, names)
    cache = cache_dir or out / CACHE_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run_locked(model, recipe, names, out, cache, listener, t0)


def preflight(model: ModelHandle, recipe: Recipe, names: list[str]) -> None:
    """Refuse the recipe before any step runs when a pass cannot handle this model.

    Every HF-input step is checked against the structure it will receive: the model's, as
    changed by the steps before it (`Pass.predict`). All problems come in one error.
    """
    original = model.arch()
    problems = []
    for vname in names:
        arch = original
        for step in recipe.variants[vname]:
            if step.pass_.input_format is not ModelFormat.HF:
                break  # GGUF/ONNX from here on: nothing HF-structural left to check
            for missing in step.pass_.check_model(arch):
                problems.append(
                    f"variant '{vname}': pass '{step.name}' cannot handle "
                    f"{arch.architecture or '?'} ({arch.model_type}): needs {missing}"
                )
            arch = step.pass_.predict(arch)
    if problems:
        raise UserInputError(
            f"{len(problems)} step(s) of recipe '{recipe.name}' cannot run on this model:\n  "
            + "\n  ".join(problems),
            where=model.path,
            hint="drop these variants (or run others with --variant); "
            "`slmops model info MODEL` shows which passes apply and why not",
        )


def _run_locked(
    model: ModelHandle,
    recipe: Recipe,
    names: list[str],
    out: Path,
    cache: Path,
    listener: Listener,
    t0: float,
) -> OptimizeRun:
    clean_stale_temps(out)
    clean_stale_temps(cache)

    # An input with a card (a dequantized GGUF, an imported folder) keeps its own origin, so every
    # descendant of one downloaded file is evaluated as one family.
    origin_digest = model.card.origin_digest if model.card else model.digest
    fp32 = hf_parameter_count(model.path) * 4
    input_weights = weights_bytes(model.path)
    listener.plan(sum(len(recipe.variants[n]) for n in names))

    outcomes = []
    for vname in names:
        outcomes.append(
            _run_variant(
                vname,
                recipe.variants[vname],
                model.path,
                origin_digest,
                out,
                cache,
                listener,
                fp32,
                input_weights,
            )
        )
    run = OptimizeRun(
        recipe.name,
        model.path,
        origin_digest,
        out,
        fp32,
        input_weights,
        outcomes,
        time.perf_counter() - t0,
    )
    write_json_atomic(out / RUN_FILE, run.to_dict())
    return run


def _run_variant(
    vname: str,
    steps: list[Step],
    origin: Path,
    origin_digest: str,
    out: Path,
    cache: Path,
    listener: Listener,
    fp32: int,
    input_weights: int,
) -> VariantOutcome:
    current = origin
    origin_card = read_card(origin)
    chain: list[StepRecord] = list(origin_card.chain) if origin_card else []
    card: LineageCard | None = origin_card
    current_digest = origin_card.digest if origin_card else origin_digest  # the cache key input
    outcomes: list[StepOutcome] = []
    for i, step in enumerate(steps):
        key = step_key(current_digest, step)
        target = cache / key
        cached = read_card(target) is not None if target.exists() else False
        listener.step_started(vname, i, step.name, cached)
        if not cached:
            _execute_step(
                step, current, current_digest, target, chain, origin_digest, origin, cache
            )
        card = read_card(target)
        if card is None:
            raise ToolError(f"step output has no card after running '{step.name}'", where=target)
        rec = card.chain[-1]
        outcome = StepOutcome(
            vname,
            i,
            step.name,
            key,
            cached,
            rec.wall_time_s,
            rec.peak_rss_bytes,
            rec.baseline_rss_bytes,
            rec.output_bytes,
            target,
        )
        outcomes.append(outcome)
        listener.step_finished(outcome)
        chain = list(card.chain)
        current, current_digest = target, card.digest

    assert card is not None  # steps is non-empty: the recipe compiler refuses empty chains
    final = out / vname
    existing = read_card(final) if final.exists() else None
    if existing is None or existing.digest != card.digest or existing.variant != vname:
        with atomic_directory(final, replace=True) as tmp:
            link_or_copy_tree(current, tmp)
            card.model_copy(update={"variant": vname}).write(tmp)
    wb = weights_bytes(final)
    return VariantOutcome(
        name=vname,
        path=final,
        format=card.format,
        kinds=sorted({s.pass_.kind for s in steps}),
        size_bytes=card.size_bytes,
        weights_bytes=wb,
        ratio_to_fp32=wb / fp32 if fp32 else 0.0,
        ratio_to_input=wb / input_weights if input_weights else 0.0,
        quantization=card.quantization,
        steps=outcomes,
    )


def _execute_step(
    step: Step,
    src: Path,
    src_digest: str,
    target: Path,
    parent_chain: list[StepRecord],
    origin_digest: str,
    origin: Path,
    cache: Path,
) -> None:
    handle = open_model(src)
    ensure_free_space(cache, step.pass_.estimate_output_bytes(handle), what=f"pass '{step.name}'")
    started = datetime.now(UTC).isoformat()
    log_dir = cache / "logs"
    log_dir.mkdir(exist_ok=True)
    log_path = log_dir / f"{target.name}.log"
    with atomic_directory(target, replace=True) as tmp:
        result = _spawn_worker(step, src, tmp, log_path)
        digest = tree_digest(tmp)
        size = tree_size(tmp)
        rec = StepRecord(
            pass_name=step.name,
            pass_version=step.pass_.version,
            kind=step.pass_.kind,
            config=step.options,
            input_digest=src_digest,
            output_digest=digest,
            input_bytes=handle.size_bytes,
            output_bytes=size,
            wall_time_s=round(float(result["wall_time_s"]), 3),
            peak_rss_bytes=int(result["peak_rss_bytes"]),
            baseline_rss_bytes=int(result["baseline_rss_bytes"]),
            tool_versions=step.pass_.tool_versions(),
            started_at=started,
            report=result["result"].get("report") or {},
        )
        pres = result["result"]
        parent = read_card(src)
        LineageCard(
            format=step.pass_.output_format.value,
            digest=digest,
            size_bytes=size,
            origin_digest=origin_digest,
            origin_path=str(origin.resolve()),
            chain=[*parent_chain, rec],
            sparsity=pres.get("sparsity") or (parent.sparsity if parent else None),
            structure=pres.get("structure") or (parent.structure if parent else None),
            quantization=pres.get("quantization") or (parent.quantization if parent else None),
            origin=parent.origin if parent else None,  # where an imported chain began
        ).write(tmp)


def _spawn_worker(step: Step, src: Path, out_dir: Path, log_path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slmops-step-") as td:
        spec = Path(td) / "spec.json"
        res_path = Path(td) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "pass": step.name,
                    "options": step.options,
                    "input": str(src),
                    "output": str(out_dir),
                }
            )
        )
        with log_path.open("w") as log:
            # Same process group as the engine (kill -9 of the group ends the worker too), and a
            # parent-death signal so a worker never outlives an engine killed on its own.
            proc = subprocess.Popen(
                [sys.executable, "-m", "slmops.optimize.worker", str(spec), str(res_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            try:
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if not res_path.exists():
            tail = _tail(log_path)
            if rc in (-signal.SIGKILL, 137):
                raise ResourceError(
                    f"pass '{step.name}' was killed (out of memory?)",
                    where=step.where,
                    hint=f"log: {log_path}\n{tail}",
                )
            raise ToolError(
                f"pass '{step.name}' crashed with exit code {rc}",
                where=step.where,
                hint=f"log: {log_path}\n{tail}",
            )
        result: dict[str, Any] = json.loads(res_path.read_text())
    if not result["ok"]:
        err = result["error"]
        cls = {2: UserInputError, 1: ToolError}.get(int(err.get("exit_code", 1)), ToolError)
        if err.get("error") == "ModelFormatError":
            cls = ModelFormatError
        hint = err.get("hint") or ""
        if err.get("traceback"):
            hint = (hint + "\n" if hint else "") + f"log: {log_path}\n" + err["traceback"][-2000:]
        raise cls(
            f"pass '{step.name}' failed: {err['message']}",
            where=err.get("where") or step.where,
            hint=hint or None,
        )
    return result


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One run per output folder: a second concurrent run would delete the first one's temps."""
    import fcntl

    with (out / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(
                "another slmops optimize is writing to this folder",
                where=out,
                hint="wait for it to finish or choose another --out",
            ) from None
        yield


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def remove_cache(out: Path) -> None:
    shutil.rmtree(out / CACHE_DIRNAME, ignore_errors=True)


__all__ = ["OptimizeRun", "SlmopsError", "StepOutcome", "VariantOutcome", "run_recipe", "step_key"]
