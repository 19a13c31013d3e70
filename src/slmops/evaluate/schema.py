"""The evaluation report (report.json): versioned, validated, read by the gate, bundles and fleet.

Every figure says how it was obtained: quality under a named protocol, performance measured on
the host (with its repeats) or projected to a device (an estimate, labelled as such).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from slmops.core.config import StrictModel
from slmops.evaluate.profiles import DeviceProfile
from slmops.protocol.bundle import QualityBaseline

REPORT_SCHEMA = "slmops.eval-report/v1"


UNSTABLE_SPREAD = 0.10
"""A figure whose spread (max - min) / median over repeats exceeds this is marked "unstable"."""


class Stat(StrictModel):
    """Median and spread over repeats (`values`: the repeats themselves, absent in old reports)."""

    median: float
    min: float
    max: float
    n: int
    values: list[float] = Field(default_factory=list, description="one figure per repeat")

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        import statistics

        return cls(
            median=statistics.median(values),
            min=min(values),
            max=max(values),
            n=len(values),
            values=list(values),
        )

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 for one repeat; inf when the median is 0 and the range is not."""
        if self.max == self.min:
            return 0.0
        return (self.max - self.min) / abs(self.median) if self.median else float("inf")

    @property
    def unstable(self) -> bool:
        """More than UNSTABLE_SPREAD apart between repeats: a figure not to decide on alone."""
        return self.n > 1 and self.spread > UNSTABLE_SPREAD


class QualityProtocol(StrictModel):
    text_source: str
    text_digest: str
    windows: int
    window_tokens: int = Field(description="context length of each scored window")
    scored_from: int = Field(description="tokens before this position in a window are context only")
    tokens_scored: int
    bos: bool
    description: str


class QualityResult(StrictModel):
    kld_mean: float = Field(description="mean KL(reference || variant) per scored token, nats")
    kld_p99: float
    kld_ci95: tuple[float, float] = Field(description="bootstrap 95% interval over windows")
    top1_agreement: float = Field(description="fraction of scored tokens with the same argmax")
    perplexity: float
    reference_perplexity: float
    greedy_agreement: float | None = Field(
        None, description="token agreement of greedy generations"
    )
    greedy_prompts: int = 0
    task_accuracy: float | None = None
    tasks: int = 0
    eval_seconds: float = 0.0
    baseline: QualityBaseline | None = Field(
        None,
        description="the field's quality-proxy histograms (token logprob, output length) "
        "measured on fixed prompts: what device telemetry is compared against for drift",
    )


class PerfResult(StrictModel):
    variant: str
    profile: str
    runtime: str
    threads: int
    repeats: int
    status: Literal["ok", "does-not-fit", "error"]
    detail: str = ""
    load_time_s: Stat | None = None
    ttft_ms: Stat | None = None
    decode_tps: Stat | None = None
    peak_rss_bytes: Stat | None = None
    memory_ceiling_bytes: int
    memory_at_context_bytes: int | None = Field(
        None, description="weights + KV cache at the profile's context length (computed)"
    )
    projected_ttft_ms: float | None = Field(None, description="estimate: host / relative_speed")
    projected_decode_tps: float | None = Field(None, description="estimate: host x relative_speed")
    measured_on: str = Field("host", description="host numbers; projections are estimates")
    unstable: list[str] = Field(
        default_factory=list,
        description="figures (ttft_ms, decode_tps) whose spread over repeats exceeds 10 %",
    )
    decode_tokens: int | None = Field(
        None, description="tokens decoded (after the first) per timed repeat, summed over its runs"
    )
    order: list[int] = Field(
        default_factory=list,
        description="position of this variant in each interleaved round (0 = first)",
    )
    cpu_share: Stat | None = Field(
        None,
        description="per repeat, CPU time / (wall x threads) of the measuring process: well "
        "below 1 means other processes took its CPUs (contention), so the speeds read low",
    )
    host_load: float | None = Field(
        None, description="1-minute load average when the measurement started (contention)"
    )


class VariantInfo(StrictModel):
    name: str
    path: str
    format: str
    runtime: str
    quantization: str | None = None
    pruning: list[str] = Field(default_factory=list)
    weights_bytes: int
    parameters: int | None = None
    digest: str


class Verdict(StrictModel):
    variant: str
    profile: str
    fits: bool
    reasons: list[str] = Field(default_factory=list, description="every budget the variant broke")
    notes: list[str] = Field(
        default_factory=list,
        description="budgets missed by less than the figure's noise, hence not counted",
    )


class Selection(StrictModel):
    profile: str
    variant: str | None
    reason: str


class CostEstimate(StrictModel):
    profile: str
    variant: str | None
    device_usd_per_million_tokens: float | None
    hardware_usd_per_million_tokens: float | None
    energy_usd_per_million_tokens: float | None
    cloud_usd_per_million_tokens: float
    assumptions: str


class HostInfo(StrictModel):
    cpu: str
    cores: int
    ram_bytes: int
    platform: str


class EvalReport(StrictModel):
    schema_: str = Field(REPORT_SCHEMA, alias="schema")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    slmops_version: str
    reference: dict[str, str]
    host: HostInfo
    protocol: QualityProtocol
    profiles: list[DeviceProfile]
    variants: list[VariantInfo]
    quality: dict[str, QualityResult]
    perf: list[PerfResult]
    verdicts: list[Verdict]
    selections: list[Selection]
    costs: list[CostEstimate] = Field(default_factory=list)
    wall_time_s: float = 0.0

    model_config = StrictModel.model_config | {"populate_by_name": True}

    def perf_for(self, variant: str, profile: str) -> PerfResult | None:
        return next((p for p in self.perf if p.variant == variant and p.profile == profile), None)

    def selection_for(self, profile: str) -> Selection | None:
        return next((s for s in self.selections if s.profile == profile), None)
