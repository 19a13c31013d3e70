"""Improvement jobs on real artifacts: the tiny model -> a signed Q8_0 bundle (1.0.0) -> `improve`
(adjusted recipe, real optimize and evaluate on a built-in profile, gate, bundle, sign), the CLI's
refusals and exit codes, and `slmops improve-worker` against a real `slmops server run`.

The profile is the built-in `x86-minipc-16gb`: the tiny model fits it with room to spare, and a
worker resolves a job's profile by name (it comes from the devices' inventory). The gate's
numbers are the real measured ones, so the assertions check that ``ok`` agrees with them rather
than fixing an outcome (the RAM figures of the tiny model's variants lie within a MiB).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from factories.server import Server, _server, credential, enrollment_token, inventory
from helpers import run_cli
from slmops.core.errors import UserInputError
from slmops.feedback.improve import Candidate, improve, running_variant

NAME = "acme/bot"
VARIANT = "gguf-q8_0"
PROFILE = "x86-minipc-16gb"
RECIPE = """\
name: improve-test
variants:
  gguf-q8_0:
    - export-gguf: {outtype: f16}
    - quantize-gguf: {type: Q8_0}
"""
# from the card chain export-gguf(f16) + quantize-gguf(Q8_0): one rung up is the export itself;
# two rungs down, plus the same chain behind an FFN pruning step
EXPECTED = {
    "higher-precision": ["next-gguf-f16"],
    "smaller": ["next-gguf-q6_k", "next-gguf-q5_k_m", "next-ffn25-gguf-q8_0"],
}
CHAINS = {
    "next-gguf-f16": ["export-gguf"],
    "next-gguf-q6_k": ["export-gguf", "quantize-gguf"],
    "next-gguf-q5_k_m": ["export-gguf", "quantize-gguf"],
    "next-ffn25-gguf-q8_0": ["prune-structured", "export-gguf", "quantize-gguf"],
}


@dataclass(frozen=True)
class Running:
    bundle: Path  # 1.0.0: one signed Q8_0 variant with its evaluation report
    model: Path  # the original model its chain started from
    priv: Path
    pub: Path


@pytest.fixture(scope="module")
def running(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Running:
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import init_keys, sign_bundle
    from slmops.evaluate.profiles import resolve_profiles
    from slmops.evaluate.runner import EvalOptions, evaluate
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    root = tmp_path_factory.mktemp("improve-running")
    priv, pub = init_keys(root / "keys", "fleet")
    (root / "recipe.yaml").write_text(RECIPE)
    run_recipe(tiny_model, load_recipe(root / "recipe.yaml"), root / "variants")
    options = EvalOptions(
        reference=tiny_model,
        repeats=1,
        max_tokens=8,
        windows=2,
        window_tokens=64,
        greedy_prompts=1,
        threads=1,
    )
    evaluate(root / "variants", resolve_profiles([PROFILE]), root / "report", options)
    built = build_bundle(
        root / "variants", root / "report", name=NAME, version="1.0.0", out=root / "bundle"
    )
    sign_bundle(built.path, priv)
    return Running(built.path, tiny_model, priv, pub)


def verify(bundle: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", str(bundle), "--trust", str(pub), "--json")


def recipe_chains(candidate: Candidate) -> dict[str, list[str]]:
    doc = yaml.safe_load(Path(candidate.recipe).read_text())
    return {name: [next(iter(step)) for step in steps] for name, steps in doc["variants"].items()}


# --- 1. the job on a real bundle, both directions ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["higher-precision", "smaller"])
def test_improve_builds_gates_and_signs_only_a_passing_candidate(
    running: Running, tmp_path: Path, direction: Any
) -> None:
    current, _ = running_variant(running.bundle, VARIANT)
    assert current.kld_mean is not None
    c = improve(
        bundle=running.bundle,
        variant=VARIANT,
        model=running.model,
        direction=direction,
        profile=PROFILE,
        name=NAME,
        version="1.0.1",
        workdir=tmp_path / "job",
        private_key=running.priv,
    )
    assert c.variants == EXPECTED[direction]
    chains = recipe_chains(c)
    assert chains == {v: CHAINS[v] for v in EXPECTED[direction]}
    if direction == "smaller":  # a small FFN (128 channels) keeps a multiple of 32, not of 256
        doc = yaml.safe_load(Path(c.recipe).read_text())
        prune = doc["variants"]["next-ffn25-gguf-q8_0"][0]["prune-structured"]
        assert prune["round_to"] == 32 and prune["ratio"] == 0.25

    from slmops.server.resolve import ram_needed

    assert c.running == {
        "variant": VARIANT,
        "kld_mean": current.kld_mean,
        "ram_bytes": ram_needed(current),
    }
    by_name = {check["name"]: check for check in c.checks}
    assert set(by_name) == {f"selection:{PROFILE}", f"direction:{direction}"}
    assert by_name[f"selection:{PROFILE}"]["ok"] is True
    assert c.selected is not None and c.selected["variant"] in EXPECTED[direction]
    moved = by_name[f"direction:{direction}"]
    if direction == "higher-precision":
        better = c.selected["kld_mean"] < current.kld_mean
        assert str(c.selected["kld_mean"]) in moved["detail"]
        assert str(current.kld_mean) in moved["detail"]
    else:
        better = c.selected["ram_bytes"] < ram_needed(current)
        assert f"{c.selected['ram_bytes'] / 2**20:.1f} MiB" in moved["detail"]
        assert f"{ram_needed(current) / 2**20:.1f} MiB" in moved["detail"]
    assert moved["ok"] is better and c.ok is better
    assert c.reasons == ([] if better else [moved["detail"]])

    built = tmp_path / "job" / "bundle"  # built whenever the profile got a variant
    if c.ok:
        assert (c.bundle, c.version) == (str(built), "1.0.1")
        res = verify(built, running.pub)
        assert res.returncode == 0, res.stdout + res.stderr
        doc = json.loads(res.stdout)
        assert doc["ok"] is True and (doc["name"], doc["version"]) == (NAME, "1.0.1")
        assert doc["digest"] == c.digest
    else:
        assert c.bundle is None and c.digest is None
        res = verify(built, running.pub)
        assert res.returncode != 0  # built, but never signed
        assert "sign" in res.stdout.lower()


# --- 2. refusals and exit codes ---------------------------------------------------------------


def test_another_model_or_an_unknown_variant_is_refused(running: Running, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(running.model, other)
    (other / "README.md").write_text("not the same tree\n")
    with pytest.raises(UserInputError) as exc:
        improve(
            bundle=running.bundle,
            variant=VARIANT,
            model=other,
            direction="smaller",
            profile=PROFILE,
            name=NAME,
            version="1.0.1",
            workdir=tmp_path / "job",
            private_key=running.priv,
        )
    assert exc.value.where == str(other) or str(other) in str(exc.value.where)
    assert "not the model gguf-q8_0 was made from" in exc.value.message
    assert not (tmp_path / "job").exists()  # refused before any work

    with pytest.raises(UserInputError) as exc:
        running_variant(running.bundle, "gguf-q2")
    assert "no variant 'gguf-q2'" in exc.value.message and exc.value.hint == "variants: gguf-q8_0"

    common = ["--profile", PROFILE, "--version", "1.0.1", "--key", str(running.priv)]
    common += ["--out", str(tmp_path / "cli-job"), "--json"]
    res = run_cli(
        "improve", str(running.bundle), "--variant", VARIANT, "--model", str(other), *common
    )
    assert res.returncode == 2, res.stdout + res.stderr
    err = json.loads(res.stdout)
    assert err["ok"] is False and str(other) in err["where"]
    assert "not the model" in err["message"]

    res = run_cli(
        "improve",
        str(running.bundle),
        "--variant",
        "gguf-q2",
        "--model",
        str(running.model),
        *common,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    err = json.loads(res.stdout)
    assert "gguf-q2" in err["message"] and err["hint"] == "variants: gguf-q8_0"

    res = run_cli(
        "improve",
        str(running.bundle),
        "--variant",
        VARIANT,
        "--model",
        str(running.model),
        "--direction",
        "bigger",
        *common,
    )
    assert res.returncode == 2 and "unknown direction" in json.loads(res.stdout)["message"]
    assert not (tmp_path / "cli-job").exists()


@pytest.mark.slow
def test_cli_exits_1_with_the_reasons_when_the_profile_gets_no_variant(
    running: Running, tmp_path: Path
) -> None:
    """A profile (YAML file) whose RAM budget nothing fits: the gate fails, nothing is signed."""
    from slmops.evaluate.profiles import builtin_profiles

    tight = builtin_profiles()[PROFILE].model_dump(mode="json") | {
        "name": "tight-box",
        "ram_mb": 1,
        "source": "test",
    }
    profile = tmp_path / "tight-box.yaml"
    profile.write_text(yaml.safe_dump(tight))
    out = tmp_path / "job"
    res = run_cli(
        "improve",
        str(running.bundle),
        "--variant",
        VARIANT,
        "--model",
        str(running.model),
        "--profile",
        str(profile),
        "--direction",
        "higher-precision",
        "--version",
        "1.0.1",
        "--key",
        str(running.priv),
        "--out",
        str(out),
        "--json",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    err = json.loads(res.stdout)
    assert err["ok"] is False and "did not pass its gate" in err["message"]
    assert "tight-box" in err["message"]  # the failing check, by profile name
    assert err["hint"] == f"see the report in {out / 'report'}"
    report = json.loads((out / "report" / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["next-gguf-f16"]
    assert not (out / "bundle").exists()  # no fitting variant: nothing built, nothing signed


# --- 3. the worker against a real control plane -----------------------------------------------


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, env={"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"})


def wait_for(what: Any, timeout: float = 15, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"gave up waiting {message}"
        time.sleep(0.1)
    return value


def insert_alert(server: Server, statistic: str) -> int:
    from slmops.server.db.session import open_database
    from slmops.server.settings import load_settings
    from slmops.server.telemetry.tables import AlertRow

    db = open_database(load_settings(data_dir=server.data))
    try:
        with db.sessions() as session:
            row = AlertRow(
                kind="drift",
                model=NAME,
                version="1.0.0",
                profile=PROFILE,
                statistic=statistic,
                value=0.4,
                threshold=0.2,
                details={"test": True},
            )
            session.add(row)
            session.commit()
            return int(row.id)
    finally:
        db.dispose()


@pytest.mark.slow
def test_worker_claims_improves_pushes_and_proposes_a_manual_rollout(
    running: Running, server: Server, tmp_path: Path
) -> None:
    from slmops.bundle.registry import push

    name = "fb-worker"
    address = server.url.removeprefix("http://")
    push(running.bundle, f"oci://{address}/{NAME}:1.0.0", token=server.admin)
    # one device of the job's profile, enrolled first so the rollout of 1.0.0 moves it
    inv = inventory(arch="x86_64", profile=PROFILE, model_ram_bytes=2 << 30)
    cred = credential(server, enrollment_token(server, {"fleet": name}), f"{name}-0", **inv)
    blueprint = {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": name},
        "spec": {
            "selector": {"fleet": name},
            "model": {"name": NAME, "version": "1.0.0"},
            "rollout": {"waves": [{"percent": 100}], "gates": {"min_soak_seconds": 0}},
        },
    }
    with server.client(server.admin) as c:
        r = c.put(f"/api/v1/blueprints/{name}", json=blueprint)
        assert r.status_code == 200, r.text
        first = r.json()["rollout"]
        assert first

    def checkin(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(
            server.url + "/device/v1/checkin",
            json={"inventory": inv} | body,
            headers={"Authorization": f"Bearer {cred}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    told = checkin({})["model"]
    assert (told["version"], told["variant"], told["rollout_id"]) == ("1.0.0", VARIANT, first)
    active = {"name": NAME, "version": "1.0.0", "variant": VARIANT, "digest": told["bundle_digest"]}
    checkin(
        {
            "active": active,
            "actions": [{"rollout_id": first, "version": "1.0.0", "state": "active"}],
        }
    )

    def rollout(rid: str) -> dict[str, Any]:
        with server.client(server.admin) as c:
            r = c.get(f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    wait_for(lambda: rollout(first)["status"] == "succeeded", message="for 1.0.0 to settle")

    improve_action = {"improve": {"direction": "higher-precision", "start": "manual"}}
    rules = {
        "apiVersion": "slmops/v1",
        "kind": "FeedbackRules",
        "metadata": {"name": name},
        "spec": {
            "rules": [{"name": "better", "match": {"statistic": name}, "actions": [improve_action]}]
        },
    }
    with server.client(server.admin) as c:
        assert c.put(f"/api/v1/feedback-rules/{name}", json=rules).status_code == 200
    alert = insert_alert(server, name)

    def the_job() -> dict[str, Any] | None:
        with server.client(server.admin) as c:
            data = c.get("/api/v1/jobs").json()["data"]
        return next((j for j in data if j["alert_id"] == alert), None)

    job = wait_for(the_job, message="for the job")
    assert (job["status"], job["variant"], job["profile"], job["version"]) == (
        "queued",
        VARIANT,
        PROFILE,
        "1.0.0",
    )

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.main",
            "improve-worker",
            "--server",
            server.url,
            "--token",
            server.admin,
            "--model",
            str(running.model),
            "--key",
            str(running.priv),
            "--workdir",
            str(tmp_path / "jobs"),
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    [posted] = json.loads(res.stdout)["jobs"]
    assert posted["id"] == job["id"] and posted["new_version"] == "1.0.1"
    with server.client(server.admin) as c:
        done = c.get(f"/api/v1/jobs/{job['id']}").json()
    assert done["status"] == posted["status"]
    candidate = done["result"]["candidate"]
    if done["status"] == "rejected":  # the gate honestly failed: the reasons are on record
        assert candidate["ok"] is False and candidate["reasons"]
        assert done["result"]["detail"] == "; ".join(candidate["reasons"])
        return
    assert done["status"] == "proposed" and done["result"]["detail"] == "gate passed"
    assert candidate["selected"]["kld_mean"] < candidate["running"]["kld_mean"]
    with server.client(server.admin) as c:
        version = c.get(f"/api/v1/models/{NAME}/versions/1.0.1")
        assert version.status_code == 200, version.text
        assert version.json()["digest"] == candidate["digest"]
        assert version.json()["signatures"] == 1
        bp = c.get(f"/api/v1/blueprints/{name}").json()
    spec = bp["document"]["spec"]
    assert spec["model"]["version"] == "1.0.1" and spec["rollout"]["start"] == "manual"
    assert bp["stable_version"] == "1.0.0"
    proposed = rollout(done["rollout_id"])
    assert (proposed["status"], proposed["target_version"], proposed["devices"]) == (
        "created",
        "1.0.1",
        1,
    )
