"""telemetry: batches (idempotency), windows, hourly roll-up, counters, alerts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)
COUNTERS = ("batches", "windows", "duplicate_batches", "dropped_windows")


def _dims() -> list[sa.Column[str]]:
    return [
        sa.Column("model", sa.String(128), nullable=False, server_default=""),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("variant", sa.String(128), nullable=False, server_default=""),
        sa.Column("profile", sa.String(128), nullable=False, server_default=""),
        sa.Column("rollout_id", sa.String(64), nullable=False, server_default=""),
    ]


def upgrade() -> None:
    op.create_table(
        "telemetry_batches",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "device_id",
            sa.String(128),
            sa.ForeignKey("devices.device_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("received_at", Tz, nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("dropped_windows", sa.Integer(), nullable=False),
        sa.Column("samples", sa.JSON(), nullable=True),
        sa.UniqueConstraint("device_id", "batch_id", name="uq_telemetry_batches_key"),
    )
    op.create_table(
        "telemetry_windows",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "batch_pk",
            sa.Integer(),
            sa.ForeignKey("telemetry_batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("device_id", sa.String(128), nullable=False),
        *_dims(),
        sa.Column("start_ts", sa.Float(), nullable=False),
        sa.Column("end_ts", sa.Float(), nullable=False),
        sa.Column("aggregate", sa.JSON(), nullable=False),
    )
    op.create_index("ix_telemetry_windows_start", "telemetry_windows", ["start_ts"])
    op.create_index("ix_telemetry_windows_batch", "telemetry_windows", ["batch_pk"])
    op.create_index(
        "ix_telemetry_windows_version", "telemetry_windows", ["version", "profile", "start_ts"]
    )
    op.create_table(
        "telemetry_hourly",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("hour", sa.Float(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        *_dims(),
        sa.Column("aggregate", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False, server_default="0"),
        sa.UniqueConstraint(
            "hour",
            "device_id",
            "model",
            "version",
            "variant",
            "rollout_id",
            name="uq_telemetry_hourly_key",
        ),
    )
    op.create_index("ix_telemetry_hourly_hour", "telemetry_hourly", ["hour"])
    counters = op.create_table(
        "telemetry_counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.bulk_insert(counters, [{"name": n, "value": 0} for n in COUNTERS])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False, server_default=""),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("profile", sa.String(128), nullable=False, server_default=""),
        sa.Column("statistic", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", Tz, nullable=False),
        sa.Column("acknowledged", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_alerts_created", "alerts", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_created", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("telemetry_counters")
    op.drop_index("ix_telemetry_hourly_hour", table_name="telemetry_hourly")
    op.drop_table("telemetry_hourly")
    for name in (
        "ix_telemetry_windows_version",
        "ix_telemetry_windows_batch",
        "ix_telemetry_windows_start",
    ):
        op.drop_index(name, table_name="telemetry_windows")
    op.drop_table("telemetry_windows")
    op.drop_table("telemetry_batches")
