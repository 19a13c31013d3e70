"""telemetry adapter: the LoRA adapter a window was served with, a dimension of windows and hours

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

A device serving a per-site LoRA adapter on top of its model reports it in each window
(``name:version``); ``""`` means the model alone, as every existing row was. The hourly
roll-up's unique key gains the column, so two adapters over the same model and hour stay two
rows (their figures are not merged).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_OLD_KEY = ["hour", "device_id", "model", "version", "variant", "rollout_id"]


def _column() -> sa.Column[str]:
    return sa.Column("adapter", sa.String(200), nullable=False, server_default="")


def upgrade() -> None:
    with op.batch_alter_table("telemetry_windows") as batch:
        batch.add_column(_column())
    with op.batch_alter_table("telemetry_hourly") as batch:
        batch.add_column(_column())
        batch.drop_constraint("uq_telemetry_hourly_key", type_="unique")
        batch.create_unique_constraint("uq_telemetry_hourly_key", [*_OLD_KEY, "adapter"])


def downgrade() -> None:
    """Rows that differ only by adapter would collide on the old key: they are merged away
    by deleting all but the lowest id (the figures of the others are lost; downgrade is for
    an empty or disposable database)."""
    op.execute(
        "DELETE FROM telemetry_hourly WHERE id NOT IN (SELECT MIN(id) FROM telemetry_hourly "
        "GROUP BY hour, device_id, model, version, variant, rollout_id)"
    )
    with op.batch_alter_table("telemetry_hourly") as batch:
        batch.drop_constraint("uq_telemetry_hourly_key", type_="unique")
        batch.create_unique_constraint("uq_telemetry_hourly_key", _OLD_KEY)
        batch.drop_column("adapter")
    with op.batch_alter_table("telemetry_windows") as batch:
        batch.drop_column("adapter")
