"""Blueprints: the declarative desired state operators apply, one package per concern.

- ``document.py``: the Blueprint document (pydantic) and the rules that read it: label
  matching, generation-setting precedence, adapter assignments. No database, no HTTP.
- ``tables.py``: the ``blueprints`` table.
- ``service.py``: the use cases (apply, delete) every caller goes through.
- ``routes.py``: ``/api/v1/blueprints``, thin handlers over the service.

Nothing is re-exported here: import the module that holds the name, so an import says which
layer it reaches into (the layers contract in pyproject.toml checks that).
"""
