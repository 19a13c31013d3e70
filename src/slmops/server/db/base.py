"""The declarative base every table module builds on, and the column helpers they share.

Tables live with their domain (``db/models.py`` for devices and tokens;
``rollouts/tables.py``, ``registry/tables.py``, ``telemetry/tables.py``, ...), each importing
``Base`` from here, so no table module needs another. ``db/metadata.py`` imports them all, for
Alembic and for anything that needs the whole schema.

Only portable column types (String, Integer, Boolean, Text, JSON, DateTime with time zone),
so one Alembic history serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime
from sqlalchemy.orm import DeclarativeBase


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes even for timezone-aware columns; they are stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


Tz = DateTime(timezone=True)
