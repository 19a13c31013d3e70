"""The control plane's OpenAPI document describes what the server really does.

A fuzzer and generated clients can only use what the document says, so: every ``$ref``
resolves (the check-in body once pointed at ``#/$defs/DeviceActionState``, which is nowhere),
every operation declares its error statuses with the one error envelope (the OCI shape under
/v2), operation ids are unique (GET and HEAD of one route once shared theirs), every body a
route reads is declared (telemetry's, read by hand, included), and no integer field of a request
body takes a JSON bool (``"free_disk_bytes": false`` once passed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from slmops.server.app import create_app
from slmops.server.settings import ServerSettings

ENVELOPE = "#/components/schemas/ErrorEnvelope"
OCI = "#/components/schemas/OciErrors"
METHODS = ("get", "put", "post", "delete", "patch", "head")


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(ServerSettings(data_dir=tmp_path_factory.mktemp("openapi")))
    document: dict[str, Any] = json.loads(json.dumps(app.openapi()))
    return document


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def refs(node: Any, where: str = "#") -> list[tuple[str, str]]:
    """Every ``$ref`` in the document with where it sits."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append((value, where))
            else:
                found.extend(refs(value, f"{where}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(refs(value, f"{where}/{i}"))
    return found


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external or relative $ref {ref!r}"
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    found = refs(doc)
    assert len(found) > 50  # the document really is walked
    broken = [f"{ref} at {where}" for ref, where in found if not _resolves(doc, ref)]
    assert not broken, "\n".join(broken)
    assert "$defs" not in json.dumps(doc["paths"]), "inline pydantic $defs left in a path"


def _resolves(doc: dict[str, Any], ref: str) -> bool:
    try:
        resolve(doc, ref)
    except AssertionError:
        return False
    return True


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op.get("operationId") for _, _, op in operations(doc)]
    assert None not in ids
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, dupes
    heads = {path for method, path, _ in operations(doc) if method == "HEAD"}
    assert {"/v2/{name}/blobs/{digest}", "/v2/{name}/manifests/{reference}"} <= heads


def _error_schema(op: dict[str, Any], status: str) -> str | None:
    content = op["responses"][status].get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    ref = schema.get("$ref")
    return ref if isinstance(ref, str) else None


def test_errors_are_declared_with_the_envelope(doc: dict[str, Any]) -> None:
    problems: list[str] = []
    for method, path, op in operations(doc):
        statuses = set(op["responses"])
        errors = {s for s in statuses if s.startswith(("4", "5"))}
        oci = path.startswith("/v2")
        for status in errors:
            want = OCI if oci else ENVELOPE
            if _error_schema(op, status) != want:
                problems.append(f"{method} {path} {status}: not the {want} schema")
        secured = bool(op.get("security")) or oci
        if secured and "401" not in statuses:
            problems.append(f"{method} {path}: authenticated but no 401")
        schemes = {name for req in op.get("security", []) for name in req}
        if "OperatorToken" in schemes and "403" not in statuses:
            problems.append(f"{method} {path}: role-checked but no 403")
        if "requestBody" in op and "413" not in statuses:
            problems.append(f"{method} {path}: takes a body but no 413")
        if "422" in statuses and oci:
            problems.append(f"{method} {path}: the registry answers 400, not 422")
        if "{" in path and not (statuses & {"404", "422", "400"}) and path != "/v2/":
            problems.append(f"{method} {path}: path parameters but no 404/422")
    assert not problems, "\n".join(sorted(problems))
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    envelope = doc["components"]["schemas"]["ErrorEnvelope"]
    assert envelope["required"] == ["error"]
    detail = resolve(doc, envelope["properties"]["error"]["$ref"])
    assert set(detail["required"]) == {"code", "message", "where", "hint"}


def test_specific_errors_are_declared(doc: dict[str, Any]) -> None:
    """Spot checks of statuses routes raise themselves (404 unknown id, 409 bad state)."""
    want = {
        ("GET", "/api/v1/devices/{device_id}"): {"401", "403", "404", "422"},
        ("POST", "/api/v1/jobs/{job_id}/result"): {"404", "409", "413", "422"},
        ("POST", "/device/v1/enroll"): {"400", "401", "403", "409", "413", "422"},
        ("POST", "/device/v1/checkin"): {"304", "401", "413", "422"},
        ("POST", "/device/v1/telemetry"): {"400", "401", "413", "415", "422"},
        ("GET", "/v2/{name}/blobs/{digest}"): {"206", "401", "403", "404", "416"},
    }
    ops = {(m, p): op for m, p, op in operations(doc)}
    for key, statuses in want.items():
        assert statuses <= set(ops[key]["responses"]), (key, sorted(ops[key]["responses"]))


def test_every_body_is_declared(doc: dict[str, Any]) -> None:
    """Routes that read a JSON body declare it; telemetry as JSON that may be gzip-encoded."""
    bodies = {(m, p) for m, p, op in operations(doc) if "requestBody" in op}
    for key in [
        ("POST", "/device/v1/checkin"),
        ("POST", "/device/v1/telemetry"),
        ("POST", "/device/v1/enroll"),
        ("POST", "/device/v1/actions"),
        ("PUT", "/api/v1/blueprints/{name}"),
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/enrollment-tokens"),
        ("PATCH", "/v2/{name}/blobs/uploads/{upload_id}"),
        ("PUT", "/v2/{name}/manifests/{reference}"),
    ]:
        assert key in bodies, key
    ops = {(m, p): op for m, p, op in operations(doc)}
    tele = ops[("POST", "/device/v1/telemetry")]["requestBody"]
    schema = resolve(doc, tele["content"]["application/json"]["schema"]["$ref"])
    assert {"batch_id", "windows", "schema"} <= set(schema["properties"])
    assert "gzip" in tele["description"]
    checkin = ops[("POST", "/device/v1/checkin")]
    assert resolve(doc, checkin["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert checkin["security"] == [{"DeviceCredential": []}]
    # the credential header is the security scheme, not a free-form parameter
    params = {p["name"].lower() for p in checkin.get("parameters", [])}
    assert "authorization" not in params


def test_ids_are_bounded_to_int64(doc: dict[str, Any]) -> None:
    """Integer ids past int64 were 500s (SQLite OverflowError); the schema bounds them."""
    checked = []
    for method, path, op in operations(doc):
        for param in op.get("parameters", []):
            schema = param.get("schema", {})
            for t in [schema, *schema.get("anyOf", [])]:
                if t.get("type") == "integer" and param["name"].endswith("_id"):
                    assert t.get("maximum") == 2**63 - 1, (method, path, param["name"])
                    checked.append(f"{method} {path} {param['name']}")
    assert len(checked) >= 4, checked  # alert_id (path and query), job_id (read, result)


def _models() -> dict[str, type[BaseModel]]:
    """Every pydantic model by name (only names that are unique)."""
    seen: dict[str, list[type[BaseModel]]] = {}
    stack: list[type[BaseModel]] = [BaseModel]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("slmops."):
                seen.setdefault(sub.__name__, []).append(sub)
            stack.append(sub)
    return {name: classes[0] for name, classes in seen.items() if len(set(classes)) == 1}


def _request_components(doc: dict[str, Any]) -> set[str]:
    """Names of the schemas reachable from a request body."""
    todo = [
        ref
        for _, _, op in operations(doc)
        for ref, _ in refs(op.get("requestBody", {}))
        if ref.startswith("#/components/schemas/")
    ]
    done: set[str] = set()
    while todo:
        name = todo.pop().rsplit("/", 1)[1]
        if name in done:
            continue
        done.add(name)
        todo.extend(r for r, _ in refs(doc["components"]["schemas"][name]))
    return done


def _is_int(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "integer" or any(
        p.get("type") == "integer" for p in prop.get("anyOf", [])
    )


def test_no_int_field_of_a_request_takes_a_bool(doc: dict[str, Any]) -> None:
    models = _models()
    checked: list[str] = []
    loose: list[str] = []
    for name in sorted(_request_components(doc)):
        schema = doc["components"]["schemas"][name]
        model = models.get(name)
        if model is None or schema.get("type") != "object":
            continue
        for prop_name, prop in schema.get("properties", {}).items():
            if not (_is_int(prop) or prop.get("type") == "number"):
                continue
            checked.append(f"{name}.{prop_name}")
            try:
                model.model_validate_json(json.dumps({prop_name: True}))  # as on the wire
            except ValidationError as exc:
                at_field = [e for e in exc.errors() if e["loc"][:1] == (prop_name,)]
                if at_field and all(e["type"] != "missing" for e in at_field):
                    continue
            loose.append(f"{name}.{prop_name}")
    assert "Inventory.free_disk_bytes" in checked
    assert "TelemetryBatch.dropped_windows" in checked
    assert not loose, f"these accept a JSON bool: {loose}"


def test_a_sample_body_validates_against_the_schema(doc: dict[str, Any]) -> None:
    """The document's check-in schema takes a real check-in and refuses a bool for a count."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # installed with schemathesis (dev)
    inventory = {
        "arch": "x86_64",
        "cores": 2,
        "ram_bytes": 1 << 30,
        "free_disk_bytes": 1 << 30,
        "agent_version": "0",
        "model_ram_bytes": 1 << 29,
        "model_cores": 1,
    }
    root = {**doc, "$ref": "#/components/schemas/CheckIn"}
    validator = jsonschema_rs.validator_for(root)
    assert validator.is_valid({"inventory": inventory})
    assert not validator.is_valid({"inventory": {**inventory, "free_disk_bytes": False}})
    assert not validator.is_valid({"inventory": inventory, "actions": [{"state": "nope"}]})


def test_document_matches_served(tmp_path: Path) -> None:
    """/openapi.json is built by the same hook as app.openapi() (one source of truth)."""
    app = create_app(ServerSettings(data_dir=tmp_path))
    assert app.openapi() is app.openapi()
    assert "ErrorEnvelope" in app.openapi()["components"]["schemas"]


def test_links_name_real_operations_and_parameters(doc: dict[str, Any]) -> None:
    """The stateful fuzz follows these links; a renamed route or parameter must not orphan one."""
    ops = {op["operationId"]: (path, op) for _, path, op in operations(doc)}
    seen = 0
    for _, _, op in operations(doc):
        for response in op["responses"].values():
            for name, link in response.get("links", {}).items():
                seen += 1
                assert link["operationId"] in ops, name
                path, _ = ops[link["operationId"]]
                for param, expr in link["parameters"].items():
                    assert "{" + param + "}" in path, (name, param, path)
                    assert expr.startswith("$response.body#/"), expr
    assert seen >= 10
