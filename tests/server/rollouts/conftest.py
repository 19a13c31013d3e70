"""Rollout suites' servers and bundles: a real `slmops server run` ticking rollouts every 0.2 s
(SQLite, and PostgreSQL for ``any_server``) with one built bundle per version pushed to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from factories.rollouts import (
    TICK,
    VERSIONS,
    build_versions,
    postgres_server,
    push_all,
)
from factories.server import (
    Server,
    _server,
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One built bundle per version, pushed to every server the module starts."""
    return build_versions(tmp_path_factory.mktemp("bundles"), VERSIONS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Server]:
    """SQLite; most tests run here only."""
    for srv in _server(tmp_path_factory, env=TICK):
        push_all(srv, bundles)
        yield srv


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def any_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Server]:
    """The core flows on both databases (the SQLite one is the module's ``server``)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    for srv, _url in postgres_server(tmp_path_factory, bundles):
        yield srv
