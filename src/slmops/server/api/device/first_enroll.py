"""A device id's first enrollment in as few statements and round trips as possible.

When a fleet comes up (100,000 simulated devices in issue 12) nearly every call to
``POST /device/v1/enroll`` is a new id with a valid token. Through the ORM that cost ~14 ms of
CPU (unit of work, an ORM bulk update evaluating its WHERE against the session, autoflush)
and 7 round trips on PostgreSQL; the SQL itself is four statements. Here it is Core only:

- PostgreSQL: one statement. A CTE reads the token (known, not revoked, not expired at
  ``now``), inserts the device with the token's labels as operator labels and the audit row
  naming the token, and the statement's own ``UPDATE`` adds one to the token's ``uses``. No
  usable token: nothing is inserted and no row comes back. A duplicate id: the unique index
  fails the whole statement. It runs in autocommit (one statement is atomic by itself), so an
  enrollment is one round trip (after the pool's ping) instead of BEGIN, statement, COMMIT,
  and the counter's row lock is held only while the statement runs.
- SQLite (one writer at a time anyway, no round trips): read the token, insert the device,
  insert the audit row, count the use, in that order.

Either way the result is the same rows the general path writes, in one transaction. When
this returns None nothing was written and the caller's general path answers: it reads the
device and the token again and says exactly what is wrong (unknown, revoked or expired token,
an id that exists: pending request or scope refusal). So no security decision lives only
here: this path can only enroll an id that does not exist, with a token that is usable now.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, bindparam, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops.protocol.device import EnrollRequest
from slmops.server import identity
from slmops.server.audit import Actor, AuditEntry
from slmops.server.db import count_enrollment_use, find_enrollment_token, is_expired
from slmops.server.db.base import Tz
from slmops.server.db.models import Device, utcnow
from slmops.server.security import TokenKind, hash_secret, looks_like, new_secret

ACTION = "device.enroll"

_PG_ENROLL = text(
    """
WITH tok AS (
    SELECT id, labels FROM enrollment_tokens
    WHERE token_hash = :token_hash AND revoked_at IS NULL AND expires_at > :now
), new_device AS (
    INSERT INTO devices (device_id, credential_hash, labels, operator_labels, inventory,
                         profile, enrolled_at, last_seen, status)
    SELECT :device_id, :credential_hash, :labels, tok.labels, :inventory,
           :profile, :now, :now, :status
    FROM tok
), new_audit AS (
    INSERT INTO audit_log (at, actor_kind, actor, action, target, detail)
    SELECT :now, :actor_kind, tok.id, :action, :target, :detail FROM tok
)
UPDATE enrollment_tokens SET uses = enrollment_tokens.uses + 1
FROM tok WHERE enrollment_tokens.id = tok.id
RETURNING tok.id
"""
).bindparams(
    # explicit types: in an INSERT ... SELECT list PostgreSQL cannot infer them from the column
    bindparam("now", type_=Tz),
    bindparam("labels", type_=JSON),
    bindparam("inventory", type_=JSON),
    bindparam("detail", type_=JSON),
)


def enroll_new(session: Session, body: EnrollRequest) -> str | None:
    """Enroll ``body.device_id`` and return its new credential (committed by the caller), or
    None with nothing written when the id exists or the token is not usable now."""
    secret = body.enrollment_token
    if not secret or not looks_like(secret, TokenKind.ENROLLMENT):
        return None
    credential = new_secret(TokenKind.DEVICE)
    now = utcnow()
    try:
        if session.get_bind().dialect.name == "postgresql":
            done = _postgres(session, body, secret, credential, now)
        else:
            done = _sqlite(session, body, secret, credential, now)
    except IntegrityError:  # the id exists (or was enrolled concurrently)
        done = False
    if not done:
        session.rollback()
        return None
    return credential


def _postgres(
    session: Session, body: EnrollRequest, secret: str, credential: str, now: datetime
) -> bool:
    inventory = body.inventory
    # One statement is atomic on its own: run it outside BEGIN/COMMIT (two round trips fewer;
    # the caller's commit has nothing left to do) and the token row is locked only while it runs.
    # Only as the session's first statement: inside a transaction it simply joins it.
    autocommit = {} if session.in_transaction() else {"isolation_level": "AUTOCOMMIT"}
    row = (
        session.connection(execution_options=autocommit)
        .execute(
            _PG_ENROLL,
            {
                "token_hash": hash_secret(secret, TokenKind.ENROLLMENT),
                "now": now,
                "device_id": body.device_id,
                "credential_hash": hash_secret(credential, TokenKind.DEVICE),
                "labels": dict(inventory.labels),
                "inventory": inventory.model_dump(mode="json"),
                "profile": inventory.profile,
                "status": identity.ACTIVE,
                "actor_kind": Actor.enrollment("").kind,
                "action": ACTION,
                "target": identity.target(body.device_id),
                "detail": {},
            },
        )
        .first()
    )
    return row is not None


def _sqlite(
    session: Session, body: EnrollRequest, secret: str, credential: str, now: datetime
) -> bool:
    token = find_enrollment_token(session, secret=secret)
    if token is None or token.revoked_at is not None or is_expired(token, now=now):
        return False
    inventory = body.inventory
    conn = session.connection()
    conn.execute(
        insert(Device).values(
            device_id=body.device_id,
            credential_hash=hash_secret(credential, TokenKind.DEVICE),
            labels=dict(inventory.labels),
            operator_labels=dict(token.labels),
            inventory=inventory.model_dump(mode="json"),
            profile=inventory.profile,
            enrolled_at=now,
            last_seen=now,
            status=identity.ACTIVE,
        )
    )
    actor = Actor.enrollment(token.id)
    conn.execute(
        insert(AuditEntry).values(
            at=now,
            actor_kind=actor.kind,
            actor=actor.id,
            role=actor.role,
            action=ACTION,
            target=identity.target(body.device_id),
            detail={},
        )
    )
    count_enrollment_use(session, token_id=token.id)
    return True
