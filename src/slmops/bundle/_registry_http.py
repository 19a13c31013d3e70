"""The HTTP side of the OCI Distribution API: one small client that speaks exactly the calls
push and pull need (blob HEAD/GET with Range, monolithic and chunked uploads, manifest GET/PUT),
and turns transport and HTTP failures into slmops errors that name the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from slmops.bundle.media import (
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_MANIFEST,
)
from slmops.bundle.oci_ref import (
    Desc,
    OciContentError,
    OciRef,
)
from slmops.core.digest import sha256_bytes
from slmops.core.errors import ToolError

CHUNK_SIZE = 16 << 20
MONOLITHIC_LIMIT = 16 << 20
PIECE = 1 << 20  # read/write granularity: memory per transfer stays about this size
ACCEPT = f"{MT_INDEX}, {MT_MANIFEST}"  # distribution 404s an OCI manifest without it


class RegistryError(ToolError):
    """The registry was unreachable or answered with an error (exit code 1)."""


RegistryIntegrityError = OciContentError  # content broke its digest, size or a limit (exit 1)


class _Registry:
    """One repository on one registry: the few calls we make, with errors that say where."""

    def __init__(
        self, ref: OciRef, *, allow_http: bool, timeout: float, token: str | None = None
    ) -> None:
        self.ref, self.where, self.token = ref, str(ref), token
        self.base = ref.base_url(allow_http=allow_http)
        self.repo = f"{self.base}/v2/{ref.repository}"
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            headers={
                "Accept-Encoding": "identity",
                "User-Agent": "slmops",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
            follow_redirects=True,  # registries on object storage redirect blob GETs
        )

    @contextlib.contextmanager
    def _net(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
            raise RegistryError(
                f"registry {self.ref.netloc} {what}: {type(exc).__name__}: {exc}",
                where=self.where,
                hint="check that the registry runs and host:port is right; pulls resume",
            ) from None

    def _check(self, resp: httpx.Response, ok: tuple[int, ...], method: str) -> None:
        if resp.status_code in ok:
            return
        resp.read()
        try:
            text = "; ".join(f"{e['code']}: {e['message']}" for e in resp.json()["errors"])
        except (ValueError, KeyError, TypeError):
            text = resp.text[:300].strip()
        path = str(resp.request.url).removeprefix(self.base).split("?")[0]
        raise RegistryError(f"{method} {path}: HTTP {resp.status_code} {text}", where=self.where)

    def call(self, method: str, url: str, ok: tuple[int, ...], **kw: Any) -> httpx.Response:
        with self._net():
            resp = self.client.request(method, url, **kw)
        self._check(resp, ok, method)
        return resp

    @contextlib.contextmanager
    def get(self, url: str, ok: tuple[int, ...], **kw: Any) -> Iterator[httpx.Response]:
        with self._net(), self.client.stream("GET", url, **kw) as resp:
            self._check(resp, ok, "GET")
            yield resp

    def ping(self) -> None:
        if self.call("GET", f"{self.base}/v2/", (200, 401)).status_code == 401:
            if self.token:
                raise RegistryError(
                    f"registry {self.ref.netloc} refused the token",
                    where=self.where,
                    hint="check the token (unknown, revoked, or of another server)",
                )
            raise RegistryError(
                f"registry {self.ref.netloc} requires authentication",
                where=self.where,
                hint="authentication is not supported yet; use an open registry or a proxy",
            )

    def has(self, kind: str, reference: str) -> str | None:
        """HEAD a blob or manifest: its digest when present, None when absent."""
        resp = self.call(
            "HEAD", f"{self.repo}/{kind}/{reference}", (200, 404), headers={"Accept": ACCEPT}
        )
        return (
            resp.headers.get("Docker-Content-Digest", reference)
            if resp.status_code == 200
            else None
        )

    def upload(self, path: Path, desc: Desc, chunk_size: int, monolithic_limit: int) -> bool:
        """Upload one blob (the registry checks its digest); True when it went in chunks."""
        url = self.call("POST", f"{self.repo}/blobs/uploads/", (202,)).headers["Location"]
        octets = {"Content-Type": "application/octet-stream"}
        body, start, chunked = b"", 0, desc.size > monolithic_limit
        if not chunked:
            body, start = path.read_bytes(), desc.size
        while start < desc.size:
            n = min(chunk_size, desc.size - start)
            end = f"{start + n - 1}"
            headers = {**octets, "Content-Range": f"{start}-{end}", "Content-Length": str(n)}
            resp = self.call(
                "PATCH",
                str(httpx.URL(self.base).join(url)),
                (202,),
                headers=headers,
                content=_file_range(path, start, n),
            )
            if resp.headers.get("Range", f"0-{end}") != f"0-{end}":
                raise RegistryError(
                    f"registry holds {resp.headers['Range']}, sent 0-{end}", where=desc.digest
                )
            url, start = resp.headers["Location"], start + n
        # httpx `params=` would drop the upload's `_state` query: append the digest by hand.
        final = str(httpx.URL(self.base).join(url))
        final += ("&" if "?" in final else "?") + f"digest={desc.digest}"
        headers = {**octets, "Content-Length": str(len(body))}
        self.call("PUT", final, (201,), content=body, headers=headers)
        return chunked

    def put_manifest(self, reference: str, desc: Desc, data: bytes) -> None:
        headers = {"Content-Type": desc.media_type}
        resp = self.call(
            "PUT", f"{self.repo}/manifests/{reference}", (201,), content=data, headers=headers
        )
        if resp.headers.get("Docker-Content-Digest", desc.digest) != desc.digest:
            raise OciContentError(
                f"registry stored another digest than {desc.digest}", where=reference
            )

    def manifest(self, reference: str, expect: str | None = None) -> tuple[Desc, bytes] | None:
        """Fetch a manifest and check its digest; None on 404 when fetching a tag."""
        url, where = f"{self.repo}/manifests/{reference}", f"{self.where} manifest {reference}"
        too_big = OciContentError(f"manifest over {MAX_MANIFEST_BYTES} bytes refused", where=where)
        with self.get(url, (200,) if expect else (200, 404), headers={"Accept": ACCEPT}) as resp:
            if resp.status_code == 404:
                return None
            if int(resp.headers.get("Content-Length", 0)) > MAX_MANIFEST_BYTES:
                raise too_big
            data = bytearray()
            for piece in resp.iter_bytes(PIECE):
                data += piece
                if len(data) > MAX_MANIFEST_BYTES:
                    raise too_big
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            claims = (resp.headers.get("Docker-Content-Digest"), expect)
        digest = sha256_bytes(bytes(data))
        for claimed in claims:
            if claimed is not None and claimed != digest:
                raise OciContentError(f"content digest {digest} != {claimed}", where=where)
        return Desc(media_type, digest, len(data)), bytes(data)


def _file_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(start)
        while length > 0 and (piece := fh.read(min(PIECE, length))):
            length -= len(piece)
            yield piece
