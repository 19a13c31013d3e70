"""The agent's configuration: a YAML file and/or CLI options, validated before anything starts.

CLI options override the file, so one file can describe a fleet image and a per-box flag can
still change the port. Bad input (a malformed URL, plain http to a remote server, an unknown
key) is a ConfigError (exit code 2) at start, never a surprise in the loop. The device id
defaults to one derived from the hostname and is persisted in the data dir, so a renamed box
keeps the identity the control plane knows it by.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from slmops.core.atomic import write_text_atomic
from slmops.core.config import StrictModel, read_structured_file
from slmops.core.errors import ConfigError

DEVICE_ID_FILE = "device_id"
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_REGISTRY_KEY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?\Z")


class AgentConfig(StrictModel):
    server: str = Field(description="control plane base URL, e.g. https://cp.example:8080")
    data_dir: Path = Field(description="slots, staging, credential and status live here")
    enroll_token: str | None = Field(None, description="needed only for the first start")
    device_id: str | None = Field(None, description="default: from the hostname, persisted")
    labels: dict[str, str] = Field(default_factory=dict)
    model_ram_mb: int | None = Field(None, gt=0, description="default: half of the RAM")
    model_cores: int | None = Field(None, gt=0, description="default: all cores")
    threads: int | None = Field(None, gt=0, description="inference threads (default model_cores)")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8180, ge=0, le=65535)
    trusted_keys: list[Path] = Field(default_factory=list)
    poll_seconds: float | None = Field(None, gt=0, description="override the server's interval")
    backoff_cap_seconds: float = Field(300.0, gt=0, description="longest wait while offline")
    allow_http: bool = Field(False, description="plain http to a non-loopback server")
    profile: str | None = None
    registry_tokens: dict[str, Path] = Field(
        default_factory=dict,
        description="external registries (HOST or HOST:PORT) -> file holding a bearer token for "
        "pulls from it; other registries are pulled anonymously (never with the device "
        "credential)",
    )

    @field_validator("registry_tokens")
    @classmethod
    def _registry_tokens(cls, v: dict[str, Path]) -> dict[str, Path]:
        for key in v:
            if not _REGISTRY_KEY.match(key):
                raise ValueError(f"bad registry {key!r}: write HOST or HOST:PORT, no scheme")
        return {k.lower(): p for k, p in v.items()}

    def registry_token(self, netloc: str) -> str | None:
        """The token for the registry at ``netloc`` (``host[:port]``, the port-qualified key
        first), read from its file each time so a rotated token is used at the next pull."""
        host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
        path = self.registry_tokens.get(netloc.lower()) or self.registry_tokens.get(host.lower())
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the token file for registry {netloc}: {exc.strerror or exc}",
                where=f"registry_tokens.{netloc}",
                hint="fix the path in the agent config",
            ) from None
        if not token or any(c.isspace() for c in token):
            raise ConfigError(
                f"the token file for registry {netloc} is empty or holds whitespace",
                where=path,
                hint="write the token alone on one line",
            )
        return token

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"bad label key {key!r} (a-z 0-9 ._/-, up to 63 characters)")
        return v

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str | None) -> str | None:
        if v is not None and not _ID_OK.match(v):
            raise ValueError("device id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
        return v

    def check_server(self) -> str:
        """The normalised server URL; http only for loopback unless allow_http."""
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"not an http(s) URL: {self.server!r}",
                where="--server",
                hint="write e.g. https://control-plane.example:8080",
            )
        if parts.scheme == "http" and not (self.allow_http or _is_loopback(parts.hostname)):
            raise ConfigError(
                f"plain http to {parts.hostname} would send the credential in clear",
                where="--server",
                hint="use https, or --allow-http on a trusted network",
            )
        return self.server.rstrip("/")

    def resolved_device_id(self) -> str:
        """The configured id, else the persisted one, else one made from the hostname (saved)."""
        path = self.data_dir / DEVICE_ID_FILE
        if self.device_id:
            if not path.exists():  # dropping the option later must not change the identity
                write_text_atomic(path, self.device_id + "\n")
            return self.device_id
        try:
            saved = path.read_text().strip()
            if _ID_OK.match(saved):
                return saved
        except OSError:
            pass
        derived = hostname_device_id()
        write_text_atomic(path, derived + "\n")
        return derived


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname_device_id() -> str:
    """A valid device id from the hostname (invalid characters become '-')."""
    raw = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname() or "device").strip("-._")
    return (raw or "device")[:128]


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` into a dict (the same syntax as the server's CLI)."""
    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not _LABEL_KEY.match(key.strip()):
            raise ConfigError(
                f"bad label {part!r}", where="--labels", hint="write k=v,k2=v2 (keys: a-z 0-9 ._/-)"
            )
        labels[key.strip()] = value.strip()
    return labels


def load_config(file: Path | None, **overrides: Any) -> AgentConfig:
    """Merge the YAML/JSON file (if any) with CLI overrides (None means "not given")."""
    data: dict[str, Any] = {}
    if file is not None:
        loaded = read_structured_file(file)
        if not isinstance(loaded, dict):
            raise ConfigError("the agent config must be a mapping", where=file)
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key, flag in (("server", "--server"), ("data_dir", "--data")):
        if key not in data:
            raise ConfigError(
                f"missing {key}",
                where=str(file or flag),
                hint=f"pass {flag} or set {key} in the config file",
            )
    cfg = AgentConfig.from_data(data, source=str(file or "options"))
    cfg.check_server()
    cfg.data_dir = Path(os.path.abspath(cfg.data_dir))
    return cfg
