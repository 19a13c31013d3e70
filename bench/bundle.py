"""Benchmark bundle transfer against the machine's own limits, side by side in one run.

On the same bytes (every blob of one bundle layout, ~400 MB) it measures MB/s of:
- hash:   hashlib.sha256 over every blob (the hash limit: verify and pull hash every byte),
- copy:   shutil.copyfile of every blob to a new file (the copy limit: push and pull move bytes),
- verify: a streaming sha256 + size check of every blob against its descriptor
          (slmops.bundle.verify.verify_bundle on a real bundle when it is available),
- push:   slmops.bundle.registry.push to a docker-registry on 127.0.0.1 started here,
- pull:   slmops.bundle.registry.pull from it (hash, fsync, atomic rename included),
- re-push of the unchanged bundle: must move 0 bytes.

and, for context, the registry itself: `registry PUT` (each blob in one streamed PUT, no
client work) and `registry GET` (each blob read and dropped).

Each measurement runs twice and the best counts (the page cache cannot be dropped here, so
every run reads warm data; outputs are removed between runs so both sides write into recycled
pages, which in a VM are several times faster than fresh ones). Targets: verify/hash >= 0.8,
push/copy and pull/copy >= 0.5. Measured here the copy targets are out of reach by design:
shutil.copyfile copies inside the kernel at 1-4 GB/s, above the hash limit that a verified pull
cannot exceed, and docker-registry 2.8 ingests ~200-250 MB/s even from a bare streamed PUT. The
`push/registry PUT` and `pull/registry GET` lines show how close the client gets to the server.

The layout is synthetic (pseudo-random layers) unless `--source real` (or `auto` finding
/tmp/demo-run) builds a real bundle with slmops.bundle.build from the demo's variants and
report. The registry helper lives in tests/bundle/conftest.py and is loaded from there.

    .venv/bin/python bench/bundle.py [--size-mb 400] [--source auto|synthetic|real] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from slmops.bundle.oci_ref import Desc, walk
from slmops.bundle.registry import pull, push
from slmops.core.digest import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEMO = Path("/tmp/demo-run")
PIECE = 1 << 20


def load_fixtures() -> ModuleType:
    """tests/bundle/conftest.py as a module: its registry starter and layout builder."""
    spec = importlib.util.spec_from_file_location(
        "slmops_bench_fixtures", REPO / "tests" / "bundle" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def blobs_of(layout: Path) -> list[Path]:
    return sorted(p for p in (layout / "blobs" / "sha256").iterdir() if p.is_file())


def best_of(
    n: int, fn: Callable[[int], Any], setup: Callable[[], Any] | None = None
) -> tuple[float, Any]:
    """Best wall time of `n` runs of fn(run_index), and the last result; `setup` runs untimed
    before each run (removing the previous output, so every run writes into recycled pages
    the way the copy baseline does: fresh guest memory is much slower to touch in a VM)."""
    best, result = float("inf"), None
    for i in range(n):
        if setup is not None:
            setup()
        start = time.perf_counter()
        result = fn(i)
        best = min(best, time.perf_counter() - start)
    return best, result


def raw_put(address: str, repo: str, layout: Path) -> None:
    """Each blob in one streamed monolithic PUT, nothing else: what the registry ingests."""
    with httpx.Client(timeout=60) as client:
        for path in blobs_of(layout):
            url = client.post(f"http://{address}/v2/{repo}/blobs/uploads/").headers["Location"]
            size = str(path.stat().st_size)
            with path.open("rb") as fh:
                resp = client.put(
                    f"{url}&digest=sha256:{path.name}",
                    content=iter(lambda: fh.read(PIECE), b""),
                    headers={"Content-Length": size, "Content-Type": "application/octet-stream"},
                )
            resp.raise_for_status()


def raw_get(address: str, repo: str, layout: Path) -> None:
    """Each blob in one GET, bytes dropped: what the registry serves to one Python client."""
    with httpx.Client(timeout=60) as client:
        for path in blobs_of(layout):
            url = f"http://{address}/v2/{repo}/blobs/sha256:{path.name}"
            with client.stream("GET", url) as resp:
                for _ in resp.iter_raw():
                    pass


def hash_all(layout: Path) -> None:
    for path in blobs_of(layout):
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while piece := fh.read(PIECE):
                h.update(piece)


def copy_all(layout: Path, dst: Path, *, fsync: bool) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for path in blobs_of(layout):
        shutil.copyfile(path, dst / path.name)
        if fsync:
            with (dst / path.name).open("rb") as fh:
                os.fsync(fh.fileno())


def own_verify(layout: Path) -> None:
    """Every descriptor reachable from index.json: size and streamed sha256 of its blob."""
    entries = json.loads((layout / "index.json").read_text())["manifests"]
    roots = [Desc.parse(e, "index.json") for e in entries]

    def fetch(desc: Desc) -> bytes:
        data = (layout / "blobs" / "sha256" / desc.hex).read_bytes()
        if len(data) != desc.size or hashlib.sha256(data).hexdigest() != desc.hex:
            raise SystemExit(f"manifest {desc.digest} is damaged")
        return data

    _, blobs = walk(roots, fetch)
    for desc in blobs.values():
        path = layout / "blobs" / "sha256" / desc.hex
        if path.stat().st_size != desc.size or sha256_file(path) != desc.digest:
            raise SystemExit(f"blob {desc.digest} is damaged")


def make_layout(work: Path, source: str, size_mb: int, fixtures: ModuleType) -> tuple[Path, str]:
    """(layout, what it is): a real demo bundle when asked/available, else a synthetic one."""
    if source in ("real", "auto") and (DEMO / "variants").is_dir():
        try:
            from slmops.bundle.build import build_bundle

            report = DEMO / "report" if (DEMO / "report" / "report.json").is_file() else None
            out = work / "real"
            build_bundle(DEMO / "variants", report, name="bench/demo", version="1.0.0", out=out)
            return out, "real bundle of /tmp/demo-run (slmops.bundle.build)"
        except Exception as exc:
            if source == "real":
                raise
            print(f"note: real bundle build failed ({type(exc).__name__}: {exc}); synthetic")
    out = work / "synthetic"
    small = (size_mb << 20) // 100  # ~1% in small layers, the rest in three large ones
    big = (size_mb << 20) - small
    fixtures.build_layout(out, big_layers=(big // 2, big // 3, big - big // 2 - big // 3))
    return out, f"synthetic layout (pseudo-random layers, {size_mb} MB)"


def run(size_mb: int, source: str) -> dict[str, Any]:
    fixtures = load_fixtures()
    with tempfile.TemporaryDirectory(prefix="slmops-bench-") as tmp:
        work = Path(tmp)
        layout, what = make_layout(work, source, size_mb, fixtures)
        total, count = sum(p.stat().st_size for p in blobs_of(layout)), len(blobs_of(layout))
        times: dict[str, float] = {}
        times["hash"], _ = best_of(2, lambda i: hash_all(layout))
        copy = work / "copy"

        def drop_copy() -> None:
            shutil.rmtree(copy, ignore_errors=True)

        times["copy"], _ = best_of(2, lambda i: copy_all(layout, copy, fsync=False), drop_copy)
        times["copy+fsync"], _ = best_of(2, lambda i: copy_all(layout, copy, fsync=True), drop_copy)
        drop_copy()
        verifier = "own streaming sha256 check (slmops.bundle.verify not used)"
        verify: Callable[[int], Any] = lambda i: own_verify(layout)  # noqa: E731
        if what.startswith("real"):
            try:
                from slmops.bundle.verify import verify_bundle  # type: ignore[import-not-found]

                verify_bundle(layout, [], require_signature=False)
                verify, verifier = (
                    (lambda i: verify_bundle(layout, [], require_signature=False)),
                    "slmops.bundle.verify",
                )
            except Exception as exc:
                print(f"note: verify_bundle unusable ({type(exc).__name__}: {exc})")
        times["verify"], _ = best_of(2, verify)
        with fixtures.run_registry(work / "registry") as server:
            base, address = f"oci://{server.address}/bench", server.address
            times["registry PUT"], _ = best_of(2, lambda i: raw_put(address, f"raw/run{i}", layout))
            times["push"], pushed = best_of(2, lambda i: push(layout, f"{base}/run{i}:1.0.0"))
            times["registry GET"], _ = best_of(2, lambda i: raw_get(address, "bench/run1", layout))
            out = work / "pulled"

            def drop_out() -> None:
                shutil.rmtree(out, ignore_errors=True)

            times["pull"], pulled = best_of(2, lambda i: pull(f"{base}/run1:1.0.0", out), drop_out)
            times["re-push"], repushed = best_of(2, lambda i: push(layout, f"{base}/run1:1.0.0"))
        same = pulled.digest == pushed.digest and all(
            (out / "blobs" / "sha256" / p.name).is_file() for p in blobs_of(layout)
        )
    rates = {k: total / v / 1e6 for k, v in times.items() if k != "re-push"}
    return {
        "layout": what,
        "verifier": verifier,
        "bytes": total,
        "blobs": count,
        "seconds": times,
        "mb_per_s": rates,
        "ratios": {
            "verify/hash": rates["verify"] / rates["hash"],
            "push/copy": rates["push"] / rates["copy"],
            "pull/copy": rates["pull"] / rates["copy"],
            "push/copy+fsync": rates["push"] / rates["copy+fsync"],
            "pull/copy+fsync": rates["pull"] / rates["copy+fsync"],
            "push/registry PUT": rates["push"] / rates["registry PUT"],
            "pull/registry GET": rates["pull"] / rates["registry GET"],
        },
        "push": {"blobs_uploaded": pushed.blobs_uploaded, "chunked": pushed.chunked_blobs},
        "re_push_bytes": repushed.bytes_uploaded,
        "re_push_blobs_skipped": repushed.blobs_skipped,
        "pull_matches": same,
    }


TARGETS = {"verify/hash": 0.8, "push/copy": 0.5, "pull/copy": 0.5}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=int, default=400, help="synthetic layout size")
    ap.add_argument("--source", choices=["auto", "synthetic", "real"], default="synthetic")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.size_mb, args.source)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['layout']}: {result['bytes'] / 1e6:.1f} MB in {result['blobs']} blobs")
    print(f"verify = {result['verifier']}\n")
    print(f"{'step':12} {'seconds':>8} {'MB/s':>9}")
    for step, sec in result["seconds"].items():
        rate = result["mb_per_s"].get(step)
        print(f"{step:12} {sec:8.3f} {rate:9.1f}" if rate else f"{step:12} {sec:8.3f} {'-':>9}")
    print()
    for name, value in result["ratios"].items():
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"  target >= {target}: {'met' if value >= target else 'MISSED'}"
        )
        print(f"{name:16} {value:6.2f}{verdict}")
    print(
        f"re-push bytes: {result['re_push_bytes']} ({result['re_push_blobs_skipped']} blobs skipped)"
    )
    print(f"pulled layout matches pushed digest and blobs: {result['pull_matches']}")
    return 0 if result["re_push_bytes"] == 0 and result["pull_matches"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
