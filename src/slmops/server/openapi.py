"""The OpenAPI document: every request body, every status a route answers, one error schema.

A fuzzer (tests/server/api/test_fuzz_api.py) and generated clients can only use what the document
describes, so FastAPI's defaults are completed here, in two places:

- on the routes, through helpers: ``responses=errors(404, 409)`` declares the errors a route
  raises itself, with the envelope schema of ``server/errors.py``; ``oci_errors(...)`` the same
  for the registry's OCI error shape; ``json_body(Model)`` declares a body a route reads by hand
  (check-in, telemetry) as a ``$ref`` to a component instead of an inline
  ``Model.model_json_schema()``, whose ``#/$defs/...`` references point nowhere once that schema
  sits inside the document (that was the unresolvable ``#/$defs/DeviceActionState``);
- in :func:`install`'s hook, for what follows from a route's shape and is true of every route:
  401/403 from its security scheme (403 only for operator roles), 413 for any body (the body
  limit, ``server/body_limit.py``), 400 for any route taking input (the app renders every
  ``UserInputError`` as 400), and 422 rendered in the envelope rather than FastAPI's
  ``HTTPValidationError`` (the app's handler rewrites every validation error). Registry routes
  answer validation errors 400 in the OCI shape, so their 422 is dropped.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"

_DESCRIPTIONS = {
    400: "bad request (a value the schema cannot express as invalid)",
    401: "missing, malformed, unknown or revoked credential",
    403: "the credential's role may not do this",
    404: "no such object",
    409: "conflicts with the object's current state",
    413: "request body over the route's limit",
    415: "unsupported content encoding",
    416: "range not satisfiable",
    422: "request does not validate (the first problem is named in `where`)",
    503: "the database is unreachable",
}


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. not_found, unauthorized")
    message: str
    where: str | None = Field(description="the field, header or path the error is about")
    hint: str | None = Field(description="how to fix it")


class ErrorEnvelope(BaseModel):
    """The one error body of the slmops API (``server/errors.py``)."""

    error: ErrorDetail


class OciErrorItem(BaseModel):
    code: str
    message: str
    detail: Any = None


class OciErrors(BaseModel):
    """The OCI Distribution error body, answered by /v2 (registry clients parse this)."""

    errors: list[OciErrorItem]


def _declared(model: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, Any]:
    return {s: {"model": model, "description": _DESCRIPTIONS.get(s, "error")} for s in statuses}


def errors(*statuses: int) -> dict[int | str, Any]:
    """``responses=`` for a route that raises these statuses with the error envelope."""
    return _declared(ErrorEnvelope, statuses)


def oci_errors(*statuses: int) -> dict[int | str, Any]:
    """``responses=`` for a registry route: these statuses in the OCI error shape."""
    return _declared(OciErrors, statuses)


_BODIES: dict[str, type[BaseModel]] = {}


def json_body(model: type[BaseModel], *, description: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body a route reads by hand.

    The model is added to ``components/schemas`` by the :func:`install` hook, with its nested
    models beside it, so every reference in the document resolves."""
    _BODIES[model.__name__] = model
    body: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }
    if description:
        body["description"] = description
    return {"requestBody": body}


def raw_body(*media_types: str, required: bool = True, description: str) -> dict[str, Any]:
    """``openapi_extra`` for a body a route streams as bytes (registry uploads, manifests)."""
    schema = {"type": "string", "format": "binary"}
    content = {m: {"schema": schema} for m in media_types}
    return {"requestBody": {"required": required, "description": description, "content": content}}


DEVICE_SECURITY: dict[str, Any] = {"security": [{"DeviceCredential": []}]}
"""``openapi_extra`` for device routes that read the credential header themselves (hot paths)."""


def _add_bodies(schemas: dict[str, Any]) -> None:
    if not _BODIES:
        return
    pairs = [(m, "validation") for m in _BODIES.values()]
    _, top = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)


