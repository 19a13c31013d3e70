"""Property-based fuzzing of the control plane from its own OpenAPI document (schemathesis).

A real `slmops server run` on SQLite on 127.0.0.1; schemathesis loads /openapi.json and, for
every operation, generates requests from the schema (valid ones, and for bodies also invalid
ones) sent with operator, viewer, admin and device credentials (the device enrolled through the
API with an enrollment token). Every response must be:

- no 5xx (``not_a_server_error``): the first run found OverflowError 500s from ids past int64;
- a status the document declares for that operation (``status_code_conformance``);
- a body matching the declared schema for that status (``response_schema_conformance``), so
  every error is the envelope (or the OCI shape under /v2);
- of the declared content type (``content_type_conformance``).

Bounded: ``EXAMPLES`` per operation (hypothesis' deadline off: the server is a subprocess on a
shared machine), the whole run well under 3 minutes on 2 cores. The number of requests sent is
printed (``-s``) for the README.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from control_plane import ControlPlane

EXAMPLES = 15
NEGATIVE_EXAMPLES = 8
LINK_EXAMPLES = 15
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    ignored_auth,  # a 2xx with a credential is probed again without it and with a bad one
]
# Operations that would cut the fuzz off from its own credentials.
SKIP = {"device-rotate_credential"}

INVENTORY = {
    "arch": "x86_64",
    "cores": 2,
    "ram_bytes": 1 << 31,
    "free_disk_bytes": 1 << 32,
    "agent_version": "fuzz",
    "model_ram_bytes": 1 << 30,
    "model_cores": 1,
    "runtimes": ["gguf"],
    "labels": {"site": "fuzz"},
}


class Creds:
    def __init__(self, cp: ControlPlane) -> None:
        self.admin = cp.admin
        made = {}
        for role in ("operator", "viewer"):
            made[role] = cp.api("POST", "/api/v1/tokens", {"name": f"fuzz-{role}", "role": role})
        self.operator = str(made["operator"]["token"])
        self.viewer = str(made["viewer"]["token"])
        token = cp.enrollment_token({"site": "fuzz"})
        r = httpx.post(
            cp.url + "/device/v1/enroll",
            json={"enrollment_token": token, "device_id": "fuzz-dev", "inventory": INVENTORY},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        self.device = str(r.json()["credential"])

    def for_operation(self, operation_id: str, path: str) -> list[str]:
        """Credentials worth sending to an operation: its own kind, and a wrong one."""
        if path.startswith("/device/"):
            return [self.device, self.device, self.viewer]
        if path.startswith("/v2"):
            return [self.operator, self.device, self.viewer]
        return [self.admin, self.operator, self.viewer]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(Path(tmp_path_factory.mktemp("fuzz")))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def _json_body(op: Any) -> bool:
    content = op.definition.raw.get("requestBody", {}).get("content", {})
    return "application/json" in content


def _runner(
    op: Any,
    pool: list[str],
    url: str,
    oid: str,
    sent: dict[str, int],
    statuses: dict[int, int],
    mode: GenerationMode = GenerationMode.POSITIVE,
) -> Any:
    """A hypothesis test sending generated requests to one operation: valid ones (``EXAMPLES``)
    or, in negative mode, ones that break the schema (``NEGATIVE_EXAMPLES``), which must all be
    refused with a 4xx (``negative_data_rejection``: a bool where an int is due, say)."""
    checks = CHECKS if mode is GenerationMode.POSITIVE else [*CHECKS, negative_data_rejection]

    @settings(
        max_examples=EXAMPLES if mode is GenerationMode.POSITIVE else NEGATIVE_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), who=st.sampled_from(pool))
    def run(case: Any, who: str) -> None:
        headers = {"Authorization": f"Bearer {who}"}
        response = case.call(base_url=url, headers=headers, timeout=30)
        sent[oid] += 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks, headers=headers)

    return run


@pytest.fixture(scope="module")
def creds(server: ControlPlane) -> Creds:
    return Creds(server)


def test_fuzz_api(server: ControlPlane, creds: Creds, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    started = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 50, "the document lost operations"
    for op in operations:
        oid = op.definition.raw.get("operationId", op.label)
        if oid in SKIP:
            continue
        pool = creds.for_operation(oid, op.path)
        sent[oid] = 0

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not _json_body(op):
                continue  # negative JSON bodies: the typed part (paths and queries are strings,
                # registry uploads bytes: nothing breaks their schema)
            run = _runner(op, pool, server.url, oid, sent, statuses, mode)
            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # every operation's failure, then fail
                failures.append(f"{oid} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}")
    elapsed = time.monotonic() - started
    total = sum(sent.values())
    with capsys.disabled():
        print(
            f"\nschemathesis: {total} requests over {len(sent)} operations in {elapsed:.0f}s; "
            f"statuses {dict(sorted(statuses.items()))}"
        )
    assert not failures, "\n\n".join(failures)
    assert total >= len(sent) * 3, sent
    assert elapsed < 180


def _resolve(expr: str, body: Any) -> Any:
    """A ``$response.body#/a/b`` runtime expression against a JSON body."""
    node = body
    for part in expr.removeprefix("$response.body#/").split("/"):
        node = node[part] if isinstance(node, dict) else None
    return node


