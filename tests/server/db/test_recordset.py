"""Rows sent as one JSON parameter (server/db/recordset.py) on a real PostgreSQL.

What goes in comes back exactly (quotes, backslashes, unicode, floats to the last bit, JSON
columns), in as many statements as ``ROWS_PER_STATEMENT`` asks, with the rows written counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
)
from sqlalchemy.types import JSON

from slmops.server.db import recordset

META = MetaData()
ROWS = Table(
    "rs_rows",
    META,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64)),
    Column("at", Float),
    Column("doc", JSON),
)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    from pg import postgres_cluster

    with postgres_cluster() as url:
        yield url


def test_rows_come_back_exactly_in_chunks(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    META.create_all(engine)
    names = ['qu"ote', "back\\slash", "ünï ✓ 🚀", "tab\tnew\nline", "trail  ", "\\u0041"]
    rows = [
        {
            "name": name,
            "at": 1_700_000_000.123456789 + i / 3,
            "doc": {"nested": [1.5e-300, name], "n": i},
        }
        for i, name in enumerate(names)
    ]
    statements: list[str] = []
    monkeypatch.setattr(recordset, "ROWS_PER_STATEMENT", 4)
    with engine.begin() as conn:

        @event.listens_for(conn, "before_cursor_execute")
        def _count(*args: object) -> None:
            statements.append("x")

        written = recordset.execute_rows(
            conn, recordset.insert_rows(ROWS, ("name", "at", "doc")), rows
        )
    assert written == len(rows)
    assert len(statements) == 2  # 6 rows, 4 per statement
    with engine.connect() as conn:
        got = [dict(r._mapping) for r in conn.execute(select(ROWS).order_by(ROWS.c.id))]
    assert [{k: r[k] for k in ("name", "at", "doc")} for r in got] == rows
    engine.dispose()


def test_fetch_rows_returns_what_each_chunk_inserted(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``insert_rows`` with a suffix (ON CONFLICT ... RETURNING, as the telemetry writer's
    batch rows): the rows a conflict skipped are not returned, from every chunk."""
    keyed = Table(
        "rs_keyed",
        META,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(64), unique=True),
        Column("at", Float),
    )
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    META.create_all(engine)
    monkeypatch.setattr(recordset, "ROWS_PER_STATEMENT", 3)
    stmt = recordset.insert_rows(
        keyed, ("name", "at"), "ON CONFLICT (name) DO NOTHING RETURNING id, name"
    )
    with engine.begin() as conn:
        first = recordset.fetch_rows(conn, stmt, [{"name": f"n{i}", "at": i} for i in range(4)])
        again = recordset.fetch_rows(
            conn, stmt, [{"name": f"n{i}", "at": i} for i in (1, 9, 3, 7, 2)]
        )
    assert sorted(r.name for r in first) == ["n0", "n1", "n2", "n3"]
    assert sorted(r.name for r in again) == ["n7", "n9"]  # n1, n2, n3 were there
    assert len({r.id for r in first + again}) == 6
    engine.dispose()
