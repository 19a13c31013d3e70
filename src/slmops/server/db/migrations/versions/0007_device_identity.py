"""device identity lifecycle: device status, enrollment requests, token revocation, audit log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ADD COLUMN (both dialects do it in place). Not batch mode: on SQLite that copies
    # and drops ``devices``, and with foreign keys on, the drop would cascade into the tables
    # that reference it (device actions, telemetry).
    op.add_column(
        "devices", sa.Column("status", sa.String(16), nullable=False, server_default="active")
    )
    op.add_column("enrollment_tokens", sa.Column("revoked_at", Tz, nullable=True))
    op.create_table(
        "enrollment_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "device_id",
            sa.String(128),
            sa.ForeignKey("devices.device_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("credential_hash", sa.String(64), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("decided_at", Tz, nullable=True),
        sa.Column("decided_by", sa.String(128), nullable=True),
    )
    op.create_index("ix_enrollment_requests_device_id", "enrollment_requests", ["device_id"])
    op.create_index(
        "ix_enrollment_requests_credential_hash",
        "enrollment_requests",
        ["credential_hash"],
        unique=True,
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", Tz, nullable=False),
        sa.Column("actor_kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_target", "audit_log", ["target"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("enrollment_requests")
    op.drop_column("enrollment_tokens", "revoked_at")
    op.drop_column("devices", "status")
