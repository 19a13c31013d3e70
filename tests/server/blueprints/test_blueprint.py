from pathlib import Path

import pytest

from slmops.core.errors import ConfigError
from slmops.server.blueprints.document import Blueprint, effective_generation

BP = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: store-assistant}
spec:
  selector: {fleet: stores}
  model: {name: assistant, channel: stable}
  generation: {temperature: 0.2, system_prompt: fleet}
  groups:
    - selector: {region: eu}
      generation: {system_prompt: eu-group, max_tokens: 128}
    - selector: {region: eu, tier: kiosk}
      generation: {max_tokens: 64}
  devices:
    kiosk-17: {system_prompt: device-17}
  rollout:
    waves: [{count: 1}, {percent: 50}, {percent: 100}]
"""


def _load(tmp_path: Path, text: str) -> Blueprint:
    f = tmp_path / "bp.yaml"
    f.write_text(text)
    return Blueprint.from_file(f)


def test_precedence_fleet_group_device(tmp_path: Path) -> None:
    bp = _load(tmp_path, BP)
    us = effective_generation(bp, "d1", {"fleet": "stores", "region": "us"})
    assert (us.system_prompt, us.temperature, us.max_tokens) == ("fleet", 0.2, 256)
    eu = effective_generation(bp, "d2", {"fleet": "stores", "region": "eu", "tier": "kiosk"})
    assert (eu.system_prompt, eu.max_tokens) == ("eu-group", 64), "later groups win"
    dev = effective_generation(bp, "kiosk-17", {"fleet": "stores", "region": "eu"})
    assert (dev.system_prompt, dev.max_tokens, dev.temperature) == ("device-17", 128, 0.2)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("model: {name: assistant, channel: stable}", "model: {name: assistant}", "exactly one of"),
        ("generation: {temperature: 0.2", "generation: {temprature: 0.2", "temprature"),
        ("name: store-assistant", "name: Store_Assistant", "metadata.name"),
        ("kind: Blueprint", "kind: Deployment", "kind"),
    ],
)
def test_invalid_blueprints_name_the_key(tmp_path: Path, old: str, new: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, BP.replace(old, new))
    assert needle in exc.value.render() and "bp.yaml" in exc.value.render()
