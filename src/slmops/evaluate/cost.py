"""Cost per million generated tokens on the device, beside a cloud API price.

The device cost is what the hardware and its electricity cost while it generates: the purchase
price amortised over the seconds the device spends generating in its life (lifetime x
utilization), plus the energy drawn during those seconds. Both scale with the time one million
tokens take at the *projected* decode speed, so the figure is an estimate, like the speed.
"""

from __future__ import annotations

from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import CostEstimate, EvalReport, PerfResult, Selection
from slmops.evaluate.select import device_decode_tps, fmt_num

# A small hosted model's output-token price (USD per million tokens); pass --cloud-price to change.
DEFAULT_CLOUD_USD_PER_MILLION = 0.60

SECONDS_PER_YEAR = 365 * 24 * 3600
JOULES_PER_KWH = 3.6e6
TOKENS = 1e6


def _usd(x: float) -> str:
    """$0.60 rather than $0.6, but $0.075 stays whole."""
    return f"${x:.2f}" if round(x, 2) == x else f"${x:g}"


def estimate_cost(
    profile: DeviceProfile,
    selection: Selection | None,
    perf: PerfResult | None,
    *,
    cloud_usd_per_million: float = DEFAULT_CLOUD_USD_PER_MILLION,
) -> CostEstimate:
    """Cost of one million tokens from the selected variant on this profile (None when unknown).

    `perf` is the selected variant's result on this profile.
    """
    c = profile.cost
    variant = selection.variant if selection else None
    cloud = f"cloud {_usd(cloud_usd_per_million)} per million output tokens"

    def unknown(why: str) -> CostEstimate:
        return CostEstimate(
            profile=profile.name,
            variant=variant,
            device_usd_per_million_tokens=None,
            hardware_usd_per_million_tokens=None,
            energy_usd_per_million_tokens=None,
            cloud_usd_per_million_tokens=cloud_usd_per_million,
            assumptions=f"no device cost: {why}; {cloud}",
        )

    if variant is None:
        return unknown(f"no variant fits {profile.name}")
    tps = device_decode_tps(profile, perf)
    if tps is None or tps <= 0:
        return unknown(f"no decode speed measured for {variant} on {profile.name}")
    seconds = TOKENS / tps
    generating_seconds = c.lifetime_years * SECONDS_PER_YEAR * c.utilization
    hardware = c.hardware_usd / generating_seconds * seconds
    energy = c.power_watts * seconds / JOULES_PER_KWH * c.energy_usd_per_kwh
    assumptions = (
        f"decode {fmt_num(tps)} tok/s (projected for {profile.name}, estimate) → "
        f"{seconds / 3600:,.1f} h per million tokens; hardware {_usd(c.hardware_usd)} amortised over "
        f"{c.lifetime_years:g} years at {c.utilization:.0%} utilization; "
        f"{c.power_watts:g} W at {_usd(c.energy_usd_per_kwh)}/kWh; {cloud}"
    )
    return CostEstimate(
        profile=profile.name,
        variant=variant,
        device_usd_per_million_tokens=hardware + energy,
        hardware_usd_per_million_tokens=hardware,
        energy_usd_per_million_tokens=energy,
        cloud_usd_per_million_tokens=cloud_usd_per_million,
        assumptions=assumptions,
    )


def estimate_costs(
    report: EvalReport, *, cloud_usd_per_million: float = DEFAULT_CLOUD_USD_PER_MILLION
) -> list[CostEstimate]:
    """One estimate per profile of the report, from its selections (for `report.costs`)."""
    out = []
    for profile in report.profiles:
        sel = report.selection_for(profile.name)
        perf = report.perf_for(sel.variant, profile.name) if sel and sel.variant else None
        out.append(estimate_cost(profile, sel, perf, cloud_usd_per_million=cloud_usd_per_million))
    return out
