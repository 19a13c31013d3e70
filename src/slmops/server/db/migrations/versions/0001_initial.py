"""initial schema: tokens, enrollment tokens, devices, device actions, rollouts

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_api_tokens_token_hash", "api_tokens", ["token_hash"], unique=True)

    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("expires_at", Tz, nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
    )
    op.create_index(
        "ix_enrollment_tokens_token_hash", "enrollment_tokens", ["token_hash"], unique=True
    )

    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("operator_labels", sa.JSON(), nullable=False),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("profile", sa.String(128), nullable=True),
        sa.Column("enrolled_at", Tz, nullable=False),
        sa.Column("last_seen", Tz, nullable=True),
        sa.Column("active", sa.JSON(), nullable=True),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("desired", sa.JSON(), nullable=True),
        sa.Column("desired_etag", sa.String(80), nullable=True),
    )
    op.create_index("ix_devices_device_id", "devices", ["device_id"], unique=True)
    op.create_index("ix_devices_credential_hash", "devices", ["credential_hash"], unique=True)

    op.create_table(
        "device_actions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "device_id",
            sa.String(128),
            sa.ForeignKey("devices.device_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
        sa.UniqueConstraint("device_id", "rollout_id", "version", name="uq_device_actions_key"),
    )
    op.create_index("ix_device_actions_device_id", "device_actions", ["device_id"])

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("updated_at", Tz, nullable=False),
    )
    op.create_index("ix_rollouts_status", "rollouts", ["status"])


def downgrade() -> None:
    op.drop_table("rollouts")
    op.drop_table("device_actions")
    op.drop_table("devices")
    op.drop_table("enrollment_tokens")
    op.drop_table("api_tokens")