def _complete(op: dict[str, Any], *, oci: bool) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})

    def add(status: int, model: type[BaseModel] = ErrorEnvelope) -> None:
        responses.setdefault(
            str(status),
            {
                "description": _DESCRIPTIONS.get(status, "error"),
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
                },
            },
        )

    if oci:
        had_422 = responses.pop("422", None) is not None
        if had_422 or "requestBody" in op:
            add(400, OciErrors)
        if "requestBody" in op:
            add(413, OciErrors)
        return
    if "422" in responses:
        responses["422"] = {
            "description": _DESCRIPTIONS[422],
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model="ErrorEnvelope")}}
            },
        }
    if op.get("parameters") or "requestBody" in op:
        add(400)  # a UserInputError from checking a value is a 400 (server/errors.py)
    schemes = {name for req in op.get("security", []) for name in req}
    if schemes:
        add(401)
    if "OperatorToken" in schemes:
        add(403)
    if "requestBody" in op:
        add(413)
        add(422)


def _unique_ids(doc: dict[str, Any]) -> None:
    """A route serving several methods (GET and HEAD) gets one id from FastAPI; suffix the rest."""
    seen: set[str] = set()
    for item in doc.get("paths", {}).values():
        for method, op in item.items():
            oid = op.get("operationId") if isinstance(op, dict) else None
            if oid is None:
                continue
            if oid in seen:
                op["operationId"] = oid = f"{oid}-{method}"
            seen.add(oid)


def _link(target: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": target, "parameters": parameters}


_DEVICE = "$response.body#/device_id"
LINKS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    # (source operation id, status): {link name: target} -- what a client does next with the
    # object it just made; a stateful fuzzer follows these (tests/server/api/test_fuzz_api.py).
    ("tokens-create_token", "201"): {
        "Revoke": _link("tokens-revoke_token", token_id="$response.body#/id"),
    },
    ("enrollment-tokens-create_enrollment", "201"): {
        "Revoke": _link("enrollment-tokens-revoke_enrollment", token_id="$response.body#/id"),
    },
    ("device-enroll_device", "201"): {
        "Read": _link("devices-read_device", device_id=_DEVICE),
        "Labels": _link("devices-update_device_labels", device_id=_DEVICE),
        "Revoke": _link("devices-revoke_device", device_id=_DEVICE),
        "Rotate": _link("devices-rotate_device", device_id=_DEVICE),
        "Delete": _link("devices-delete_device", device_id=_DEVICE),
    },
    ("device-enroll_device", "202"): {
        "Approve": _link("devices-approve_device", device_id=_DEVICE),
        "Reject": _link("devices-reject_device", device_id=_DEVICE),
    },
    ("blueprints-apply_blueprint", "200"): {
        "Read": _link("blueprints-read_blueprint", name="$response.body#/name"),
        "Delete": _link("blueprints-delete_blueprint", name="$response.body#/name"),
    },
    ("blueprints-apply_blueprint", "202"): {
        "Read": _link("blueprints-read_blueprint", name="$response.body#/name"),
    },
    ("feedback-apply_rules", "200"): {
        "Delete": _link("feedback-delete_rules", name="$response.body#/name"),
    },
}


def _add_links(doc: dict[str, Any]) -> None:
    ops = {
        op.get("operationId"): op
        for item in doc.get("paths", {}).values()
        for op in item.values()
        if isinstance(op, dict)
    }
    for (source, status), links in LINKS.items():
        response = ops.get(source, {}).get("responses", {}).get(status)
        if response is not None and all(link["operationId"] in ops for link in links.values()):
            response["links"] = links


def complete_document(doc: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorEnvelope, OciErrorItem, OciErrors):
        if model.__name__ not in schemas:
            _, top = models_json_schema([(model, "validation")], ref_template=REF)
            schemas.update(top.get("$defs", {}))
    _add_bodies(schemas)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                _complete(op, oci=path.startswith("/v2"))
    _unique_ids(doc)
    _add_links(doc)
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"{REF.format(model=unused)}"' not in json.dumps(doc):
            del schemas[unused]
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_document(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
