"""The control plane's OCI registry: content-addressed storage, the /v2 API, model queries.

Kept import-free on purpose: ``db/metadata.py`` imports ``registry.tables`` so that Alembic sees
every table, and importing the HTTP modules from here would pull the whole server in with it.
Modules: ``store`` (blobs, uploads, manifests on disk), ``tables`` (tags, channels),
``catalog`` (what a pushed version holds; no HTTP), ``channels`` (moving a channel, a use case),
``manifests`` and ``scope`` (checks the /v2 API makes), ``routes`` (the OCI Distribution API
under /v2), ``model_routes`` (the model catalog, /api/v1/models; its bodies in ``schemas``).
"""
