"""Webhook delivery for ``notify`` actions: target policy, a worker of its own, a time budget.

Policy: a webhook goes only to public addresses. A target whose host is, or resolves to, a
loopback, private, link-local, multicast, reserved or unspecified address is refused (the row
says ``failed``) unless the server settings allow it (``webhook_allow``: ``host``,
``host:port`` or a CIDR such as ``10.0.0.0/8``). Without this, whoever may write feedback rules
could make the control plane POST into its own network and read the answers (a port scanner).

Delivery: ``enqueue`` returns at once; one daemon thread per process sends webhooks in order,
each within ``timeout_seconds`` in all (connect, send and answer: a server that trickles its
answer is cut off at the budget), and writes the outcome on the action's row with a session
of its own. The rollout ticker never waits on a remote server.

Redaction: the row's ``detail`` keeps the status code or error for operators; viewers see
``webhook sent`` or ``webhook failed`` only (``public_detail``).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from slmops.server.feedback.tables import AlertAction

log = logging.getLogger("slmops.server.feedback")
MAX_QUEUED = 1000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Allow:
    """The parsed ``webhook_allow`` setting."""

    hosts: frozenset[str]  # "host" or "host:port", lower case
    networks: tuple[Network, ...]

    @staticmethod
    def parse(items: list[str]) -> Allow:
        hosts: set[str] = set()
        nets: list[Network] = []
        for item in items:
            text = item.strip().lower()
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                hosts.add(text)
        return Allow(frozenset(hosts), tuple(nets))


_ALLOW = [Allow(frozenset(), ())]


def configure(allow: list[str]) -> None:
    """Set this process's allow-list (from ``ServerSettings.webhook_allow``)."""
    _ALLOW[0] = Allow.parse(allow)


def _internal(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    return bool(
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def refusal(url: str, allow: Allow | None = None) -> str | None:
    """Why ``url`` may not be called (None: it may). Resolves the host name."""
    allow = allow or _ALLOW[0]
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return "not an http(s) URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "invalid port"
    if host in allow.hosts or f"{host}:{port}" in allow.hosts:
        return None
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return f"host {host!r} does not resolve"
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if any(addr in net for net in allow.networks):
            continue
        if _internal(addr):
            return (
                f"{host} is an internal address ({addr}); add it to the server's "
                "webhook_allow setting (SLMOPS_WEBHOOK_ALLOW) if that is meant"
            )
    return None


def public_detail(action: str, ok: bool | None, detail: str) -> str:
    """What a viewer sees of an action's detail: a webhook's outcome, not the remote answer."""
    if action != "notify":
        return detail
    if detail.endswith("sending"):
        return "webhook sending"
    return "webhook sent" if ok else "webhook failed"


@dataclass(frozen=True)
class Job:
    engine: Engine
    row_id: int
    url: str
    timeout: float
    body: dict[str, Any]


_QUEUE: queue.Queue[Job] = queue.Queue(MAX_QUEUED)
_STARTED = threading.Lock()
_WORKER: list[threading.Thread] = []


def enqueue(job: Job) -> bool:
    """Hand a webhook to this process's sender thread; False when the queue is full."""
    with _STARTED:
        if not _WORKER or not _WORKER[0].is_alive():
            thread = threading.Thread(target=_run, name="slmops-webhooks", daemon=True)
            thread.start()
            _WORKER[:] = [thread]
    try:
        _QUEUE.put_nowait(job)
    except queue.Full:
        return False
    return True


def wait_idle(timeout: float = 30.0) -> bool:
    """Wait until every queued webhook was sent and recorded (for tests and shutdown)."""
    done = threading.Event()

    def joined() -> None:
        _QUEUE.join()
        done.set()

    threading.Thread(target=joined, daemon=True).start()
    return done.wait(timeout)


def send(url: str, timeout: float, body: dict[str, Any]) -> tuple[bool, str]:
    """POST ``body`` within ``timeout`` seconds in all; (ok, detail for operators)."""
    outcome: list[tuple[bool, str]] = []
    allow = _ALLOW[0]

    def post() -> None:  # name resolution included: the budget covers a slow DNS too
        why = refusal(url, allow)
        if why is not None:
            outcome.append((False, f"webhook {url} refused: {why}"))
            return
        try:
            r = httpx.post(url, json=body, timeout=timeout, follow_redirects=False)
            outcome.append((r.is_success, f"webhook {url} answered {r.status_code}"))
        except httpx.HTTPError as exc:
            outcome.append((False, f"webhook {url} unreachable: {type(exc).__name__}"))

    sender = threading.Thread(target=post, name="slmops-webhook-post", daemon=True)
    sender.start()
    sender.join(timeout)  # the overall budget: httpx's timeouts are per operation
    if not outcome:
        return False, f"webhook {url} unreachable: no answer within {timeout:g} s"
    return outcome[0]


def _run() -> None:
    while True:
        job = _QUEUE.get()
        try:
            ok, detail = send(job.url, job.timeout, job.body)
            with Session(job.engine) as session:
                row = session.get(AlertAction, job.row_id)
                if row is not None:
                    row.ok, row.detail = ok, detail[:2000]
                    session.commit()
            log.info("alert action %s: %s", job.row_id, detail)
        except Exception:
            log.exception("webhook of alert action %s failed", job.row_id)
        finally:
            _QUEUE.task_done()
