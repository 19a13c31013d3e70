"""An improvement job: from a field signal on one profile to a gated, signed candidate version.

Input: the bundle version a profile runs (pulled from the control plane's registry, or a local
bundle), the variant it runs there, the original model the variant's chain started from (checked
against the lineage card's origin digest: the job refuses to "improve" from another model), a
direction (``higher-precision`` when the quality proxy fell, ``smaller`` when memory pressure
rose) and the device profile. Steps, each reusing the stage it names:

1. read the running variant's lineage card from the bundle;
2. ``adjusted_recipe``: candidates one step away from that chain;
3. optimize them (same engine and cache), evaluate them on the profile;
4. gate: the profile must get a fitting variant, and it must move in the asked direction against
   the running one (lower KLD for higher precision, less RAM for smaller), with the numbers;
5. bundle the candidates with the report as the next version and sign it.

Everything lands in the job's workdir; nothing is pushed or rolled out here (the caller does
that, so a human or a rule decides). Heavy imports (torch via optimize/evaluate) happen inside.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.bundle.layout import Index, Manifest, OciLayout, parse_model
from slmops.bundle.media import ANN_TITLE, ANN_VARIANT, MT_INDEX
from slmops.core.atomic import write_text_atomic
from slmops.core.digest import tree_digest
from slmops.core.errors import UserInputError
from slmops.model.card import CARD_FILE, LineageCard, read_card
from slmops.optimize.adjust import adjusted_recipe
from slmops.protocol.bundle import VariantDescriptor
from slmops.protocol.document import Direction


@dataclass
class Candidate:
    """What the job produced, and whether it may be proposed."""

    ok: bool
    reasons: list[str]
    checks: list[dict[str, Any]]
    running: dict[str, Any]
    selected: dict[str, Any] | None
    recipe: str
    report: str
    bundle: str | None = None
    digest: str | None = None
    version: str | None = None
    variants: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def running_variant(bundle: Path, variant: str) -> tuple[VariantDescriptor, LineageCard]:
    """The descriptor and lineage card of ``variant`` in a bundle layout."""
    layout = OciLayout(bundle)
    root = next((d for d in layout.read_index().manifests if d.media_type == MT_INDEX), None)
    if root is None:
        raise UserInputError("not a bundle (no bundle index)", where=bundle)
    index = parse_model(
        Index, json.loads(layout.blob_path(root.digest).read_bytes()), where=str(bundle)
    )
    names = [str(d.annotation(ANN_VARIANT)) for d in index.manifests if d.annotation(ANN_VARIANT)]
    entry = next((d for d in index.manifests if d.annotation(ANN_VARIANT) == variant), None)
    if entry is None:
        raise UserInputError(
            f"the bundle has no variant {variant!r}",
            where=bundle,
            hint="variants: " + ", ".join(names),
        )
    manifest = parse_model(
        Manifest, json.loads(layout.blob_path(entry.digest).read_bytes()), where=entry.digest
    )
    descriptor = VariantDescriptor.model_validate_json(
        layout.blob_path(manifest.config.digest).read_bytes()
    )
    card_layer = next((x for x in manifest.layers if x.annotation(ANN_TITLE) == CARD_FILE), None)
    if card_layer is None:
        raise UserInputError(
            f"variant {variant!r} carries no lineage card, so its chain is unknown", where=bundle
        )
    card = LineageCard.model_validate_json(layout.blob_path(card_layer.digest).read_bytes())
    return descriptor, card


def improve(
    *,
    bundle: Path,
    variant: str,
    model: Path,
    direction: Direction,
    profile: str,
    name: str,
    version: str,
    workdir: Path,
    private_key: Path,
    quiet: bool = True,
) -> Candidate:
    """Run the job; the returned Candidate says whether the gate passed and why."""
    from slmops.bundle.build import BuildResult
    from slmops.bundle.inspect import inspect_bundle
    from slmops.evaluate.gate import gate
    from slmops.evaluate.profiles import resolve_profiles
    from slmops.evaluate.schema import EvalReport
    from slmops.optimize.recipe import compile_recipe
    from slmops.release import build_release
    from slmops.server.resolve import ram_needed

    current, card = running_variant(bundle, variant)
    model_card = read_card(model)  # a dequantized or imported model carries its own origin
    origin = model_card.origin_digest if model_card else tree_digest(model)
    if origin != card.origin_digest:
        raise UserInputError(
            f"this is not the model {variant} was made from: its digest is {origin}, the "
            f"lineage card says {card.origin_digest}",
            where=model,
            hint=f"pass the original model (the card names {card.origin_path or 'no path'})",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    recipe_file = adjusted_recipe(card, direction)
    recipe_path = workdir / "recipe.yaml"
    import yaml

    write_text_atomic(recipe_path, yaml.safe_dump(recipe_file.model_dump(mode="json")))
    recipe = compile_recipe(recipe_file, source=str(recipe_path))
    profiles = resolve_profiles([profile])
    target = profiles[0].name  # a YAML path resolves to the profile it defines
    running = {
        "variant": current.name,
        "kld_mean": current.kld_mean,
        "ram_bytes": ram_needed(current),
    }
    checks: list[dict[str, Any]] = []
    selected: dict[str, Any] = {}

    def has_pick(report: EvalReport) -> bool:
        sel = report.selection_for(target)
        return sel is not None and sel.variant is not None

    def accept(report: EvalReport, built: BuildResult | None) -> list[str]:
        """The gate on the profile, then the asked direction against the running variant
        (compared on descriptors exactly as resolution reads them)."""
        checks.extend(gate(report, required=[target]).checks)
        sel = report.selection_for(target)
        if built is not None and sel is not None and sel.variant is not None:
            new = next(
                VariantDescriptor.model_validate(v["descriptor"])
                for v in inspect_bundle(built.path)["variants"]
                if v["name"] == sel.variant
            )
            new_ram, old_ram = ram_needed(new), ram_needed(current)
            selected.update(variant=sel.variant, kld_mean=new.kld_mean, ram_bytes=new_ram)
            if direction == "higher-precision":
                old_kld, new_kld = current.kld_mean, new.kld_mean
                ok = old_kld is not None and new_kld is not None and new_kld < old_kld
                detail = (
                    f"{sel.variant} KLD {new_kld} vs running {current.name} KLD {old_kld} "
                    "(must be lower)"
                )
            else:
                ok = new_ram < old_ram
                detail = (
                    f"{sel.variant} needs {new_ram / 2**20:.1f} MiB vs running "
                    f"{current.name} {old_ram / 2**20:.1f} MiB (must be less)"
                )
            checks.append({"name": f"direction:{direction}", "ok": ok, "detail": detail})
        return [c["detail"] for c in checks if not c["ok"]]

    # each candidate on its own: one that cannot be built (a pruning ratio the model's shape
    # refuses, say) is reported, and the others still get their chance
    release = build_release(
        model,
        recipe,
        workdir,
        profiles=profiles,
        name=name,
        version=version,
        private_key=private_key,
        skip_failed_variants=True,
        check=accept,
        bundle_if=has_pick,
    )
    checks += [
        {"name": f"build:{k}", "ok": True, "detail": f"not built (skipped): {v.splitlines()[0]}"}
        for k, v in release.failed.items()
    ]
    candidate = Candidate(
        ok=release.signed,
        reasons=release.reasons,
        checks=checks,
        running=running,
        selected=selected or None,
        recipe=str(recipe_path),
        report=str(release.report_dir),
        variants=[v for v in recipe.variants if v not in release.failed],
    )
    if release.signed and release.bundle is not None:  # only a candidate that passed is signed
        candidate.bundle = str(release.bundle_dir)
        candidate.digest, candidate.version = release.bundle.digest, version
    return candidate
