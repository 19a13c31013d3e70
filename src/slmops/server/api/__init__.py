"""HTTP API: ``operator/`` (/api/v1, operator tokens), ``device/`` (/device/v1, credentials).

Two routers with two auth schemes that never accept each other's secrets. Shared dependencies
live in ``deps``. This package module stays empty so route modules can import ``deps``
without import cycles.
"""
