"""blueprint settling: an apply's rollout and device settle may finish after its request

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08

``settled_generation`` (the last generation settled), ``settled_rollout`` (the rollout it
created), ``settling_until`` / ``settling_by`` (the settle lease and its holder),
``settle_error`` / ``settle_failed_at`` (the last failed settle) and ``applied_by`` (who stored
the current generation). Every existing blueprint was settled by the apply that stored it, so its settled
generation is its generation.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blueprints") as batch:
        batch.add_column(
            sa.Column("settled_generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("settled_rollout", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("settling_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("settling_by", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("settle_error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("settle_failed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("applied_by", sa.String(length=128), nullable=True))
    table = sa.table(
        "blueprints",
        sa.column("generation", sa.Integer()),
        sa.column("settled_generation", sa.Integer()),
    )
    op.get_bind().execute(table.update().values(settled_generation=table.c.generation))


def downgrade() -> None:
    """Applies settle in their request again; a settle in flight is forgotten."""
    with op.batch_alter_table("blueprints") as batch:
        batch.drop_column("applied_by")
        batch.drop_column("settle_failed_at")
        batch.drop_column("settle_error")
        batch.drop_column("settling_by")
        batch.drop_column("settling_until")
        batch.drop_column("settled_rollout")
        batch.drop_column("settled_generation")
