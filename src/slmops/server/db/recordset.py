"""PostgreSQL: many rows in one statement and one parameter (``json_to_recordset``).

Why: on PostgreSQL, psycopg runs an executemany as one pipelined statement per row, and
SQLAlchemy's multi-row INSERT binds every value of every row separately; either way each value
is adapted in Python while the thread holds the interpreter lock the API's event loop needs.
py-spy on the telemetry writer put over a third of its time there for rows it had already
encoded once (the aggregates are JSON). Sent as one JSON document (``execute_rows``: one
orjson call per 5,000 rows), the rows are unpacked by the server, ``json_to_recordset(:rows)
AS v(col type, ...)``, with the types taken from the table's own columns, so a column change
follows the table. SQLite keeps the plain statements (its executemany is one C loop already).
PostgreSQL cannot read a ``\u0000`` escape there: the wire schema refuses NUL in the names
that reach these rows (``protocol/telemetry.py: NO_NUL``) and replaces it in the free text of
samples (``Sample``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Row, Table, TextClause, text
from sqlalchemy.dialects import postgresql

from slmops.server.db.session import json_dumps

ROWS_PER_STATEMENT = 5_000
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _quoted(name: str) -> str:
    return str(_PG.identifier_preparer.quote(name))


def recordset(table: Table, columns: Sequence[str], alias: str = "v") -> str:
    """``json_to_recordset(CAST(:rows AS json)) AS v(col type, ...)`` for ``columns`` of
    ``table`` (SQL text, for a statement's FROM)."""
    spec = ", ".join(f"{_quoted(c)} {table.c[c].type.compile(dialect=_PG)}" for c in columns)
    return f"json_to_recordset(CAST(:rows AS json)) AS {alias}({spec})"


@functools.cache
def insert_rows(table: Table, columns: tuple[str, ...], suffix: str = "") -> TextClause:
    """INSERT of every row of ``:rows`` (``execute_rows``, ``fetch_rows``) into ``columns`` of
    ``table``, then ``suffix`` (``ON CONFLICT ...``, ``RETURNING ...``); built once per table,
    columns and suffix."""
    cols = ", ".join(_quoted(c) for c in columns)
    return text(
        f"INSERT INTO {_quoted(table.name)} ({cols}) SELECT {cols} FROM {recordset(table, columns)}"
        + (f" {suffix}" if suffix else "")
    )


def execute_rows(conn: Connection, statement: Any, rows: Sequence[dict[str, Any]]) -> int:
    """Run ``statement`` (one taking ``:rows``) over ``rows``, ``ROWS_PER_STATEMENT`` at a time
    (a group after a fleet comes back online can hold 100,000 windows: one parameter of
    hundreds of MB otherwise); the rows it wrote."""
    return sum(int(conn.execute(statement, params).rowcount) for params in _chunks(rows))


def fetch_rows(conn: Connection, statement: Any, rows: Sequence[dict[str, Any]]) -> list[Row[Any]]:
    """``execute_rows`` for a statement that returns rows (``RETURNING``): every chunk's."""
    return [row for params in _chunks(rows) for row in conn.execute(statement, params)]


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterator[dict[str, str]]:
    """The ``:rows`` parameter of each statement, ``ROWS_PER_STATEMENT`` rows in each."""
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        yield {"rows": json_dumps(list(rows[i : i + ROWS_PER_STATEMENT]))}
