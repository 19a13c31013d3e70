"""The telemetry wire schema: what leaves a device, and nothing else.

A device sends *aggregates* per time window (counts, histograms, means), never prompt or response
text, unless a blueprint opts in to samples, which are redacted on the device and capped. A
batch is sent gzip-compressed (``Content-Encoding: gzip``) to ``POST /device/v1/telemetry`` with
the device credential; ``batch_id`` makes a retried batch idempotent on the server.

Histograms have fixed, shared bucket bounds (``BOUNDS``), so the server can add windows,
devices and cohorts bucket by bucket, and quantiles are read from the merged buckets. Figures the
device perturbed with differential-privacy noise are named in ``noised`` with the ``epsilon``
used, so every consumer knows which numbers are exact.

Shared by the agent (producer) and the server (consumer); imports nothing heavier than pydantic.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Annotated, Literal, Self, get_args

from pydantic import ConfigDict, Field, StrictInt, field_validator, model_validator

from slmops.core.config import StrictModel

TELEMETRY_SCHEMA: Literal["slmops.telemetry/v1"] = "slmops.telemetry/v1"

# Upper bucket bounds (the last bucket is everything above the last bound).
BOUNDS: dict[str, tuple[float, ...]] = {
    "ttft_ms": (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
    "latency_ms": (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000),
    "decode_tps": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    "output_tokens": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    "logprob": (-8, -6, -4, -3, -2, -1.5, -1, -0.5, -0.25, -0.1),
}
HISTOGRAMS = tuple(BOUNDS)

ErrorKind = Literal["bad_request", "no_model", "runtime", "timeout", "overloaded", "other"]
ERROR_KINDS: tuple[ErrorKind, ...] = get_args(ErrorKind)

MAX_COUNT = 1e12
"""Upper bound of any count in a window: far above a real device's, low enough that sums over
a fleet and a year stay finite (a device sending 1e308 must not turn a merge into +Inf)."""
Count = Annotated[float, Field(ge=0, le=MAX_COUNT, strict=True)]
"""A count: finite (NaN and Infinity are refused), non-negative, bounded; a JSON bool is not a
number here (strict: ``true`` is refused, ints and floats pass)."""
Finite = Annotated[float, Field(ge=-MAX_COUNT, le=MAX_COUNT, strict=True)]
INT64_MAX = (1 << 63) - 1
NO_NUL = r"^[^\x00]*$"
"""Wire strings stored in the database: PostgreSQL text cannot hold NUL, nor can its JSON
functions read a ``\u0000`` escape, so one such string would fail the whole group commit of
the batches stored with it (refused here as a 422 instead)."""
FigureName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class _Finite(StrictModel):
    """Wire models of numbers: NaN and +/-Infinity are refused (they poison every merge)."""

    model_config = StrictModel.model_config | ConfigDict(allow_inf_nan=False)


def bucket_counts(metric: str, values: Iterable[float]) -> list[float]:
    """Counts of `values` over ``BOUNDS[metric]``: bucket i holds values <= bounds[i] (and above
    bounds[i - 1]), the last bucket everything above the last bound."""
    bounds = BOUNDS[metric]
    counts = [0.0] * (len(bounds) + 1)
    for v in values:
        counts[bisect_left(bounds, v)] += 1
    return counts


class TelemetryPolicy(StrictModel):
    """What a blueprint lets its devices send (part of the desired state).

    Defaults keep a device at one request a minute well under 100 KB a day: 15-minute windows,
    no samples, no noise. ``samples`` is the only way text leaves a device, and only redacted.
    """

    enabled: bool = True
    window_seconds: float = Field(900.0, ge=10, le=86400)
    epsilon: float | None = Field(
        None, gt=0, le=10, description="Laplace noise on counts and buckets per window; null: off"
    )
    samples: bool = Field(False, description="opt in to redacted prompt/response samples")
    max_samples_per_day: StrictInt = Field(20, ge=0, le=1000)
    daily_byte_budget: StrictInt = Field(
        100_000, ge=1000, le=1 << 40, description="compressed bytes per day"
    )
    buffer_max_windows: StrictInt = Field(
        2000, ge=1, le=1 << 20, description="windows kept on disk while offline"
    )


class Histogram(_Finite):
    """Counts per bucket over the shared bounds of its metric; ``sum`` and ``count`` of values."""

    counts: list[Count] = Field(
        max_length=64, description="len(bounds) + 1 buckets; floats once DP-noised"
    )
    sum: Finite = 0.0
    count: Count = 0.0


class Feedback(_Finite):
    up: Count = 0
    down: Count = 0


class WindowAggregate(_Finite):
    """One window of one device's serving, for the model (and adapter) that was active in it."""

    start: float = Field(ge=0, le=1e11, strict=True, description="epoch seconds, inclusive")
    end: float = Field(ge=0, le=1e11, strict=True, description="epoch seconds, exclusive")
    model: str | None = Field(None, max_length=255, pattern=NO_NUL)
    version: str | None = Field(None, max_length=128, pattern=NO_NUL)
    variant: str | None = Field(None, max_length=128, pattern=NO_NUL)
    rollout_id: str | None = Field(None, max_length=64, pattern=NO_NUL)
    adapter: str | None = Field(
        None,
        max_length=200,
        pattern=NO_NUL,
        description="name:version of the LoRA adapter served over the model; null: none "
        "(optional, so windows of agents that predate adapters still validate)",
    )
    requests: Count = 0
    errors: dict[ErrorKind, Count] = Field(
        default_factory=dict, description="by kind (ERROR_KINDS)"
    )
    prompt_tokens: Count = 0
    output_tokens: Count = 0
    histograms: dict[str, Histogram] = Field(
        default_factory=dict, description="by metric name (keys of BOUNDS)"
    )
    logprob_mean: float | None = Field(
        None, ge=-1000, le=0, description="mean token log-probability"
    )
    entropy_mean: float | None = Field(
        None, ge=0, le=1000, description="mean next-token entropy (nats)"
    )
    quality_tokens: Count = Field(0, description="tokens behind logprob/entropy means")
    peak_rss_bytes: StrictInt = Field(0, ge=0, le=1 << 60)
    health_ok: Count = 0
    health_failed: Count = 0
    feedback: Feedback = Field(default_factory=Feedback)
    noised: list[FigureName] = Field(
        default_factory=list, max_length=64, description="figures with DP noise added"
    )
    epsilon: float | None = Field(None, gt=0, le=1e6, description="DP budget spent on this window")

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"window end {self.end} is not after its start {self.start}")
        for name, hist in self.histograms.items():
            if name not in BOUNDS:
                raise ValueError(f"unknown histogram {name!r}; known: {', '.join(BOUNDS)}")
            if len(hist.counts) != len(BOUNDS[name]) + 1:
                raise ValueError(
                    f"histogram {name!r} has {len(hist.counts)} buckets, "
                    f"expected {len(BOUNDS[name]) + 1}"
                )
        return self


