"""POST /device/v1/enroll: an enrollment token in, a per-device credential out (once).

The token must exist and not be expired; it is reusable, and every use is counted. The new
device gets the token's labels as operator labels (its scope) on top of what it reports.
Enrolling an existing ``device_id`` again rotates its credential (a reinstalled box), but only
with a token whose scope the device already has, so a token for one site cannot take over
devices of another.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.exc import IntegrityError

from slmops.protocol.device import PROTOCOL_VERSION, EnrollRequest, EnrollResponse
from slmops.server.api.deps import SessionDep
from slmops.server.db import (
    count_enrollment_use,
    find_device,
    find_enrollment_token,
    is_expired,
)
from slmops.server.db.models import Device, as_utc, utcnow
from slmops.server.desired import CHANGES
from slmops.server.errors import api_error
from slmops.server.security import TokenKind, hash_secret, looks_like, new_secret

router = APIRouter(tags=["device"])

_NEW_TOKEN_HINT = "ask an operator for a new one (slmops server enrollment-token create)"


def check_schema(schema: str) -> None:
    if schema != PROTOCOL_VERSION:
        raise api_error(
            400,
            "unsupported_schema",
            f"schema {schema!r} is not supported; this server speaks {PROTOCOL_VERSION!r}",
            where="schema",
            hint="upgrade the agent or the server so both speak the same protocol",
        )


@router.post("/enroll", status_code=status.HTTP_201_CREATED)
def enroll_device(body: EnrollRequest, session: SessionDep) -> EnrollResponse:
    check_schema(body.schema_)
    secret = body.enrollment_token
    token = (
        find_enrollment_token(session, secret=secret)
        if looks_like(secret, TokenKind.ENROLLMENT)
        else None
    )
    if token is None:
        raise api_error(
            401,
            "invalid_enrollment_token",
            "unknown enrollment token",
            where="enrollment_token",
            hint=_NEW_TOKEN_HINT,
        )
    if is_expired(token):
        raise api_error(
            401,
            "enrollment_token_expired",
            f"enrollment token {token.id} expired at {as_utc(token.expires_at).isoformat()}",
            where="enrollment_token",
            hint=_NEW_TOKEN_HINT,
        )
    credential = new_secret(TokenKind.DEVICE)
    inventory = body.inventory
    device = find_device(session, device_id=body.device_id)
    if device is None:
        device = Device(
            device_id=body.device_id,
            operator_labels=dict(token.labels),
            enrolled_at=utcnow(),
        )
        session.add(device)
    else:
        scope = device.operator_labels or {}
        if any(scope.get(k) != v for k, v in token.labels.items()):
            raise api_error(
                403,
                "scope_mismatch",
                f"device {body.device_id!r} is enrolled outside this token's labels",
                where="device_id",
                hint="re-enroll with a token whose labels the device has, or pick another id",
            )
        device.operator_labels = {**scope, **token.labels}
        CHANGES[0] += 1  # the old credential's cached check-ins end here (see checkin_cache)
    device.credential_hash = hash_secret(credential, TokenKind.DEVICE)
    device.labels = dict(inventory.labels)
    device.inventory = inventory.model_dump(mode="json")
    device.profile = inventory.profile
    device.last_seen = utcnow()
    count_enrollment_use(session, token_id=token.id)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise api_error(
            409,
            "conflict",
            f"device {body.device_id!r} was enrolled concurrently",
            where="device_id",
            hint="retry the enrollment",
        ) from None
    return EnrollResponse(device_id=body.device_id, credential=credential)
