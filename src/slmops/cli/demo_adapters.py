"""The per-site LoRA step of `slmops demo`: two sites, two adapters, only adapter bytes move.

Two more agents join the demo fleet, labelled ``site=north`` and ``site=south``, and get the
demo's base bundle through an ordinary rollout. Then each site gets its own LoRA adapter,
trained here with `slmops adapt`'s functions on a small corpus made offline from text every
Debian system ships (two different licences in /usr/share/common-licenses: disjoint wording,
nothing downloaded), bundled with the base bundle as its subject, signed, pushed, and assigned
by the blueprint's ``adapters:`` by site label, which rolls out like a version (a canary wave,
its gates, then the rest). The demo then shows what each site fetched (the
adapter's layer and its small manifests, never the base again) and that each site's model moved
toward its own text: perplexity of both sites' held-out paragraphs through llama.cpp on the
device's own files (its base GGUF slot plus its adapter slot), and one completion per site from
the agent's OpenAI-compatible endpoint.

The base GGUF the adapters fit is the unpruned one: the pruned variants the other demo devices
run have other shapes, which is why these two agents are given room for the full-size variant.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from slmops.cli._output import out_console
from slmops.core.errors import CheckFailedError, ToolError, UserInputError

if TYPE_CHECKING:
    from slmops.cli.demo_fleet import Fleet

SITE_FLEET = {"fleet": "sites"}
SITES_BLUEPRINT = "demo-sites"
ADAPTER_VERSION = "1.0.0"
LICENSES = Path("/usr/share/common-licenses")
# site -> the licence its corpus is made from (different licences: different vocabulary)
CORPORA = {"north": "Apache-2.0", "south": "GPL-3"}
TRAIN_STEPS = 30  # the steps bound the training, so each run learns the same (seeded) adapter
TRAIN_MINUTES = 1.0  # a safety cap for a loaded machine; 30 steps take ~5 s on one core
LR = 5e-3  # a short budget wants a brisk learning rate
EVAL_TOKENS = 1024  # per held-out text: enough for a stable perplexity, fast in llama.cpp
WINDOW = 64  # tokens per perplexity window, as `slmops adapt` trains and evaluates
PROMPT = "The licensee"


@dataclass(frozen=True)
class SiteAdapter:
    site: str
    device_id: str
    name: str
    corpus: Path
    artifact: Path | None = None


def make_corpus(site: str, out: Path) -> Path:
    """The site's text: one licence, as paragraphs (`slmops adapt` holds every tenth out)."""
    src = LICENSES / CORPORA[site]
    if not src.is_file():
        raise UserInputError(
            f"no offline text for site {site}",
            where=src,
            hint="install Debian's base-files (it ships /usr/share/common-licenses)",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return out


def train_site_adapter(model: Path, corpus: Path, out: Path) -> dict[str, Any]:
    """`slmops adapt` in-process with the demo's short budget; returns its evaluation."""
    from slmops.adapt.run import adapt
    from slmops.adapt.train import TrainOptions

    opts = TrainOptions(
        steps=TRAIN_STEPS, minutes=TRAIN_MINUTES, rank=8, lr=LR, batch=4, seqlen=WINDOW, threads=1
    )
    res = adapt(model, corpus, out, opts)
    return {"steps": res.training.get("steps"), **res.evaluation}


def heldout_ids(model: Path, corpus: Path) -> list[int]:
    """Token ids of the site's held-out paragraphs (the split `slmops adapt` did not train on)."""
    from transformers import AutoTokenizer

    from slmops.adapt.data import load_site_data
    from slmops.adapt.train import token_stream

    tok = AutoTokenizer.from_pretrained(model)
    ids: list[int] = token_stream(tok, load_site_data(corpus, tok).heldout).tolist()
    return ids[:EVAL_TOKENS]


def gguf_perplexity(base_gguf: Path, adapter: Path | None, ids: list[int]) -> float:
    """Token perplexity of ``ids`` under llama.cpp (base alone, or base + adapter), in
    non-overlapping windows of WINDOW tokens: the protocol `slmops adapt` reports (the demo
    model is trained on short contexts, so one long context would measure something else)."""
    import llama_cpp
    import numpy as np

    from slmops.runtimes.llama_log import install_llama_log

    install_llama_log()  # llama.cpp errors only, unless SLMOPS_LLAMA_LOG=1
    llm = llama_cpp.Llama(
        model_path=str(base_gguf),
        lora_path=str(adapter) if adapter else None,
        n_ctx=WINDOW + 1,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        verbose=False,
    )
    nll: list[float] = []
    try:
        for i in range(0, len(ids) - 1, WINDOW):
            window = ids[i : i + WINDOW]
            if len(window) < 2:
                break
            llm.reset()  # type: ignore[no-untyped-call]
            llm.eval(window)
            logits = np.array(llm.scores[: len(window) - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            logz = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
            nll.extend((logz - logits[np.arange(len(window) - 1), window[1:]]).tolist())
    finally:
        llm.close()
    return float(math.exp(sum(nll) / max(len(nll), 1)))


def device_files(agent_dir: Path) -> tuple[Path, Path | None]:
    """The device's running base GGUF and loaded adapter file, from its own slots."""
    from slmops.agent.adapter_slots import AdapterSlots
    from slmops.agent.slots import SlotStore

    active = SlotStore(agent_dir).active()
    if active is None:
        raise ToolError("the device runs no model", where=agent_dir)
    ggufs = sorted(active[0].rglob("*.gguf"))
    if not ggufs:
        raise ToolError("the device's model slot holds no GGUF", where=active[0])
    loaded = AdapterSlots(agent_dir).loaded_for(active[1])
    return ggufs[0], loaded[0] if loaded else None


def completion(port: int) -> str:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 16, "temperature": 0.0}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    if r.status_code != 200:
        raise ToolError(f"completion on port {port}: HTTP {r.status_code}: {r.text[:300]}")
    return str(r.json()["choices"][0]["text"])


def run_adapter_demo(
    fleet: Fleet, *, model: Path, bundled: dict[str, str], keys: Path, as_json: bool
) -> dict[str, Any]:
    """Two sites, two adapters: train, bundle, sign, push, assign by label, measure."""
    from slmops.bundle.adapter import build_adapter_bundle
    from slmops.bundle.registry import push
    from slmops.bundle.signing import sign_bundle
    from slmops.cli.demo_fleet import (
        AgentSpec,
        _wait_until,
        apply_and_wait,
        blueprint,
        start_agents,
    )

    root = fleet.root / "adapters"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    name, version = bundled["name"], bundled["version"]
    sites = [
        SiteAdapter(site, f"{site}-1", f"site-{site}", make_corpus(site, root / f"{site}.txt"))
        for site in CORPORA
    ]
    specs = tuple(AgentSpec(s.device_id, None, 1024, s.site) for s in sites)
    start_agents(fleet, keys / "slmops.pub", specs, SITE_FLEET)
    fleet.agents = (*fleet.agents, *specs)
    doc = blueprint(name, version, name=SITES_BLUEPRINT, selector=SITE_FLEET)
    base = apply_and_wait(fleet, name, version, as_json, doc=doc)
    if base["status"] != "succeeded":
        raise CheckFailedError(f"the sites' rollout ended {base['status']}", where=fleet.root)

    trained: dict[str, dict[str, Any]] = {}
    address = fleet.url.removeprefix("http://")
    for i, s in enumerate(sites):
        t0 = time.monotonic()
        evaluation = train_site_adapter(model, s.corpus, root / f"{s.site}-adapter")
        art = build_adapter_bundle(
            root / f"{s.site}-adapter",
            Path(bundled["path"]),
            name=s.name,
            version=ADAPTER_VERSION,
            out=root / f"{s.site}-artifact",
        ).path
        sign_bundle(art, keys / "slmops.key")
        push(art, f"oci://{address}/{s.name}:{ADAPTER_VERSION}", token=fleet.admin)
        sites[i] = SiteAdapter(s.site, s.device_id, s.name, s.corpus, art)
        trained[s.site] = {
            "seconds": round(time.monotonic() - t0, 1),
            "evaluation": evaluation,
        }
        if not as_json:
            out_console.print(
                f"site={s.site}: trained {s.name}:{ADAPTER_VERSION} on {s.corpus.name} "
                f"({CORPORA[s.site]}) in {trained[s.site]['seconds']:.0f} s, bundled against "
                f"{name}:{version}, signed, pushed"
            )

    doc["spec"]["adapters"] = [
        {"selector": {"site": s.site}, "adapter": s.name, "version": ADAPTER_VERSION} for s in sites
    ]
    # an adapter change is a release like a version change: it rolls out in the blueprint's
    # waves, behind the same gates, and rolls back by itself when the canary fails
    release = apply_and_wait(fleet, name, version, as_json, doc=doc)
    if release["status"] != "succeeded":
        raise CheckFailedError(f"the adapters' rollout ended {release['status']}", where=fleet.root)

    def status(s: SiteAdapter) -> dict[str, Any]:
        import json

        path = fleet.root / "agents" / s.device_id / "agent-status.json"
        try:
            got: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return got

    for s in sites:
        _wait_until(
            f"{s.device_id} to load {s.name}",
            lambda s=s: (status(s).get("adapter") or {}).get("name") == s.name,  # type: ignore[misc]
            120,
            fleet,
        )

    ids = {s.site: heldout_ids(model, s.corpus) for s in sites}
    results: dict[str, Any] = {}
    for s in sites:
        st = status(s)
        fetch = st.get("adapter_fetch") or {}
        moved = int(fetch.get("layer_bytes", 0)) + int(fetch.get("metadata_bytes", 0))
        base_gguf, lora = device_files(fleet.root / "agents" / s.device_id)
        ppl = {
            other: {
                "base": round(gguf_perplexity(base_gguf, None, ids[other]), 2),
                "adapter": round(gguf_perplexity(base_gguf, lora, ids[other]), 2),
            }
            for other in ids
        }
        results[s.site] = {
            "device": s.device_id,
            "adapter": f"{s.name}:{ADAPTER_VERSION}",
            "bytes_moved": moved,
            "adapter_layer_bytes": int(fetch.get("layer_bytes", 0)),
            "base_gguf_bytes": base_gguf.stat().st_size,
            "perplexity": ppl,
            # adapter/base perplexity ratio: lower on the site's own text than on the other's
            # means the model moved toward this site's corpus, not just toward licence prose
            "ratio": {o: round(ppl[o]["adapter"] / ppl[o]["base"], 3) for o in ppl},
            "completion": completion(fleet.agent_ports[s.device_id]),
            "training": trained[s.site],
        }
    for s in sites:
        ratio = results[s.site]["ratio"]
        others = [o for o in ratio if o != s.site]
        if not ratio[s.site] < min((ratio[o] for o in others), default=1.0):
            raise CheckFailedError(
                f"site {s.site}'s adapter did not move its model toward its own text: perplexity "
                f"ratios (adapter / base) {ratio}",
                where=root,
                hint="the adapters are trained for a fixed number of steps; see their "
                "evaluation.json files there",
            )
    if not as_json:
        print_sites(results)
    return results


def print_sites(results: dict[str, Any]) -> None:
    from rich.table import Table

    sites = list(results)
    table = Table(
        "site",
        "adapter",
        "bytes moved (base GGUF)",
        *(f"ppl {o} text: base -> adapter" for o in sites),
    )
    for site, r in results.items():
        table.add_row(
            f"site={site} ({r['device']})",
            r["adapter"],
            f"{r['bytes_moved']:,} ({r['base_gguf_bytes']:,})",
            *(
                f"{r['perplexity'][o]['base']:.1f} -> {r['perplexity'][o]['adapter']:.1f}"
                for o in sites
            ),
        )
    out_console.print(table)
    for site, r in results.items():
        others = ", ".join(f"{r['ratio'][o]:.2f}x on {o}'s" for o in sites if o != site)
        out_console.print(
            f"site={site}: perplexity {r['ratio'][site]:.2f}x the base on its own held-out text, "
            f"{others}; moved {r['bytes_moved']:,} bytes for a {r['adapter_layer_bytes']:,}-byte "
            f"adapter; {PROMPT!r} -> [italic]{r['completion']!r}[/]"
        )
