"""A telemetry window never mixes LoRA adapters: switching the adapter over the same model closes
the open window, like a model version change, and each window names the adapter it served."""

from __future__ import annotations

import random

from slmops.agent.telemetry import Aggregator
from slmops.protocol.telemetry import TelemetryBatch, TelemetryPolicy, WindowAggregate


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def serve(agg: Aggregator, n: int) -> None:
    for _ in range(n):
        agg.record_request(
            ttft_ms=30.0, latency_ms=400.0, prompt_tokens=10, output_tokens=20, decode_tps=40.0
        )


def test_an_adapter_switch_closes_the_window() -> None:
    clock = Clock(9000.0)  # window grid of 900 s: the open window is [9000, 9900)
    agg = Aggregator(TelemetryPolicy(window_seconds=900), clock=clock, rng=random.Random(0))
    agg.set_model("m", "1.0", "q4", adapter="site-a:1")
    serve(agg, 2)
    clock.t = 9100.0
    agg.set_model("m", "1.0", "q4", adapter="site-a:1")  # the same adapter: nothing closes
    serve(agg, 1)
    assert agg.close_due() == []
    clock.t = 9200.0
    agg.set_model("m", "1.0", "q4", adapter="site-b:2")
    serve(agg, 4)
    clock.t = 9300.0
    agg.set_model("m", "1.0", "q4")  # adapter unloaded: the model alone
    serve(agg, 1)
    closed = agg.close_due()
    assert [(w.adapter, w.start, w.end, w.requests) for w in closed] == [
        ("site-a:1", 9000.0, 9200.0, 3),
        ("site-b:2", 9200.0, 9300.0, 4),
    ]
    assert all((w.model, w.version) == ("m", "1.0") for w in closed)
    last = agg.close_due(now=9900.0)
    assert [(w.adapter, w.start, w.end, w.requests) for w in last] == [(None, 9300.0, 9900.0, 1)]
    # on the wire: the adapter is carried, and a window without it (older agents) still validates
    doc = TelemetryBatch(batch_id="b-adapter-1", windows=[*closed, *last]).model_dump(
        mode="json", by_alias=True
    )
    assert [w["adapter"] for w in doc["windows"]] == ["site-a:1", "site-b:2", None]
    old = {k: v for k, v in doc["windows"][0].items() if k != "adapter"}
    assert WindowAggregate.model_validate(old).adapter is None


def test_an_adapter_set_before_any_request_relabels_the_empty_window() -> None:
    clock = Clock(9000.0)
    agg = Aggregator(TelemetryPolicy(window_seconds=900), clock=clock, rng=random.Random(0))
    agg.set_model("m", "1.0", "q4")
    agg.record_rss(1000)  # a gauge, not activity: the window is still empty
    clock.t = 9050.0
    agg.set_model("m", "1.0", "q4", adapter="site-a:1")
    serve(agg, 1)
    out = agg.close_due(now=9900.0)
    assert [(w.adapter, w.start, w.requests) for w in out] == [("site-a:1", 9000.0, 1)]
