"""Server settings: pydantic-settings with the ``SLMOPS_`` prefix, refusing unsafe values early.

Everything a process needs is here and in the database, nothing else: several API processes
started with the same settings behave as one server (statelessness). Listening on every
interface is refused unless ``allow_public`` is set, because the default deployment is a
single box behind a reverse proxy that terminates TLS; bearer tokens must not cross a network
in clear text by accident.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops.core.config import config_error_from_validation

PUBLIC_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


def listens_everywhere(host: str) -> bool:
    """Whether binding ``host`` means every interface, however it is spelled.

    ``0``, ``0.0``, ``0x0`` (inet_aton forms), ``0.0.0.0.`` (a trailing root dot), ``::0``,
    ``[::]`` and ``::ffff:0.0.0.0`` all bind the wildcard address; a set of spellings missed
    some of them.
    """
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.rstrip(".")
    if h in PUBLIC_HOSTS or h in ("*", "any"):
        return True
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        try:
            return socket.inet_aton(h) == b"\0\0\0\0"
        except OSError:
            return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_unspecified or (mapped is not None and mapped.is_unspecified)


DB_FILENAME = "slmops.db"


class ServerSettings(BaseSettings):
    """Where the data lives, which database to use, where to listen, and a few protocol knobs."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", extra="forbid")

    data_dir: Path = Field(description="folder holding the SQLite database (and later blobs)")
    db_url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://...; default SQLite in data_dir",
    )
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allow_public: bool = Field(False, description="allow listening on all interfaces")
    poll_seconds: float = Field(60.0, gt=0, description="how often agents should check in")
    sqlite_busy_timeout_ms: int = Field(5000, ge=0)
    rollout_tick_seconds: float = Field(
        5.0, gt=0, description="how often rollouts re-check soak times and timeouts"
    )
    checkin_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="idle check-ins answered from memory this long; 0: off. On PostgreSQL, "
        "while this process listens for changes (LISTEN/NOTIFY), entries live 60 s instead: "
        "every change drops them at once",
    )
    settle_lease_seconds: float = Field(
        60.0,
        ge=1,
        description="how long a blueprint's settle lease outlives a settler that stopped "
        "renewing it (died): then the ticker settles what the apply left",
    )
    drift_check_seconds: float = Field(
        600.0, gt=0, description="how often field telemetry is checked for drift"
    )
    max_body_bytes: int = Field(
        1 << 20, ge=64 << 10, description="request body limit of every route but blob uploads"
    )
    max_upload_bytes: int = Field(
        64 << 30, ge=1 << 20, description="body limit of a registry blob upload (operators)"
    )
    enrollment_token_max_seconds: int = Field(
        30 * 86400,
        gt=0,
        le=366 * 86400,
        description="longest lifetime an enrollment token may be created with (default 30 days)",
    )
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="private/loopback webhook targets allowed anyway: host, host:port or CIDR",
    )

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if listens_everywhere(self.host) and not self.allow_public:
            raise ValueError(
                f"host {self.host!r} listens on every interface; put a TLS proxy in front and "
                "pass --allow-public (SLMOPS_ALLOW_PUBLIC=1) if that is really meant"
            )
        if self.db_url is not None and "://" not in self.db_url:
            raise ValueError(f"db_url {self.db_url!r} is not a SQLAlchemy URL (scheme://...)")
        return self

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the explicit one, or SQLite in the data directory."""
        if self.db_url:
            url = self.db_url
            # "postgresql://" would pick psycopg2, which is not installed; psycopg 3 is.
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{(self.data_dir / DB_FILENAME).resolve()}"


def load_settings(**values: Any) -> ServerSettings:
    """Build settings from explicit values (CLI options) over SLMOPS_* variables.

    Validation problems become a ConfigError (exit code 2 on the CLI) naming the setting.
    Values given as None are dropped so the environment or the default applies.
    """
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        raise config_error_from_validation(exc, source="server settings") from None
