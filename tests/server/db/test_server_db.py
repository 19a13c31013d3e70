"""Database, settings, secrets and the small parsers, without a server.

The migration test is the one that keeps Alembic and the models from drifting apart: after
``upgrade head`` autogenerate must find nothing to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from slmops.cli.server import parse_duration, parse_labels
from slmops.core.errors import ConfigError
from slmops.server.api.device.checkin import etag_matches
from slmops.server.api.operator.devices import matches, parse_selector
from slmops.server.db.metadata import metadata
from slmops.server.db.session import open_database, upgrade
from slmops.server.security import Role, TokenKind, hash_secret, looks_like, new_secret
from slmops.server.settings import load_settings


def test_migrations_match_the_models_and_are_idempotent(tmp_path: Path) -> None:
    db = open_database(load_settings(data_dir=tmp_path))
    upgrade(db.engine)  # a second run is a no-op
    with db.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata
        )
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert diff == []
    assert version == "0011"
    tables = set(inspect(db.engine).get_table_names())
    assert {"api_tokens", "enrollment_tokens", "devices", "device_actions", "rollouts"} <= tables
    assert "rollout_devices" in tables
    db.dispose()


def test_sqlite_gets_wal_and_busy_timeout(tmp_path: Path) -> None:
    db = open_database(load_settings(data_dir=tmp_path, sqlite_busy_timeout_ms=1234))
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 1234
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert (tmp_path / "slmops.db").exists()
    db.dispose()


def test_settings_refuse_public_host_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow-public"):
        load_settings(data_dir=tmp_path, host="0.0.0.0")
    assert load_settings(data_dir=tmp_path, host="0.0.0.0", allow_public=True).allow_public
    with pytest.raises(ConfigError, match="port"):
        load_settings(data_dir=tmp_path, port=70000)
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        load_settings(data_dir=tmp_path, db_url="slmops.db")


def test_settings_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{(tmp_path / 'slmops.db').resolve()}"
    pg = load_settings(data_dir=tmp_path, db_url="postgresql://u@h/db")
    assert pg.database_url == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("SLMOPS_PORT", "9999")
    assert load_settings(data_dir=tmp_path).port == 9999


def test_secrets_are_typed_and_hashed_by_kind() -> None:
    secret = new_secret(TokenKind.API)
    assert looks_like(secret, TokenKind.API) and not looks_like(secret, TokenKind.DEVICE)
    assert hash_secret(secret, TokenKind.API) == hash_secret(secret, TokenKind.API)
    assert hash_secret(secret, TokenKind.API) != hash_secret(secret, TokenKind.DEVICE)
    assert secret not in hash_secret(secret, TokenKind.API)
    assert new_secret(TokenKind.API) != secret


def test_roles_include_lower_ones() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)


def test_selector_parsing_and_matching() -> None:
    reqs = parse_selector("site=a, tier!=core ,gpu")
    assert reqs == [("site", "=", "a"), ("tier", "!=", "core"), ("gpu", "exists", None)]
    assert matches({"site": "a", "gpu": "1"}, reqs)
    assert not matches({"site": "a", "tier": "core", "gpu": "1"}, reqs)
    assert not matches({"site": "a"}, reqs)
    assert parse_selector("") == []


def test_cli_parsers() -> None:
    assert parse_duration("7d").total_seconds() == 7 * 86400
    assert parse_duration("90").total_seconds() == 90
    for bad in ("0d", "7y", "-1h", ""):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    assert parse_labels("site=a, ring=canary") == {"site": "a", "ring": "canary"}
    assert parse_labels(None) == {}
    with pytest.raises(ConfigError):
        parse_labels("novalue")


def test_if_none_match() -> None:
    assert etag_matches('"abc"', '"abc"')
    assert etag_matches('W/"abc", "x"', '"abc"')
    assert etag_matches("*", '"abc"')
    assert not etag_matches('"abd"', '"abc"') and not etag_matches(None, '"abc"')


def test_processes_starting_together_migrate_one_at_a_time_on_postgresql() -> None:
    """Several API processes started at once after an upgrade: one migrates, the others wait
    on the advisory lock and find the schema current (without it, two upgrades race to create
    the same tables)."""
    import threading

    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text

    from pg import postgres_cluster
    from slmops.server.db.session import alembic_config

    with postgres_cluster() as url:
        engines = [create_engine(url) for _ in range(3)]
        errors: list[BaseException] = []

        def run(engine: object) -> None:
            try:
                upgrade(engine)  # type: ignore[arg-type]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        with engines[0].connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert [v[0] for v in versions] == [head]
        for e in engines:
            e.dispose()
