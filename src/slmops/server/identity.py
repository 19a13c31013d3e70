"""Device identity lifecycle: re-enrollment requests, approve/reject, revoke, rotate, delete.

Like Mender's device lifecycle (preauthorized by an enrollment token, then accepted, rejected
or decommissioned) and hawkBit's per-target security tokens. The invariants:

- a device's credential changes only when the device proves itself with its current one, or
  an operator approves a request (``approve``); a bare enrollment token never replaces it;
- revoking or rotating by an operator replaces the stored digest with the digest of a secret
  nobody knows, so the old credential stops working at once (no status check on the hot
  check-in path is needed) and the device comes back only through an approved request;
- deleting (decommissioning) removes the row and takes the device out of every unfinished
  rollout, so a box that is gone does not hold a wave open until it times out; revoking takes
  it out the same way (it cannot check in, so it would never report), and new rollouts do not
  match a revoked device; once an approved request brings it back, its next check-in joins its
  blueprint's active rollout like a late enrollment;
- each change is audited in the same transaction (``server/audit.py``).

Each change drops the device's cached idle check-ins when it commits, in this process and (on
PostgreSQL, by NOTIFY) in every other API process (``server/invalidation.py``).
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from slmops.server.audit import Actor, record
from slmops.server.context import Context
from slmops.server.db.models import Device, utcnow
from slmops.server.identity_tables import EnrollmentRequest, RequestStatus
from slmops.server.invalidation import changed
from slmops.server.rollouts.machine import RolloutStatus, Tick
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import RolloutConflict, forget_device
from slmops.server.rollouts.tables import Rollout
from slmops.server.security import TokenKind, hash_secret, new_id, new_secret

ACTIVE = "active"
REVOKED = "revoked"
MAX_ATTEMPTS = 20


def target(device_id: str) -> str:
    return f"device/{device_id}"


def unusable_hash() -> str:
    """The digest of a fresh secret that is thrown away: no one can present it."""
    return hash_secret(new_secret(TokenKind.DEVICE), TokenKind.DEVICE)


def cut_credential(device: Device) -> None:
    """The device's current credential stops working (cached check-ins too)."""
    device.credential_hash = unusable_hash()
    changed(object_session(device), device.device_id)


def pending_request(session: Session, device_id: str) -> EnrollmentRequest | None:
    return session.scalar(
        select(EnrollmentRequest)
        .where(
            EnrollmentRequest.device_id == device_id,
            EnrollmentRequest.status == RequestStatus.PENDING.value,
        )
        .order_by(EnrollmentRequest.created_at.desc())
        .limit(1)
    )


def request_by_credential(
    session: Session, device_id: str, secret: str
) -> EnrollmentRequest | None:
    return session.scalar(
        select(EnrollmentRequest).where(
            EnrollmentRequest.device_id == device_id,
            EnrollmentRequest.credential_hash == hash_secret(secret, TokenKind.DEVICE),
        )
    )


def open_request(
    session: Session,
    device: Device,
    *,
    token_id: str,
    inventory: dict[str, object],
    reason: str,
) -> tuple[EnrollmentRequest, str]:
    """A new pending request (an older pending one for the device is superseded); returns it
    and the pending credential for the requester. The device itself is left as it is."""
    session.execute(
        update(EnrollmentRequest)
        .where(
            EnrollmentRequest.device_id == device.device_id,
            EnrollmentRequest.status == RequestStatus.PENDING.value,
        )
        .values(status=RequestStatus.SUPERSEDED.value, decided_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    secret = new_secret(TokenKind.DEVICE)
    req = EnrollmentRequest(
        id=new_id("req"),
        device_id=device.device_id,
        credential_hash=hash_secret(secret, TokenKind.DEVICE),
        token_id=token_id,
        reason=reason,
        inventory=dict(inventory),
        status=RequestStatus.PENDING.value,
        created_at=utcnow(),
    )
    session.add(req)
    record(
        session,
        Actor.enrollment(token_id),
        "device.enroll-request",
        target(device.device_id),
        request_id=req.id,
        reason=reason,
    )
    return req, secret


def decide(
    session: Session, device: Device, req: EnrollmentRequest, actor: Actor, *, approve: bool
) -> None:
    """Approve (the request's credential becomes the device's) or reject a pending request."""
    req.status = (RequestStatus.APPROVED if approve else RequestStatus.REJECTED).value
    req.decided_at = utcnow()
    req.decided_by = f"{actor.kind}:{actor.id}"
    if approve:
        device.credential_hash = req.credential_hash
        device.status = ACTIVE
        changed(session, device.device_id)
    action = "device.approve" if approve else "device.reject"
    record(session, actor, action, target(device.device_id), request_id=req.id)


def revoke(
    session: Session, device: Device, actor: Actor, ctx: Context, *, reason: str | None
) -> list[str]:
    """The credential stops working and the device leaves every unfinished rollout (its
    record and counts, so no wave waits for reports it can no longer send). The revocation
    and its audit entry commit first, so it cannot check in and rejoin while it is taken out.
    Commits; returns the rollouts it left."""
    cut_credential(device)
    device.status = REVOKED
    record(session, actor, "device.revoke", target(device.device_id), reason=reason)
    device_id = device.device_id
    session.commit()
    return forget_in_rollouts(session, device_id, ctx)


def rotate_by_operator(session: Session, device: Device, actor: Actor) -> None:
    """The credential stops working; the device re-enrolls and an operator approves it."""
    cut_credential(device)
    record(session, actor, "device.rotate", target(device.device_id), by="operator")


def rotate_by_device(session: Session, device: Device) -> str:
    """A new credential for a device that presented its current one; the old one dies."""
    secret = new_secret(TokenKind.DEVICE)
    device.credential_hash = hash_secret(secret, TokenKind.DEVICE)
    # re-enrolling may bring a new inventory: the next check-in recomputes the desired state
    device.desired_etag = None
    changed(session, device.device_id)
    record(session, Actor.device(device.device_id), "device.rotate", target(device.device_id))
    return secret


def forget_in_rollouts(session: Session, device_id: str, ctx: Context) -> list[str]:
    """Take the device out of every unfinished rollout (its record, and so its wave's
    accounting), then tick each so a wave that waited only for it is judged now. Commits."""
    terminal = [s.value for s in RolloutStatus if s.is_terminal]
    ids = list(session.scalars(select(Rollout.id).where(Rollout.status.not_in(terminal))))
    touched: list[str] = []
    for rollout_id in ids:
        for _ in range(MAX_ATTEMPTS):
            row = session.get(Rollout, rollout_id, populate_existing=True)
            if row is None:
                break
            try:  # its row and its counts in the rollout's tally (server/rollouts/store.py)
                if not forget_device(session, row, device_id):
                    break
            except RolloutConflict:
                session.rollback()  # another process stepped it first: read again
                continue
            session.commit()
            touched.append(rollout_id)
            run_event(session, rollout_id, Tick(), ctx)
            break
    return touched


def delete(session: Session, device: Device, actor: Actor, ctx: Context) -> list[str]:
    """Decommission: out of every rollout, then the row (its actions and telemetry batches go
    with it by ON DELETE CASCADE) and the credential. Commits; returns the rollouts touched."""
    device_id = device.device_id
    touched = forget_in_rollouts(session, device_id, ctx)
    row = session.scalar(select(Device).where(Device.device_id == device_id))
    if row is not None:
        session.delete(row)
    changed(session, device_id)
    record(session, actor, "device.delete", target(device_id), rollouts=touched or None)
    session.commit()
    return touched