def test_fuzz_api_links(
    server: ControlPlane, creds: Creds, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stateful sequences along the document's links (server/openapi.py ``LINKS``): create an
    API or enrollment token and revoke it, enroll a device and read, relabel, revoke, rotate or
    delete it, apply a blueprint or feedback rules and read or delete them. Every case (source
    and each target) is drawn before the first request, so what hypothesis draws never depends
    on the server's answers (a live server's state would make hypothesis call the test flaky);
    the link's parameters are filled in from the answer afterwards."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = {
        op.definition.raw["operationId"]: op for op in (r.ok() for r in schema.get_all_operations())
    }
    enroll_token = server.enrollment_token()
    sent: list[int] = []
    failures: list[str] = []
    started = time.monotonic()

    def call(case: Any) -> Any:
        who = creds.device if case.path.startswith("/device/") else creds.admin
        headers = {"Authorization": f"Bearer {who}"}
        response = case.call(base_url=server.url, headers=headers, timeout=30)
        sent.append(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)
        return response

    sources = {
        oid: {
            status: response["links"]
            for status, response in op.definition.raw["responses"].items()
            if "links" in response
        }
        for oid, op in ops.items()
    }
    sources = {oid: links for oid, links in sources.items() if links}
    assert len(sources) >= 5, sorted(sources)
    followed: dict[str, int] = {}

    def make(oid: str, by_status: dict[str, Any]) -> Any:
        @settings(
            max_examples=LINK_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def run(data: Any) -> None:
            case = data.draw(ops[oid].as_strategy())
            if oid == "device-enroll_device" and isinstance(case.body, dict):
                case.body["enrollment_token"] = enroll_token  # a real one, so 201 happens
            targets = {
                (status, name): data.draw(
                    ops[link["operationId"]].as_strategy(
                        path_parameters={p: "placeholder" for p in link["parameters"]}
                    )
                )
                for status, links in by_status.items()
                for name, link in links.items()
            }
            response = call(case)
            status = str(response.status_code)
            if status not in by_status:
                return
            body = response.json()
            for (link_status, name), target in targets.items():
                if link_status != status:
                    continue
                link = by_status[status][name]
                for param, expr in link["parameters"].items():
                    target.path_parameters[param] = _resolve(expr, body)
                call(target)
                followed[link["operationId"]] = followed.get(link["operationId"], 0) + 1

        return run

    for oid, by_status in sources.items():
        try:
            make(oid, by_status)()
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{oid} (links): {type(exc).__name__}: {str(exc)[:1500]}")
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\nschemathesis links: {len(sent)} requests in {elapsed:.0f}s; "
            f"links followed {dict(sorted(followed.items()))}"
        )
    assert not failures, "\n\n".join(failures)
    # the sequences really ran past their first step: created things were acted on
    assert followed.get("tokens-revoke_token", 0) > 0, followed
    assert followed.get("enrollment-tokens-revoke_enrollment", 0) > 0, followed
    assert followed.get("devices-read_device", 0) > 0, followed
    assert elapsed < 120
