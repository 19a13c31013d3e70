"""POST /device/v1/enroll (a credential out) and POST /device/v1/credential (rotate it).

A new ``device_id`` with a valid enrollment token (known, not expired, not revoked) is
enrolled at once and gets the token's labels as operator labels (its scope). An existing
``device_id`` is a different matter, because a reusable token is held by many people: a
re-enrollment that presents the device's *current* credential (``credential``) is the device
itself and gets a fresh credential; one that does not becomes a pending request (202) that an
operator approves or rejects (``server/identity.py``). Until then the existing device keeps
working with its credential and the requester gets nothing but a pending credential that
starts working on approval; presenting it again polls the request. A token whose labels the
device does not have is refused outright (403), so a token for one site cannot even ask.

A first enrollment (no ``credential``) of a new id is the hot path when a fleet comes up and
goes through ``first_enroll.py`` (Core SQL, one statement on PostgreSQL); anything it cannot
do (an id that exists, a token that is not usable) comes back here with nothing written.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops.protocol.device import PROTOCOL_VERSION, EnrollRequest, EnrollResponse
from slmops.server import identity
from slmops.server.api.deps import DeviceDep, SessionDep
from slmops.server.api.device import first_enroll
from slmops.server.audit import Actor, record
from slmops.server.db import (
    TokenView,
    count_enrollment_use,
    find_device,
    find_enrollment_token,
    is_expired,
)
from slmops.server.db.models import Device, as_utc, utcnow
from slmops.server.errors import api_error
from slmops.server.identity_tables import RequestStatus
from slmops.server.openapi import errors
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


def usable_token(session: Session, secret: str | None) -> TokenView:
    """The enrollment token for ``secret`` if it may enroll now (401 otherwise)."""
    token = (
        find_enrollment_token(session, secret=secret)
        if secret and looks_like(secret, TokenKind.ENROLLMENT)
        else None
    )
    if token is None:
        message = "unknown enrollment token" if secret else "no enrollment token given"
        raise api_error(
            401, "invalid_enrollment_token", message, where="enrollment_token", hint=_NEW_TOKEN_HINT
        )
    if token.revoked_at is not None:
        raise api_error(
            401,
            "enrollment_token_revoked",
            f"enrollment token {token.id} was revoked at {as_utc(token.revoked_at).isoformat()}",
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
    return token


def _proves(device: Device | None, secret: str | None) -> bool:
    """The caller presented this device's current credential (and the device is not revoked)."""
    return (
        device is not None
        and device.status == identity.ACTIVE
        and secret is not None
        and looks_like(secret, TokenKind.DEVICE)
        and device.credential_hash == hash_secret(secret, TokenKind.DEVICE)
    )


def _commit(session: Session, device_id: str) -> None:
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise api_error(
            409,
            "conflict",
            f"device {device_id!r} was enrolled concurrently",
            where="device_id",
            hint="retry the enrollment",
        ) from None


@router.post(
    "/enroll",
    status_code=status.HTTP_201_CREATED,
    responses={
        202: {
            "model": EnrollResponse,
            "description": "the device id exists: the request waits for an operator's approval",
        },
        **errors(400, 401, 403, 409),
    },
)
def enroll_device(body: EnrollRequest, session: SessionDep, response: Response) -> EnrollResponse:
    check_schema(body.schema_)
    if body.credential is None:  # a first enrollment, nearly always a new id: the fast path
        credential = first_enroll.enroll_new(session, body)
        if credential is not None:
            _commit(session, body.device_id)
            return EnrollResponse(device_id=body.device_id, credential=credential)
    inventory = body.inventory
    device = find_device(session, device_id=body.device_id)
    if device is not None and _proves(device, body.credential):
        # The device itself (it presented its current credential): a fresh one, no token needed.
        credential = identity.rotate_by_device(session, device)
        device.labels = dict(inventory.labels)
        device.inventory = inventory.model_dump(mode="json")
        device.profile = inventory.profile
        device.last_seen = utcnow()
        _commit(session, body.device_id)
        return EnrollResponse(device_id=body.device_id, credential=credential)
    token = usable_token(session, body.enrollment_token)
    if device is None:
        credential = new_secret(TokenKind.DEVICE)
        device = Device(
            device_id=body.device_id,
            operator_labels=dict(token.labels),
            enrolled_at=utcnow(),
            credential_hash=hash_secret(credential, TokenKind.DEVICE),
            labels=dict(inventory.labels),
            inventory=inventory.model_dump(mode="json"),
            profile=inventory.profile,
            last_seen=utcnow(),
            status=identity.ACTIVE,
        )
        session.add(device)
        record(
            session, Actor.enrollment(token.id), "device.enroll", identity.target(device.device_id)
        )
        count_enrollment_use(session, token_id=token.id)
        _commit(session, body.device_id)
        return EnrollResponse(device_id=body.device_id, credential=credential)
    scope = device.operator_labels or {}
    if any(scope.get(k) != v for k, v in token.labels.items()):
        raise api_error(
            403,
            "scope_mismatch",
            f"device {body.device_id!r} is enrolled outside this token's labels",
            where="device_id",
            hint="re-enroll with a token whose labels the device has, or pick another id",
        )
    response.status_code = status.HTTP_202_ACCEPTED
    if body.credential:
        req = identity.request_by_credential(session, body.device_id, body.credential)
        if req is not None and req.status == RequestStatus.PENDING.value:
            return _pending(body.device_id, req.id, body.credential)
        if req is not None and req.status == RequestStatus.REJECTED.value:
            raise api_error(
                403,
                "enrollment_rejected",
                f"an operator rejected enrollment request {req.id} for {body.device_id!r}",
                where="credential",
                hint="ask an operator; if it was a mistake, remove the agent's DATA/credential "
                "file so it asks again, and have it approved (slmops devices approve)",
            )
    reason = (
        "device revoked"
        if device.status == identity.REVOKED
        else "re-enrollment without the current credential"
    )
    req, secret = identity.open_request(
        session,
        device,
        token_id=token.id,
        inventory=inventory.model_dump(mode="json"),
        reason=reason,
    )
    count_enrollment_use(session, token_id=token.id)
    _commit(session, body.device_id)
    return _pending(body.device_id, req.id, secret)


def _pending(device_id: str, request_id: str, credential: str) -> EnrollResponse:
    return EnrollResponse(
        device_id=device_id,
        credential=credential,
        status="pending",
        request_id=request_id,
        detail=f"pending operator approval: slmops devices approve {device_id}; the credential "
        "starts working once approved (enroll again with it to ask)",
    )


@router.post("/credential")
def rotate_credential(device: DeviceDep, session: SessionDep) -> EnrollResponse:
    """A new credential for the calling device; the one it authenticated with stops working."""
    credential = identity.rotate_by_device(session, device)
    session.commit()
    return EnrollResponse(device_id=device.device_id, credential=credential)
