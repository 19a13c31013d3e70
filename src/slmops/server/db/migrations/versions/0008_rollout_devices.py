"""rollout devices: one row per (rollout, device); the rollout row keeps a small summary

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Before this, ``rollouts.state_json`` held every matched device, so each device report rewrote a
document that grows with the fleet. The devices move to ``rollout_devices`` rows and the
document keeps a tally (counts per wave and status) instead. Existing documents are split here;
the server also reads a document that still holds its devices (and splits it on the next write).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollout_devices",
        sa.Column(
            "rollout_id",
            sa.String(64),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("hardware_class", sa.String(128), nullable=False),
        sa.Column("from_version", sa.String(64), nullable=True),
        sa.Column("skipped", sa.Boolean(), nullable=False),
        sa.Column("unplaceable", sa.Text(), nullable=True),
        sa.Column("assigned_at", sa.Float(), nullable=True),
        sa.Column("reverted_at", sa.Float(), nullable=True),
        sa.Column("state", sa.String(32), nullable=True),
        sa.Column("failed_stage", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=True),
    )
    op.create_index(
        "ix_rollout_devices_wave_status", "rollout_devices", ["rollout_id", "wave", "status"]
    )
    _split_documents()


def _split_documents() -> None:
    """Move each stored document's devices into rows; the document keeps their tally."""
    from slmops.server.rollouts.machine import (
        RolloutState,  # the document's own rules compute the tally
    )
    from slmops.server.rollouts.store import row_values

    bind = op.get_bind()
    table = sa.table("rollout_devices", *(sa.column(c) for c in _COLUMNS), sa.column("rollout_id"))
    rollouts = sa.table("rollouts", sa.column("id"), sa.column("state_json"))
    for rollout_id, text in bind.execute(sa.select(rollouts.c.id, rollouts.c.state_json)).all():
        raw: dict[str, Any] = json.loads(text)
        if not raw.get("devices"):
            continue
        state = RolloutState.model_validate_json(text)
        rows = [row_values(rollout_id, i, d) for i, d in sorted(state.devices.items())]
        for start in range(0, len(rows), 1000):
            bind.execute(sa.insert(table), rows[start : start + 1000])
        summary = state.model_copy(update={"devices": {}}).to_json()
        bind.execute(
            sa.update(rollouts).where(rollouts.c.id == rollout_id).values(state_json=summary)
        )


_COLUMNS = (
    "device_id",
    "status",
    "wave",
    "hardware_class",
    "from_version",
    "skipped",
    "unplaceable",
    "assigned_at",
    "reverted_at",
    "state",
    "failed_stage",
    "detail",
    "reported_at",
)


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_wave_status", table_name="rollout_devices")
    op.drop_table("rollout_devices")
