"""Where the agent pulls a desired model's bundle from: the control plane, or an external registry.

The control plane's registry takes the device credential as a bearer token. When the desired
state names an external registry (the blueprint's ``registry:``, protocol/registry_url.py), the
bundle is pulled from there instead, so a large rollout does not stream every byte through the
control plane, and the device credential is never sent to it: the pull is anonymous, or uses
the token the agent config names for that host (``registry_tokens``, read from a file).
(The transport also drops the Authorization header when a blob GET is redirected to another
host, e.g. object storage.)

Nothing about trust changes: the external registry is untrusted storage, and what is fetched
from it is checked against the digests the control plane sent and the trusted signing keys,
exactly as from the control plane. Plain http is used only for a loopback host or when the
agent's ``allow_http`` is set. Failures (unreachable, 401/403, a missing manifest or blob) are
errors that name the external registry and what to do; the installer reports them as a failed
action at the downloading stage and the device keeps its model.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from slmops.agent.config import AgentConfig
from slmops.agent.fetch import RegistrySource
from slmops.agent.oci_client import RegistryError
from slmops.agent.transport import Response, TransportError
from slmops.core.errors import ConfigError
from slmops.protocol.device import DesiredModel
from slmops.protocol.registry_url import is_loopback

_HINTS = {
    401: "the registry wants credentials: give this device a token for it with "
    "`registry_tokens: {HOST: /path/to/token-file}` in the agent config",
    403: "the registry refused this device's token: check its pull permission",
    404: "the external registry lacks this content: push the bundle there too "
    "(`slmops push BUNDLE oci://HOST/REPO:VERSION`), signatures included",
}


class ExternalRegistrySource(RegistrySource):
    """A RegistrySource on a registry other than the control plane's: errors say which one."""

    def __init__(self, base: str, repository: str, *, token: str | None) -> None:
        scheme = urlsplit(base).scheme
        super().__init__(base, repository, allow_http=scheme == "http", token=token)
        if scheme == "https":  # OciClient picks http for loopback hosts; honour https as written
            self.base = f"https://{self.netloc}"
            self.repo = f"{self.base}/v2/{repository}"

    def _get(self, path: str, ok: tuple[int, ...], headers: Mapping[str, str]) -> Response:
        try:
            return super()._get(path, ok, headers)
        except RegistryError as exc:
            status = next((s for s in _HINTS if f"HTTP {s} " in exc.message), None)
            raise RegistryError(
                f"external registry {self.netloc}: {exc.message}",
                where=exc.where,
                hint=_HINTS.get(status) if status else None,
            ) from None
        except TransportError as exc:
            raise TransportError(
                f"external registry {self.netloc} unreachable: {exc.message}",
                where=exc.where,
                hint="check the blueprint's `registry:` URL and this device's route to it",
            ) from None


def pull_source(
    want: DesiredModel, cfg: AgentConfig, server_url: str, credential: str | None
) -> RegistrySource:
    """The source to install ``want`` from (see the module docstring); ConfigError when the
    external registry may not be used (plain http to a remote host, an unreadable token)."""
    if want.registry is None:
        return RegistrySource(
            server_url, want.repository, allow_http=cfg.allow_http, token=credential
        )
    parts = urlsplit(want.registry)
    host = parts.hostname or ""
    if parts.scheme == "http" and not (cfg.allow_http or is_loopback(host)):
        raise ConfigError(
            f"plain http to the external registry {parts.netloc} is not allowed",
            where="desired model registry",
            hint="use an https registry in the blueprint, or set allow_http on devices of a "
            "trusted network",
        )
    prefix = parts.path.strip("/")
    repository = f"{prefix}/{want.repository}" if prefix else want.repository
    token = cfg.registry_token(parts.netloc)
    return ExternalRegistrySource(f"{parts.scheme}://{parts.netloc}", repository, token=token)