class Sample(_Finite):
    """An opted-in prompt/response pair, already redacted on the device."""

    at: float = Field(ge=0, le=1e11, strict=True)
    prompt: str = Field(max_length=4000)
    response: str = Field(max_length=4000)
    redactions: StrictInt = Field(0, ge=0, le=1 << 20, description="how many spans were replaced")

    @field_validator("prompt", "response", mode="after")
    @classmethod
    def _no_nul(cls, text: str) -> str:
        """NUL becomes U+FFFD: PostgreSQL's JSON functions cannot read a ``\\u0000`` escape (the
        writer sends rows as one JSON parameter), and free text is no reason to refuse the
        windows of its batch, as a NUL in a name is (``NO_NUL``)."""
        return text.replace("\x00", "\ufffd")


class TelemetryBatch(StrictModel):
    schema_: Literal["slmops.telemetry/v1"] = Field(TELEMETRY_SCHEMA, alias="schema")
    batch_id: str = Field(pattern=r"^[A-Za-z0-9._-]{8,64}$")
    windows: list[WindowAggregate] = Field(default_factory=list, max_length=500)
    samples: list[Sample] = Field(default_factory=list, max_length=50)
    dropped_windows: StrictInt = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="windows dropped on the device since the last delivered batch",
    )
    dropped_reason: str | None = Field(None, max_length=200, pattern=NO_NUL)
    model_config = StrictModel.model_config | {"populate_by_name": True}
