"""Which variant of a bundle a device should run: decided per device from its inventory.

Order of preference (issue 5):
1. the variant the evaluation selected for the device's hardware class (its profile), if it
   fits what the device reports it can give the model;
2. otherwise the best-quality variant (lowest KLD; ties to the smaller) that fits its reported
   RAM, disk and runtimes;
3. otherwise the device is unplaceable, with the reason, and keeps what it runs.

Pure logic (no I/O), so the control plane and tests share it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmops.protocol.bundle import VariantDescriptor
from slmops.protocol.device import Inventory

# When the bundle carries no measured RAM figure, assume the runtime needs the weights plus this
# fraction (KV cache and buffers) rather than pretending the weights alone are enough.
RAM_HEADROOM_WITHOUT_MEASUREMENT = 0.25


@dataclass(frozen=True)
class Resolution:
    variant: str | None
    reason: str


def ram_needed(d: VariantDescriptor) -> int:
    measured = [x for x in (d.ram_bytes, d.peak_rss_bytes) if x]
    if measured:
        return max(measured)
    return int(d.disk_bytes * (1 + RAM_HEADROOM_WITHOUT_MEASUREMENT))


def misfit(inv: Inventory, d: VariantDescriptor) -> str | None:
    """Why `d` cannot run on the device, or None when it fits."""
    if d.format not in inv.runtimes:
        have = ", ".join(inv.runtimes) or "none"
        return f"{d.name}: runtime {d.format} not on the device (has {have})"
    need = ram_needed(d)
    if need > inv.model_ram_bytes:
        return f"{d.name}: needs {need / 2**20:.0f} MiB RAM, the device gives the model {inv.model_ram_bytes / 2**20:.0f} MiB"
    if d.disk_bytes > inv.free_disk_bytes:
        return f"{d.name}: needs {d.disk_bytes / 2**20:.0f} MiB disk, {inv.free_disk_bytes / 2**20:.0f} MiB free"
    return None


def resolve_variant(inv: Inventory, variants: list[VariantDescriptor]) -> Resolution:
    if not variants:
        return Resolution(None, "the bundle has no variants")
    fitting = [d for d in variants if misfit(inv, d) is None]
    if inv.profile:
        chosen = [d for d in fitting if inv.profile in d.selected_for]
        if chosen:
            return Resolution(
                chosen[0].name, f"selected by the evaluation for {inv.profile} and fits"
            )
    if fitting:
        best = min(
            fitting,
            key=lambda d: (d.kld_mean if d.kld_mean is not None else float("inf"), d.disk_bytes),
        )
        why = (
            f"the evaluation's pick for {inv.profile} does not fit; "
            if inv.profile and any(inv.profile in d.selected_for for d in variants)
            else ""
        )
        return Resolution(best.name, why + f"best quality of {len(fitting)} fitting variants")
    reasons = [r for d in variants if (r := misfit(inv, d))]
    return Resolution(
        None, "no variant fits: " + "; ".join(reasons[:4]) + (" ..." if len(reasons) > 4 else "")
    )
