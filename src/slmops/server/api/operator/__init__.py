"""The operator API under /api/v1: one router per resource, operator-token auth."""

from __future__ import annotations

from fastapi import APIRouter

from slmops.server.api.operator import devices, enrollment, tokens
from slmops.server.blueprints import routes as blueprints
from slmops.server.feedback import routes as feedback
from slmops.server.rollouts import routes as rollouts
from slmops.server.telemetry import routes as telemetry

router = APIRouter(prefix="/api/v1")
router.include_router(blueprints.router)
router.include_router(devices.router)
router.include_router(enrollment.router)
router.include_router(rollouts.router)
router.include_router(tokens.router)
router.include_router(telemetry.router)
router.include_router(feedback.router)
