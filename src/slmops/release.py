"""One release pipeline: optimize -> evaluate -> bundle -> sign.

The demo, the improvement job and the tests each used to wire these four stages by hand, and
the copies drifted (one tolerated a candidate that could not be built, one replaced a stale
bundle, one signed before checking). `build_release` is the one wiring; callers differ only in
what they pass: a listener for progress, a check that may veto signing, whether a variant that
cannot be built fails the release or is skipped.

Stages run in order and stop at the first error, except the optional per-variant tolerance.
Nothing is signed unless every check passed, so a signed bundle always means "evaluated and
accepted".
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from slmops.core.errors import SlmopsError, ToolError, UserInputError

if TYPE_CHECKING:
    from slmops.bundle.build import BuildResult
    from slmops.evaluate.profiles import DeviceProfile
    from slmops.evaluate.runner import EvalOptions
    from slmops.evaluate.runner import Listener as EvalListener
    from slmops.evaluate.schema import EvalReport
    from slmops.optimize.engine import Listener as OptimizeListener
    from slmops.optimize.engine import OptimizeRun
    from slmops.optimize.recipe import Recipe


class ReleaseUI(Protocol):
    """How a caller watches a release: a listener per long stage, a word after each stage."""

    def optimizing(self) -> AbstractContextManager[OptimizeListener | None]: ...
    def evaluating(self) -> AbstractContextManager[EvalListener | None]: ...
    def stage_done(self, stage: str, release: Release) -> None: ...


class SilentUI:
    @contextmanager
    def optimizing(self) -> Iterator[OptimizeListener | None]:
        yield None

    @contextmanager
    def evaluating(self) -> Iterator[EvalListener | None]:
        yield None

    def stage_done(self, stage: str, release: Release) -> None:
        pass


@dataclass
class Release:
    """What each stage produced; later fields stay None when the release stopped early."""

    workdir: Path
    runs: list[OptimizeRun] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # variant -> why it was not built
    report: EvalReport | None = None
    bundle: BuildResult | None = None
    reasons: list[str] = field(default_factory=list)  # why it was not signed
    signed: bool = False

    @property
    def variants_dir(self) -> Path:
        return self.workdir / "variants"

    @property
    def report_dir(self) -> Path:
        return self.workdir / "report"

    @property
    def bundle_dir(self) -> Path:
        return self.workdir / "bundle"

    @property
    def variants(self) -> list[str]:
        return [v.name for run in self.runs for v in run.variants]


# A check sees the report and the built bundle (None when `bundle_if` said no) and returns the
# reasons to refuse signing.
Check = Callable[["EvalReport", "BuildResult | None"], list[str]]


def build_release(
    model: Path,
    recipe: Recipe,
    workdir: Path,
    *,
    profiles: list[DeviceProfile],
    name: str,
    version: str,
    private_key: Path | None = None,
    options: EvalOptions | None = None,
    only: list[str] | None = None,
    skip_failed_variants: bool = False,
    replace_bundle: bool = False,
    check: Check | None = None,
    bundle_if: Callable[[EvalReport], bool] | None = None,
    ui: ReleaseUI | None = None,
) -> Release:
    """Optimize `model` with `recipe` into WORKDIR/variants, evaluate on `profiles` into
    WORKDIR/report, bundle as name:version into WORKDIR/bundle, and sign with `private_key`
    when given and `check` finds nothing wrong.

    skip_failed_variants: build each variant on its own and record the ones that fail instead
    of failing the release (the improvement job tries several candidates; one whose shape a
    pruning ratio refuses should not sink the others). replace_bundle: a bundle an earlier run
    left at WORKDIR/bundle under the same name:version with other content is replaced rather
    than refused (for workdirs the caller owns, like the demo's). bundle_if: build the bundle
    only when this says the report is worth shipping (the improvement job builds nothing when
    its profile got no fitting variant); the check still runs, with no bundle.
    """
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle
    from slmops.evaluate.runner import EvalOptions, evaluate
    from slmops.optimize.engine import run_recipe

    ui = ui or SilentUI()
    rel = Release(workdir=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in recipe.variants if not only or n in only]
    with ui.optimizing() as listener:
        if skip_failed_variants:
            for variant in names:
                try:
                    rel.runs.append(
                        run_recipe(
                            model, recipe, rel.variants_dir, only=[variant], listener=listener
                        )
                    )
                except SlmopsError as exc:
                    rel.failed[variant] = exc.render()
            if not rel.runs:
                raise ToolError(
                    "no variant could be built: "
                    + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in rel.failed.items()),
                    where=workdir,
                )
        else:
            rel.runs.append(
                run_recipe(model, recipe, rel.variants_dir, only=only, listener=listener)
            )
    ui.stage_done("optimize", rel)

    opts = options or EvalOptions()
    if opts.only == [] and (only or rel.failed):
        # evaluate exactly what this release built, without changing the caller's options
        opts = dataclasses.replace(opts, only=rel.variants)
    with ui.evaluating() as eval_listener:
        rel.report = evaluate(rel.variants_dir, profiles, rel.report_dir, opts, eval_listener)
    ui.stage_done("evaluate", rel)

    args = (rel.variants_dir, rel.report_dir)
    if bundle_if is None or bundle_if(rel.report):
        try:
            rel.bundle = build_bundle(*args, name=name, version=version, out=rel.bundle_dir)
        except UserInputError:
            if not replace_bundle:
                raise
            shutil.rmtree(rel.bundle_dir, ignore_errors=True)
            rel.bundle = build_bundle(*args, name=name, version=version, out=rel.bundle_dir)
    rel.reasons = check(rel.report, rel.bundle) if check is not None else []
    if rel.bundle is None and not rel.reasons:
        rel.reasons = ["nothing was bundled"]
    if private_key is not None and rel.bundle is not None and not rel.reasons:
        sign_bundle(rel.bundle_dir, private_key)
        rel.signed = True
    ui.stage_done("bundle", rel)
    return rel
