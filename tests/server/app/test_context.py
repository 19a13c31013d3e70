"""The app-scoped services (server/context.py): one set per app, handed to every use case."""

from __future__ import annotations

from pathlib import Path

from slmops.server.app import create_app
from slmops.server.context import Every, Services
from slmops.server.settings import load_settings


def test_each_app_has_its_own_services_and_contexts_carry_them(tmp_path: Path) -> None:
    a = create_app(load_settings(data_dir=tmp_path / "a", poll_seconds=7))
    b = create_app(load_settings(data_dir=tmp_path / "b"))
    sa, sb = a.state.services, b.state.services
    assert isinstance(sa, Services) and isinstance(sb, Services)
    assert sa.targets is not sb.targets and sa.slow is not sb.slow
    assert sa.store.blobs == tmp_path / "a" / "blobs" / "sha256"
    ctx = sa.context(now=5.0)
    assert (ctx.store, ctx.targets, ctx.poll_seconds, ctx.now) == (sa.store, sa.targets, 7, 5.0)
    assert sa.context().now > 5.0  # stamped when made


def test_every_spaces_work_out() -> None:
    every = Every(10.0)
    assert every.due(100.0)
    assert not every.due(109.9)
    assert every.due(110.0)
    assert not every.due(115.0)
