"""The control plane's OCI registry: content-addressed storage, the /v2 API, model queries.

Kept import-free on purpose: ``db/models.py`` imports ``registry.tables`` so that Alembic sees
every table, and importing the HTTP modules from here would make that a circular import.
Modules: ``store`` (blobs, uploads, manifests on disk), ``tables`` (tags, channels),
``api`` (the OCI Distribution API under /v2), ``models_api`` (/api/v1/models).
"""
