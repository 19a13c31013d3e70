"""The bundle commands as a user runs them: build, keys, sign, verify, inspect, push, pull.

Inputs are the packaging factory's fabricated variants (fake weight bytes: these tests are
about packaging and transfer, not inference); the registry is a real docker-registry.
"""

import json
import os
import stat
from pathlib import Path

from factories.bundles import make_inputs
from helpers import run_cli as slmops


def test_build_sign_verify_push_pull(tmp_path: Path, oci_registry: str) -> None:
    variants, report = make_inputs(tmp_path / "in")
    bundle = tmp_path / "bundle"
    r = slmops(
        "bundle",
        str(variants),
        "--report",
        str(report),
        "--name",
        "assistant",
        "--version",
        "1.0.0",
        "--out",
        str(bundle),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    digest = json.loads(r.stdout)["digest"]

    r = slmops("keys", "init", "--out", str(tmp_path / "keys"), "--json")
    assert r.returncode == 0, r.stderr
    keys = json.loads(r.stdout)
    assert stat.S_IMODE(os.stat(keys["private_key"]).st_mode) == 0o600
    assert slmops("sign", str(bundle), "--key", keys["private_key"]).returncode == 0

    ok = slmops("verify", str(bundle), "--trust", keys["public_key"], "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["digest"] == digest

    other = slmops("keys", "init", "--out", str(tmp_path / "other"), "--json")
    bad = slmops("verify", str(bundle), "--trust", json.loads(other.stdout)["public_key"])
    assert bad.returncode == 1 and "not among the trusted keys" in bad.stderr

    info = slmops("inspect", str(bundle), "--json")
    assert info.returncode == 0
    data = json.loads(info.stdout)
    assert data["name"] == "assistant" and data["version"] == "1.0.0" and data["digest"] == digest

    ref = f"oci://{oci_registry}/cli/assistant:1.0.0"
    pushed = slmops("push", str(bundle), ref, "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["blobs_uploaded"] > 0
    again = json.loads(slmops("push", str(bundle), ref, "--json").stdout)
    assert again["bytes_uploaded"] == 0 and again["blobs_uploaded"] == 0

    pulled = tmp_path / "pulled"
    r = slmops("pull", ref, "--out", str(pulled), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == digest
    r = slmops("verify", str(pulled), "--trust", keys["public_key"])
    assert r.returncode == 0, r.stderr


def test_bad_input_exit_codes(tmp_path: Path) -> None:
    variants, report = make_inputs(tmp_path / "in")
    r = slmops(
        "bundle",
        str(variants),
        "--report",
        str(report),
        "--name",
        "assistant",
        "--version",
        "1.0",
        "--out",
        str(tmp_path / "b"),
    )
    assert r.returncode == 2 and "semantic versioning" in r.stderr
    assert not (tmp_path / "b").exists()
    r = slmops("verify", str(tmp_path / "b"), "--trust", str(tmp_path / "k.pub"))
    assert r.returncode == 2 and "k.pub" in r.stderr, "a missing key file is named"
    pub = json.loads(slmops("keys", "init", "--out", str(tmp_path / "keys"), "--json").stdout)[
        "public_key"
    ]
    r = slmops("verify", str(tmp_path / "nope"), "--trust", pub)
    assert r.returncode in (1, 2) and "nope" in r.stderr, "a missing bundle is named"
    r = slmops("pull", "oci://bad ref", "--out", str(tmp_path / "p"))
    assert r.returncode == 2
    r = slmops(
        "bundle",
        str(variants),
        "--report",
        str(report),
        "--name",
        "a",
        "--version",
        "1.0.0",
        "--out",
        str(tmp_path / "t.tar"),
        "--format",
        "zip",
    )
    assert r.returncode == 2 and "--format" in r.stderr
