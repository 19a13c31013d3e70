"""Registry tables: which tag of which repository names which manifest, and channels.

Content lives on disk (``store.py``); the database holds only names, because names are what
operators query and change (``/api/v1/models``) and they must be consistent across API
processes. A repository exists while it has at least one tag.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from slmops.server.db.base import Base, Tz, utcnow


class RegistryTag(Base):
    """``repository:tag`` → manifest digest (bundle versions and signature fallback tags)."""

    __tablename__ = "registry_tags"
    __table_args__ = (UniqueConstraint("repository", "tag", name="uq_registry_tags_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255), index=True)
    tag: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(71))
    media_type: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)


class RegistryChannel(Base):
    """A named channel (``stable``, ``beta``) of a repository pointing at one version tag."""

    __tablename__ = "registry_channels"
    __table_args__ = (UniqueConstraint("repository", "channel", name="uq_registry_channels_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255), index=True)
    channel: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(Tz, default=utcnow)
