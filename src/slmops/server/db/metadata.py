"""The whole schema: every table module imported, so ``metadata`` holds every table.

Alembic's ``env.py`` compares migrations against this, and tests that check the migrations
match the models use it. Add a new table module here (and a migration under ``migrations/``).
Nothing at run time needs it: each domain imports its own tables.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from slmops.server import audit, identity_tables
from slmops.server.blueprints import tables as blueprints_tables
from slmops.server.db import models
from slmops.server.db.base import Base
from slmops.server.feedback import tables as feedback_tables
from slmops.server.registry import tables as registry_tables
from slmops.server.rollouts import tables as rollouts_tables
from slmops.server.telemetry import tables as telemetry_tables

TABLE_MODULES = (
    models,
    audit,
    blueprints_tables,
    identity_tables,
    feedback_tables,
    registry_tables,
    rollouts_tables,
    telemetry_tables,
)
metadata: MetaData = Base.metadata
