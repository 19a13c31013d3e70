"""registry: tags and channels

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "registry_tags",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(71), nullable=False),
        sa.Column("media_type", sa.String(128), nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.UniqueConstraint("repository", "tag", name="uq_registry_tags_key"),
    )
    op.create_index("ix_registry_tags_repository", "registry_tags", ["repository"])
    op.create_table(
        "registry_channels",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.UniqueConstraint("repository", "channel", name="uq_registry_channels_key"),
    )
    op.create_index("ix_registry_channels_repository", "registry_channels", ["repository"])


def downgrade() -> None:
    op.drop_table("registry_channels")
    op.drop_table("registry_tags")
