"""The URL of an external OCI registry that devices pull bundle bytes from (blueprint `registry:`).

A blueprint may name a registry other than the control plane's own, e.g.
``https://registry.example.com`` or ``https://harbor.example.com/slmops`` (a path is a
repository prefix: the bundle ``acme/bot`` is then pulled from ``slmops/acme/bot``), so that a
rollout to 100k devices does not stream every byte through the control plane. The same check
runs where the blueprint is read (CLI and server) and where the agent reads its desired state,
so a URL one side accepts the other accepts too.

What is refused, and why:

- anything but ``http``/``https`` (OCI registries speak HTTP);
- credentials in the URL (``https://user:pass@...``): the URL is copied into the desired state
  of every device and shown to operators; a device's token for another registry belongs in the
  agent's own config (``registry_tokens``);
- a query or a fragment, which OCI has no use for, and path parts that are not OCI repository
  components.

Plain ``http`` is accepted here for any host, because whether a device may use it is the
device's decision: the agent pulls over http only from a loopback host or when its
``allow_http`` is set, and reports a failed download otherwise (agent/pull_source.py).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*\Z")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
LOOPBACK_NAMES = frozenset({"localhost"})
EXAMPLE = "write e.g. https://registry.example.com or https://harbor.example.com/project"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (no brackets) names this machine: ``localhost`` or a loopback address."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_registry_url(value: str) -> str:
    """``value`` normalised (no trailing slash, scheme lower-case), or ValueError saying why."""
    text = value.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL; {EXAMPLE}")
    if "@" in parts.netloc:
        raise ValueError(
            "the registry URL must not carry credentials (every device and operator would see "
            "them); give devices a token with `registry_tokens` in the agent config"
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"the registry URL takes no query or fragment; {EXAMPLE}")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}: expected 1-65535") from None
    if port == 0:
        raise ValueError(f"bad port in {value!r}: expected 1-65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
    elif not _HOSTNAME.match(host):
        raise ValueError(f"invalid registry host {host!r}; {EXAMPLE}")
    prefix = parts.path.strip("/")
    for component in prefix.split("/") if prefix else []:
        if not _COMPONENT.match(component):
            raise ValueError(
                f"{component!r} in the path is not an OCI repository component "
                "(lowercase letters, digits, '.', '_', '-')"
            )
    netloc = parts.netloc.lower()
    return f"{scheme}://{netloc}" + (f"/{prefix}" if prefix else "")


RegistryUrl = Annotated[str, AfterValidator(check_registry_url)]
"""A validated, normalised external registry URL (``check_registry_url``)."""
