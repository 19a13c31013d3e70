"""stable adapters: a blueprint's adapter assignments roll out like its version

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Before this, a blueprint's ``adapters:`` reached devices as soon as it was applied. Now an
adapter change is a rollout (waves, gates, automatic rollback) and devices outside it get the
blueprint's *stable* adapters, those of the last release that succeeded. Existing blueprints'
devices were already told their spec's adapters, so that list becomes their stable release.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _release(spec: Any) -> list[dict[str, Any]]:
    """``blueprints/document.adapter_release`` of this revision: assignments in canonical order."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    docs = [dict(a) for a in (spec or {}).get("adapters") or []]
    for d in docs:
        d.setdefault("selector", {})
    return sorted(docs, key=lambda d: json.dumps(d, sort_keys=True))


def upgrade() -> None:
    with op.batch_alter_table("blueprints") as batch:
        batch.add_column(sa.Column("stable_adapters", sa.JSON(), nullable=True))
    table = sa.table(
        "blueprints",
        sa.column("id", sa.Integer()),
        sa.column("spec", sa.JSON()),
        sa.column("stable_adapters", sa.JSON()),
    )
    bind = op.get_bind()
    for row_id, spec in bind.execute(sa.select(table.c.id, table.c.spec)).all():
        bind.execute(
            table.update().where(table.c.id == row_id).values(stable_adapters=_release(spec))
        )


def downgrade() -> None:
    """The spec's adapters reach devices directly again (an adapter rollout in flight is
    lost; the rollout rows stay as history)."""
    with op.batch_alter_table("blueprints") as batch:
        batch.drop_column("stable_adapters")
