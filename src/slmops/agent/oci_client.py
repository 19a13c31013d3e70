"""The part of the OCI Distribution API a device needs: read manifests and blobs, nothing else.

Pulls only (manifest GET with the OCI Accept header, blob GET with Range to resume, the device
credential as a bearer token), over the agent's one transport (transport.py). Pushing stays in
bundle/registry.py (httpx) for `slmops push`, which the agent never imports.

A manifest is read up to ``MAX_MANIFEST_BYTES`` and checked against the digest it was asked by
and the one the registry claims; HTTP failures name the registry and the path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from slmops.agent.transport import HttpTransport, Response, Transport
from slmops.bundle.media import MAX_MANIFEST_BYTES, MT_INDEX, MT_MANIFEST
from slmops.bundle.oci_ref import OciContentError, parse_oci_ref
from slmops.core.digest import sha256_bytes
from slmops.core.errors import ToolError

ACCEPT = f"{MT_INDEX}, {MT_MANIFEST}"  # distribution 404s an OCI manifest without it


class RegistryError(ToolError):
    """The registry answered with an error (exit code 1)."""


class OciClient:
    """One repository on one registry, read-only."""

    def __init__(
        self,
        base: str,
        repository: str,
        *,
        allow_http: bool = False,
        timeout: float = 60.0,
        token: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        host = base.split("://", 1)[-1].rstrip("/")
        ref = parse_oci_ref(f"oci://{host}/{repository}")
        self.where = str(ref)
        self.netloc = ref.netloc
        self.base = ref.base_url(allow_http=allow_http or base.startswith("http://"))
        self.repo = f"{self.base}/v2/{ref.repository}"
        self.transport: Transport = transport or HttpTransport(timeout=timeout)
        self.headers = {
            "Accept-Encoding": "identity",
            "User-Agent": "slmops-agent",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        }

    def close(self) -> None:
        self.transport.close()

    def _get(self, path: str, ok: tuple[int, ...], headers: Mapping[str, str]) -> Response:
        resp = self.transport.request(
            "GET", self.repo + path, {**self.headers, **headers}, stream=True
        )
        if resp.status in ok:
            return resp
        try:
            raw = resp.read(64 << 10)
        except ValueError:
            raw = b""
        try:
            text = "; ".join(f"{e['code']}: {e['message']}" for e in json.loads(raw)["errors"])
        except (ValueError, KeyError, TypeError):
            text = raw[:300].decode("utf-8", "replace").strip()
        raise RegistryError(f"GET {path}: HTTP {resp.status} {text}", where=self.where)

    def manifest(self, reference: str, expect: str | None = None) -> bytes | None:
        """A manifest's bytes, checked against `expect` and the registry's claimed digest;
        None on 404 when fetching a tag (`expect` None)."""
        where = f"{self.where} manifest {reference}"
        ok = (200,) if expect else (200, 404)
        with self._get(f"/manifests/{reference}", ok, {"Accept": ACCEPT}) as resp:
            if resp.status == 404:
                return None
            try:
                declared = int(resp.headers.get("content-length", "0"))
            except ValueError:
                declared = 0
            too_big = OciContentError(
                f"manifest over {MAX_MANIFEST_BYTES} bytes refused", where=where
            )
            if declared > MAX_MANIFEST_BYTES:
                raise too_big
            try:
                data = resp.read(MAX_MANIFEST_BYTES)
            except ValueError:
                raise too_big from None
            claimed = resp.headers.get("docker-content-digest")
        digest = sha256_bytes(data)
        for claim in (claimed, expect):
            if claim is not None and claim != digest:
                raise OciContentError(f"content digest {digest} != {claim}", where=where)
        return data

    def blob(self, digest: str, start: int = 0) -> Response:
        """A streamed blob GET from byte `start` (206 when the registry honoured the Range)."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        return self._get(f"/blobs/{digest}", (200, 206), headers)
