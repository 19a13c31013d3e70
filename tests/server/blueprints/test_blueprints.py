"""Blueprints end to end: a real `slmops server run` on SQLite, a real bundle pushed to its
registry, devices enrolled and checking in, and `slmops apply -f` as an operator runs it.

The bundle comes from `build_bundle` over fabricated inputs (fake weights, a hand-made report),
so its variant configs are real VariantDescriptors: q8 (selected for profile `pi`) and q4 in
GGUF, int4 and int8 in ONNX, each needing about 400 MiB of RAM.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from factories.blueprints import (
    FITS,
    MAIN,
    MODEL,
    TOO_SMALL,
    _env,
    apply,
    blueprint,
    check_in,
    push_version,
    write,
)
from factories.bundles import make_inputs
from factories.server import Server, _server, credential, enrollment_token, inventory, make_token
from slmops.bundle.build import build_bundle
from slmops.bundle.registry import push
from slmops.protocol.device import DesiredState


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory)


def test_apply_resolves_variants_generation_and_channels(server: Server, tmp_path: Path) -> None:
    digest = push_version(server, tmp_path / "v1", "1.0.0")
    enroll = enrollment_token(server, {"fleet": "bp"})
    inv1 = inventory(**FITS, labels={"site": "a"})
    inv2 = inventory(**TOO_SMALL, labels={"site": "b"})
    inv3 = inventory(**FITS, labels={"ring": "canary"})
    cred1 = credential(server, enroll, "bp-1", **FITS, labels={"site": "a"})
    cred2 = credential(server, enroll, "bp-2", **TOO_SMALL, labels={"site": "b"})
    cred3 = credential(server, enroll, "bp-3", **FITS, labels={"ring": "canary"})
    before = check_in(server, cred1, inv1)
    assert before.status_code == 200 and before.json()["model"] is None

    operator = make_token(server, "operator")
    doc = blueprint("fleet-bp", {"fleet": "bp"}, {"name": MODEL, "version": "1.0.0"})
    res = apply(server, write(tmp_path / "bp.yaml", doc), operator)
    assert res.returncode == 0, res.stdout + res.stderr
    applied = json.loads(res.stdout)
    assert applied["changed"] is True and applied["generation"] == 1 and applied["devices"] == 3

    first = check_in(server, cred1, inv1, before.headers["etag"])
    assert first.status_code == 200 and first.headers["etag"] != before.headers["etag"]
    desired = DesiredState.model_validate(first.json())
    assert desired.model is not None and desired.unplaceable is None
    assert (desired.model.name, desired.model.version, desired.model.variant) == (
        MODEL,
        "1.0.0",
        "q8",
    )
    assert desired.model.bundle_digest == digest and desired.model.repository == MODEL
    assert desired.model.manifest_digest.startswith("sha256:")
    assert desired.generation.temperature == 0.2 and desired.generation.max_tokens == 64

    small = DesiredState.model_validate(check_in(server, cred2, inv2).json())
    assert small.model is None and small.unplaceable and "no variant fits" in small.unplaceable
    assert small.generation.max_tokens == 256  # the device override is bp-1's only

    again = apply(server, tmp_path / "bp.yaml", operator)
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False
    assert check_in(server, cred1, inv1, first.headers["etag"]).status_code == 304

    # Channel-based and more specific: bp-3 follows it, and moves when the channel does.
    with server.client(operator) as c:
        assert c.put(
            f"/api/v1/models/{MODEL}/channels/stable", json={"version": "1.0.0"}
        ).is_success
    chan = blueprint(
        "canary", {"fleet": "bp", "ring": "canary"}, {"name": MODEL, "channel": "stable"}
    )
    assert apply(server, write(tmp_path / "canary.yaml", chan), operator).returncode == 0
    push_version(server, tmp_path / "v2", "1.1.0", ["q4"])
    with server.client(operator) as c:
        assert c.put(
            f"/api/v1/models/{MODEL}/channels/stable", json={"version": "1.1.0"}
        ).is_success
        assert c.get("/api/v1/devices/bp-3").json()["desired"]["model"]["version"] == "1.1.0"
    moved = DesiredState.model_validate(check_in(server, cred3, inv3).json())
    assert moved.model is not None and (moved.model.version, moved.model.variant) == ("1.1.0", "q4")
    still = DesiredState.model_validate(check_in(server, cred1, inv1).json())
    assert still.model is not None and still.model.version == "1.0.0"

    listed = subprocess.run(
        [*MAIN, "get", "blueprints", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "SLMOPS_SERVER": server.url, "SLMOPS_TOKEN": operator},
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert [b["name"] for b in json.loads(listed.stdout)["data"]] == ["canary", "fleet-bp"]

    with server.client(operator) as c:  # deleting releases bp-3 to the fleet blueprint
        assert c.delete("/api/v1/blueprints/canary").status_code == 204
        assert c.get("/api/v1/devices/bp-3").json()["desired"]["model"]["version"] == "1.0.0"
        assert c.get("/api/v1/blueprints/canary").status_code == 404
        # An operator label moving a device out of every selector releases it at once.
        r = c.patch("/api/v1/devices/bp-1/labels", json={"set": {"fleet": "elsewhere"}})
        assert r.status_code == 200 and r.json()["desired"]["model"] is None
        r = c.patch("/api/v1/devices/bp-1/labels", json={"set": {"fleet": "bp"}})
        assert r.json()["desired"]["model"]["variant"] == "q8"


def test_bad_blueprints_and_roles_are_refused(server: Server, tmp_path: Path) -> None:
    doc = blueprint("bad", {}, {"name": MODEL, "version": "1.0.0"})
    doc["spec"]["modle"] = {"name": MODEL}
    path = write(tmp_path / "bad.yaml", doc)
    res = apply(server, path, make_token(server, "operator"))
    assert res.returncode == 2
    err = json.loads(res.stdout)
    assert "bad.yaml" in err["where"] and "modle" in err["where"] + err["message"]

    good = write(tmp_path / "good.yaml", blueprint("good", {}, {"name": MODEL, "version": "1"}))
    viewer = make_token(server, "viewer")
    res = apply(server, good, viewer)
    assert res.returncode == 2 and "403" in json.loads(res.stdout)["message"]
    with server.client(viewer) as c:
        assert (
            c.put("/api/v1/blueprints/good", json=yaml.safe_load(good.read_text())).status_code
            == 403
        )
        assert c.get("/api/v1/blueprints").status_code == 200
    with server.client(make_token(server, "operator")) as c:
        r = c.put("/api/v1/blueprints/bad", json=doc)
        assert r.status_code == 422 and r.json()["error"]["where"] == "body.spec.modle"


def test_a_blueprint_applied_before_its_version_is_pushed_rolls_out_once_signed(
    server: Server, tmp_path: Path
) -> None:
    """CI often applies first and pushes second: the rollout starts when the signature lands
    (pushed last), and pushing the same version again starts nothing new."""
    from slmops.bundle.signing import init_keys, sign_bundle

    enroll = enrollment_token(server, {"fleet": "late"})
    credential(server, enroll, "late-1", **FITS)
    operator = make_token(server, "operator")
    doc = blueprint("late-bp", {"fleet": "late"}, {"name": MODEL, "version": "3.0.0"})
    res = apply(server, write(tmp_path / "bp.yaml", doc), operator)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["rollout"] is None  # nothing to roll out yet

    variants, report = make_inputs(tmp_path / "in", None)
    built = build_bundle(variants, report, name=MODEL, version="3.0.0", out=tmp_path / "b")
    private, _ = init_keys(tmp_path / "keys")
    sign_bundle(built.path, private)
    ref = f"oci://{server.url.removeprefix('http://')}/{MODEL}:3.0.0"
    push(built.path, ref, token=server.admin)
    with server.client(operator) as c:
        listed = c.get("/api/v1/rollouts", params={"blueprint": "late-bp"}).json()["data"]
        assert [(r["target_version"], r["devices"]) for r in listed] == [("3.0.0", 1)]
        push(built.path, ref, token=server.admin)  # the same version again: no second rollout
        again = c.get("/api/v1/rollouts", params={"blueprint": "late-bp"}).json()["data"]
        assert len(again) == 1
