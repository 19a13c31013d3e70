"""The control-plane ASGI application: operator API, device API, health, OpenAPI.

``create_app(settings)`` builds the app; the database is opened (and migrated) when it
starts. The app holds the settings, a connection pool, its ``Services`` (``server/context.py``:
blob store and caches, nothing another process would need to see) and the ticker
(``server/ticker.py``, which runs only in the leading process on PostgreSQL), so any number of
processes can serve the same database: ``app_from_env`` is the factory uvicorn workers import,
reading the same SLMOPS_* settings the CLI exported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from slmops import __version__
from slmops.server import dashboard
from slmops.server.api import device, operator
from slmops.server.api.device import io as device_io
from slmops.server.api.device.checkin_cache import LISTENING_TTL, CheckinCache
from slmops.server.api.device.fast_checkin import FastCheckin
from slmops.server.api.device.fast_telemetry import FastTelemetry
from slmops.server.api.operator import audit as audit_api
from slmops.server.body_limit import BodyLimitMiddleware
from slmops.server.context import Services
from slmops.server.db.session import open_database
from slmops.server.errors import envelope, install_error_handlers
from slmops.server.feedback import webhooks
from slmops.server.invalidation import Invalidation
from slmops.server.leadership import for_engine
from slmops.server.openapi import errors
from slmops.server.openapi import install as install_openapi
from slmops.server.registry.model_routes import router as models_router
from slmops.server.registry.routes import router as registry_router
from slmops.server.settings import ServerSettings, load_settings
from slmops.server.telemetry.metrics import router as metrics_router
from slmops.server.ticker import Ticker


def operation_id(route: APIRoute) -> str:
    """Stable operation ids (``devices-read_devices``) for generated API clients."""
    tag = str(route.tags[0]) if route.tags else "default"
    return f"{tag}-{route.name}"


def create_app(settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = open_database(settings)
        app.state.db = db
        stop_device_io = device_io.start(app, db)  # before the ticker: its sessions notify too
        ticker = Ticker(
            db,
            services,
            interval=settings.rollout_tick_seconds,
            leadership=for_engine(db.engine),
        )
        app.state.ticker = ticker
        ticker.start()
        try:
            yield
        finally:
            ticker.stop()
            stop_device_io()
            db.dispose()

    app = FastAPI(
        title="slmops control plane",
        version=__version__,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    services = app.state.services = Services.create(settings)
    webhooks.configure(settings.webhook_allow)  # private webhook targets allowed anyway
    app.state.invalidation = Invalidation()  # cached check-ins dropped on change (all processes)
    app.state.checkin_cache = CheckinCache(
        settings.checkin_cache_seconds,
        app.state.invalidation,
        # while NOTIFY keeps entries current, they outlive a device's poll: a minute-polling
        # fleet otherwise found its entries expired at every poll
        listening_ttl=max(LISTENING_TTL, 3 * settings.poll_seconds),
    )
    install_error_handlers(app)
    install_openapi(app)  # errors, bodies and ids the document would miss (openapi.py)
    # Idle check-ins the cache answers 304 before routing (api/device/fast_checkin.py); added
    # first, so it sits inside the body limit below.
    app.add_middleware(FastCheckin, state=app.state)
    # Well-formed telemetry batches stored and answered before routing (the same steps as
    # the route: api/device/fast_telemetry.py).
    app.add_middleware(FastTelemetry, state=app.state)
    # Outside every route: bodies are bounded before auth or parsing (server/body_limit.py).
    app.add_middleware(
        BodyLimitMiddleware, default=settings.max_body_bytes, uploads=settings.max_upload_bytes
    )
    # The device API first: routes are matched in order, and a fleet's polls are most requests.
    app.include_router(device.router)
    app.include_router(operator.router)
    app.include_router(audit_api.router, prefix="/api/v1")
    app.include_router(registry_router)  # /v2: the OCI distribution API
    app.include_router(models_router)  # /api/v1/models: the model catalog
    app.include_router(metrics_router)
    dashboard.install(app)  # /ui/: the operator dashboard

    @app.get("/healthz", tags=["health"], responses=errors(503))
    def healthz() -> JSONResponse:
        """Liveness, database reachability and whether this process runs the ticker
        (``leader``; ``standby`` processes wait to take over); no authentication."""
        try:
            with app.state.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            body = envelope(
                "database_unavailable",
                f"database unreachable: {type(exc).__name__}",
                hint="check --db and that the database server is up",
            )
            return JSONResponse(body, status_code=503)
        ticker = getattr(app.state, "ticker", None)
        role = ticker.role if ticker is not None else "standby"
        return JSONResponse({"status": "ok", "version": __version__, "ticker": role})

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory slmops.server.app:app_from_env`` (settings from env)."""
    return create_app(load_settings())
