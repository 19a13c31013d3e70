"""Engine, sessions and migrations.

SQLite gets WAL (readers never block the writer, several API processes can share the file)
and a busy timeout (a writer waits for the lock instead of failing) on every connection.
Within one process, write transactions also take turns on a lock before SQLite sees them:
SQLite's busy handler waits by sleeping (1, 2, 5, 10 ... 100 ms), so a dozen request threads
writing at once (every device check-in writes its row) would spend most of their time asleep
with the database idle; a lock hands over the moment the previous writer commits. Other
processes on the same file still meet the busy timeout.
Migrations are Alembic's, run in code at startup: the Config is built here, so no
``alembic.ini`` has to be found next to the working directory of an installed package.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from slmops.core.errors import ConfigError
from slmops.server.invalidation import notify_on_commit
from slmops.server.settings import ServerSettings

MIGRATIONS = Path(__file__).parent / "migrations"
# Kept open per process: anyio runs sync routes on up to 40 threads, and a connection opened
# past the pool (overflow) is closed again when returned, so a busy server would reconnect
# (and rerun the pragmas, reread the schema) on most requests.
POOL_SIZE = 20
POOL_OVERFLOW = 20


def json_dumps(value: Any) -> str:
    """The JSON columns' encoder: orjson, about 5x the standard library's on the telemetry
    aggregates that every ingested window writes (their encoding was a seventh of the writer's
    time). Non-string keys are written as strings, as ``json.dumps`` does."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def dialect_insert(dialect_name: str, table: Any) -> Any:
    """The engine's own INSERT, which has ``on_conflict_do_nothing/update`` and RETURNING."""
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


JSON_CODEC: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": orjson.loads}


@dataclass(frozen=True)
class Database:
    """An engine and its session factory; one per process, holding no application state."""

    engine: Engine
    sessions: sessionmaker[Session]

    def dispose(self) -> None:
        self.engine.dispose()


def make_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """An engine for ``url``; SQLite connections get WAL, busy_timeout and foreign keys."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"not a database URL: {exc}", where="--db") from None
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            **JSON_CODEC,
        )
    if parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    factory = serialized_writes(busy_timeout_ms / 1000)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "factory": factory},
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        **JSON_CODEC,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")


def serialized_writes(timeout_s: float) -> type[sqlite3.Connection]:
    """A sqlite3 connection class whose write transactions hold one lock (per engine) from
    their first write statement to commit, rollback or close. After ``timeout_s`` a writer
    goes ahead without it (SQLite's own locking still applies), so it can never deadlock."""
    lock = threading.Lock()

    class _Cursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> Self:
            _begins(self.connection, sql)
            return super().execute(sql, parameters)

        def executemany(self, sql: str, seq: Any, /) -> Self:
            _begins(self.connection, sql)
            return super().executemany(sql, seq)

    def _begins(conn: sqlite3.Connection, sql: str) -> None:
        if isinstance(conn, _Connection):
            conn.writes(sql)

    class _Connection(sqlite3.Connection):
        holds = False

        def writes(self, sql: str) -> None:
            if not self.holds and sql.lstrip()[:7].upper().startswith(_WRITES):
                self.holds = lock.acquire(timeout=timeout_s)

        def release(self) -> None:
            if self.holds:
                self.holds = False
                lock.release()

        def cursor(self, factory: Any = _Cursor) -> Any:
            return super().cursor(factory)

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self.release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self.release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self.release()

    return _Connection


MIGRATION_LOCK_KEY = 0x736C6D6F7073 + 1  # beside the ticker's leadership key (server/leadership.py)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there.

    On PostgreSQL the upgrade holds a transaction-scoped advisory lock: API processes started
    together after an upgrade migrate one at a time, the later ones finding the schema current.
    """
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def open_database(settings: ServerSettings, *, migrate: bool = True) -> Database:
    """Connect to the configured database and (by default) apply pending migrations."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    if migrate:
        upgrade(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    notify_on_commit(sessions, engine)  # changed desired states reach every API process
    return Database(engine, sessions)
