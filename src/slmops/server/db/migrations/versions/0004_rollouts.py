"""rollouts driven by blueprints

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("blueprint", sa.String(63), nullable=False, server_default=""))
        batch.add_column(sa.Column("model", sa.String(128), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("target_version", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_rollouts_blueprint", ["blueprint"])
    with op.batch_alter_table("blueprints") as batch:
        batch.add_column(sa.Column("stable_version", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blueprints") as batch:
        batch.drop_column("stable_version")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_index("ix_rollouts_blueprint")
        for column in ("seq", "revision", "target_version", "model", "blueprint"):
            batch.drop_column(column)
