"""Channel moves: point a model's channel (``stable``, ``beta``) at a pushed version.

A move is a use case, not a table write: blueprints following the channel roll the new
version out now (``reconcile.reconcile_following``), not at the next check-in, and every device
is settled under the result. The route (``registry/model_routes.py``) checks the channel name
and that the version exists; this module does the rest.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.server.context import Context
from slmops.server.db.models import utcnow
from slmops.server.reconcile import reconcile_following, settle
from slmops.server.registry.tables import RegistryChannel


def move_channel(
    session: Session, model: str, channel: str, version: str, *, actor: str, ctx: Context
) -> RegistryChannel:
    """Point ``model``'s ``channel`` at ``version`` (created if new) and roll it out to the
    blueprints following it. Commits; returns the channel row."""
    ch = session.scalar(
        select(RegistryChannel).where(
            RegistryChannel.repository == model, RegistryChannel.channel == channel
        )
    ) or RegistryChannel(repository=model, channel=channel)
    ch.version, ch.updated_at = version, utcnow()
    session.add(ch)
    session.commit()
    reconcile_following(session, model, channel, actor=actor, ctx=ctx)
    settle(session, ctx)
    return ch
