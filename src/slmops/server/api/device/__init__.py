"""The device API under /device/v1: enrollment and check-in, device-credential auth.

A device credential only ever resolves to its own row (``DeviceDep``); there is no route that
takes another device's id, so a device cannot read or change anyone else's state.
"""

from __future__ import annotations

from fastapi import APIRouter

from slmops.server.api.device import checkin, enroll
from slmops.server.telemetry import ingest

router = APIRouter(prefix="/device/v1")
router.include_router(enroll.router)
router.include_router(checkin.router)
router.include_router(ingest.router)
