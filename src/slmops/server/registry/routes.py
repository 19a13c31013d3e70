"""The OCI Distribution API subset `slmops push`/`pull` (and other OCI clients) speak, at /v2.

Blobs: HEAD/GET with ``Range`` (206), uploads by POST (optionally monolithic with ``?digest=``),
PATCH chunks and PUT ``?digest=`` to finish. Manifests: HEAD/GET/PUT by tag or digest, stored
byte for byte (their digest is over those bytes) after checking that they are an OCI manifest
or index whose every referenced blob or child manifest is already here, so a tag never points
at incomplete content. A version tag is immutable: a PUT that would point it at another
digest is refused with 409 (only the ``sha256-<hex>`` signature tags move). ``Accept`` is not
enforced: we only store OCI types.

Errors use the OCI shape ``{"errors": [{"code", "message", "detail"}]}`` rather than the slmops
envelope, because distribution clients parse that; ``OciRoute`` renders them before the app's
handlers see anything. Reads accept an operator token of any role or a device credential,
the device reading only what its own desired or active bundle reaches (``scope.py``); writes need
an operator or admin token, checked before an upload's body is read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from slmops.bundle.media import (
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_MANIFEST,
)
from slmops.bundle.oci_ref import _REPO_RE, _TAG_RE, DIGEST_RE
from slmops.server.api.deps import SessionDep
from slmops.server.context import Services
from slmops.server.db import find_api_token, find_device_by_credential
from slmops.server.db.models import ApiToken, Device, utcnow
from slmops.server.openapi import oci_errors, raw_body
from slmops.server.reconcile import reconcile_adapter, reconcile_pushed
from slmops.server.registry.manifests import SIGNATURE_TAG, OciError, check_manifest
from slmops.server.registry.scope import device_scope
from slmops.server.registry.store import PIECE, BlobStore, StoreError
from slmops.server.registry.tables import RegistryTag
from slmops.server.security import Role, TokenKind, looks_like

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="slmops"'}


def oci_response(status: int, code: str, message: str, headers: Any = None) -> JSONResponse:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return JSONResponse(body, status_code=status, headers=headers)


class OciRoute(APIRoute):
    """Renders OciError, StoreError and request validation failures in the OCI error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OciError as exc:
                return oci_response(exc.status, exc.code, exc.message, exc.headers)
            except StoreError as exc:
                return oci_response(exc.status, exc.code, exc.message)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()))
                return oci_response(400, "UNSUPPORTED", f"{where}: {first.get('msg', 'invalid')}")

        return handle


def store_of(request: Request) -> BlobStore:
    """The app's one blob store (``server/context.Services``)."""
    services: Services = request.app.state.services
    return services.store


def principal(request: Request, session: SessionDep) -> ApiToken | Device:
    """The caller: an operator token (any role) or an enrolled device; 401 otherwise."""
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    found: ApiToken | Device | None = None
    if scheme.lower() == "bearer" and looks_like(secret, TokenKind.API):
        found = find_api_token(session, secret=secret)
    elif scheme.lower() == "bearer" and looks_like(secret, TokenKind.DEVICE):
        found = find_device_by_credential(session, secret=secret)
    if found is None:
        raise OciError(
            401, "UNAUTHORIZED", "a valid operator token or device credential is needed", CHALLENGE
        )
    return found


def pusher(caller: Annotated[ApiToken | Device, Depends(principal)]) -> ApiToken:
    if not isinstance(caller, ApiToken) or not Role(caller.role).allows(Role.OPERATOR):
        raise OciError(403, "DENIED", "pushing needs an operator or admin API token")
    return caller


Reader = Annotated[ApiToken | Device, Depends(principal)]
Pusher = Annotated[ApiToken, Depends(pusher)]
Store = Annotated[BlobStore, Depends(store_of)]


def repo_name(name: str) -> str:
    if not _REPO_RE.match(name) or len(name) > 255:
        raise OciError(400, "NAME_INVALID", f"invalid repository name {name!r}")
    return name


v2 = APIRouter(prefix="/v2", tags=["registry"], route_class=OciRoute)
BLOB_READ: dict[int | str, Any] = {
    200: {"description": "the blob", "content": {"application/octet-stream": {}}},
    206: {"description": "the requested range", "content": {"application/octet-stream": {}}},
}
MANIFEST_READ: dict[int | str, Any] = {
    200: {
        "description": "the manifest or index, byte for byte",
        "content": {MT_MANIFEST: {}, MT_INDEX: {}},
    }
}


@v2.get("/", responses=oci_errors(401))
def base(caller: Reader) -> JSONResponse:
    """API version check; 401 tells clients to authenticate."""
    return JSONResponse({})


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single ``bytes=`` range; None means the whole blob."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m or not (m[1] or m[2]):
        return None  # absent, multi-range or unparsable: answer with the whole blob (RFC 9110)
    if m[1]:
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    else:
        start, end = max(size - int(m[2]), 0), size - 1 if int(m[2]) else -1
    if start >= size or start > end:
        headers = {"Content-Range": f"bytes */{size}"}
        raise OciError(416, "RANGE_INVALID", f"range {header} outside 0-{size - 1}", headers)
    return start, end


def check_scope(
    session: Session, store: BlobStore, caller: ApiToken | Device, name: str, digest: str | None
) -> None:
    """Devices read only their own bundles (registry/scope.py); operators read everything.
    The repository is checked before the digest, so a refusal says nothing about existence."""
    if isinstance(caller, ApiToken):
        return
    scope = device_scope(session, store, caller)
    if not scope.allows(name) or (digest is not None and not scope.allows(name, digest)):
        what = name if digest is None else f"{name}@{digest}"
        raise OciError(
            403, "DENIED", f"{what} is not part of this device's desired or active bundle"
        )


@v2.get("/{name:path}/blobs/{digest}", responses=BLOB_READ | oci_errors(400, 401, 403, 404, 416))
@v2.head(
    "/{name:path}/blobs/{digest}",
    operation_id="registry-head_blob",
    responses=BLOB_READ | oci_errors(400, 401, 403, 404),
)
def get_blob(
    name: str, digest: str, request: Request, caller: Reader, session: SessionDep, store: Store
) -> Response:
    repo_name(name)
    check_scope(session, store, caller, name, None)
    size = store.size(digest)
    if size is None:
        raise OciError(404, "BLOB_UNKNOWN", f"blob {digest} not found")
    check_scope(session, store, caller, name, digest)
    headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
    rng = None if request.method == "HEAD" else _byte_range(request.headers.get("Range"), size)
    start, end = rng or (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers, media_type="application/octet-stream")
    if rng:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    body = store.read_range(digest, start, end - start + 1)
    media = "application/octet-stream"
    return StreamingResponse(body, 206 if rng else 200, headers=headers, media_type=media)


async def _receive(request: Request, store: BlobStore, upload_id: str) -> int:
    """Append the request body to an upload in ~PIECE writes; returns the session's size."""
    buf, size = bytearray(), await run_in_threadpool(store.upload_size, upload_id)
    async for piece in request.stream():
        buf += piece
        if len(buf) >= PIECE:
            size = await run_in_threadpool(store.append, upload_id, bytes(buf))
            buf.clear()
    if buf:
        size = await run_in_threadpool(store.append, upload_id, bytes(buf))
    return size


def _session_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Docker-Upload-UUID": upload_id,
        "Range": f"0-{max(size - 1, 0)}",
    }


def _created(name: str, digest: str) -> Response:
    headers = {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
    return Response(status_code=201, headers=headers)


@v2.post(
    "/{name:path}/blobs/uploads/",
    status_code=202,
    response_class=Response,
    responses={201: {"description": "blob stored"}, **oci_errors(400, 401, 403, 404, 413)},
    openapi_extra=raw_body(
        "application/octet-stream", required=False, description="the blob, with ?digest="
    ),
)
async def start_upload(
    name: str,
    request: Request,
    caller: Pusher,
    store: Store,
    digest: str | None = None,
    mount: str | None = None,
) -> Response:
    """Open an upload session; ``?digest=`` uploads the body in one request; ``?mount=`` of a
    digest already stored succeeds at once (the store is shared by all repositories)."""
    repo_name(name)
    if mount and store.size(mount) is not None:
        return _created(name, mount)
    upload_id = await run_in_threadpool(store.start_upload)
    if digest is not None:
        await _receive(request, store, upload_id)
        await run_in_threadpool(store.finish, upload_id, digest)
        return _created(name, digest)
    return Response(status_code=202, headers=_session_headers(name, upload_id, 0))


@v2.get(
    "/{name:path}/blobs/uploads/{upload_id}",
    status_code=204,
    responses=oci_errors(400, 401, 403, 404),
)
def upload_status(name: str, upload_id: str, caller: Pusher, store: Store) -> Response:
    size = store.upload_size(upload_id)
    return Response(status_code=204, headers=_session_headers(repo_name(name), upload_id, size))


@v2.patch(
    "/{name:path}/blobs/uploads/{upload_id}",
    status_code=202,
    response_class=Response,
    responses=oci_errors(400, 401, 403, 404, 413, 416),
    openapi_extra=raw_body("application/octet-stream", description="the next chunk"),
)
async def upload_chunk(
    name: str, upload_id: str, request: Request, caller: Pusher, store: Store
) -> Response:
    """Append a chunk; a ``Content-Range`` must start where the session ends (else 416)."""
    repo_name(name)
    have = await run_in_threadpool(store.upload_size, upload_id)
    first = request.headers.get("Content-Range", "").split("-")[0].strip()
    if first and (not first.isdigit() or int(first) != have):
        headers = _session_headers(name, upload_id, have)
        raise OciError(416, "BLOB_UPLOAD_INVALID", f"chunk must start at {have}", headers)
    size = await _receive(request, store, upload_id)
    return Response(status_code=202, headers=_session_headers(name, upload_id, size))


@v2.put(
    "/{name:path}/blobs/uploads/{upload_id}",
    status_code=201,
    response_class=Response,
    responses=oci_errors(400, 401, 403, 404, 413),
    openapi_extra=raw_body(
        "application/octet-stream", required=False, description="a last chunk, if any"
    ),
)
async def finish_upload(
    name: str,
    upload_id: str,
    request: Request,
    caller: Pusher,
    store: Store,
    digest: str | None = None,
) -> Response:
    """Append a final body (if any), verify the digest and move the blob into the store."""
    repo_name(name)
    if digest is None:
        raise OciError(400, "DIGEST_INVALID", "finishing an upload needs ?digest=sha256:...")
    await _receive(request, store, upload_id)
    await run_in_threadpool(store.finish, upload_id, digest)
    return _created(name, digest)


@v2.delete(
    "/{name:path}/blobs/uploads/{upload_id}",
    status_code=204,
    responses=oci_errors(400, 401, 403, 404),
)
def cancel_upload(name: str, upload_id: str, caller: Pusher, store: Store) -> Response:
    store.cancel(upload_id)
    return Response(status_code=204)


def resolve(session: Session, store: BlobStore, name: str, reference: str) -> tuple[str, str]:
    """(digest, media type) of a manifest named by tag or digest; 404 MANIFEST_UNKNOWN."""
    digest: str | None = reference
    if not DIGEST_RE.match(reference):
        row = session.scalar(
            select(RegistryTag).where(RegistryTag.repository == name, RegistryTag.tag == reference)
        )
        digest = row.digest if row else None
    media = store.manifest_type(digest) if digest else None
    if digest is None or media is None:
        raise OciError(404, "MANIFEST_UNKNOWN", f"manifest {name}:{reference} not found")
    return digest, media


@v2.get(
    "/{name:path}/manifests/{reference}",
    responses=MANIFEST_READ | oci_errors(400, 401, 403, 404),
)
@v2.head(
    "/{name:path}/manifests/{reference}",
    operation_id="registry-head_manifest",
    responses=MANIFEST_READ | oci_errors(400, 401, 403, 404),
)
def get_manifest(
    name: str, reference: str, request: Request, caller: Reader, session: SessionDep, store: Store
) -> Response:
    check_scope(session, store, caller, repo_name(name), None)
    digest, media = resolve(session, store, name, reference)
    check_scope(session, store, caller, name, digest)
    data = store.read_small(digest, MAX_MANIFEST_BYTES)
    headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(data))}
    body = b"" if request.method == "HEAD" else data
    return Response(body, status_code=200, headers=headers, media_type=media)


def tag_manifest(session: Session, name: str, tag: str, digest: str, media: str) -> None:
    """Point ``name:tag`` at ``digest``; the same digest again is a no-op (pushes retry).

    A version tag is immutable: re-pointing ``demo:1.0.0`` would change what a version means
    under devices that run it and under rollouts that name it, and idle devices would never
    hear of it (their desired state names the old digest). So it is refused with 409; the new
    content is a new version. Only the ``sha256-<hex>`` referrers tags move (each push merges
    its signatures into the index there); channels are rows of their own, not tags. Two pushes
    of one new tag at once meet on the unique key: the loser is judged like a late pusher."""
    query = select(RegistryTag).where(RegistryTag.repository == name, RegistryTag.tag == tag)
    row = session.scalar(query)
    if row is not None and row.digest != digest and not SIGNATURE_TAG.match(tag):
        raise immutable(name, tag, row.digest)
    if row is not None and row.digest == digest:
        return
    row = row or RegistryTag(repository=name, tag=tag)
    row.digest, row.media_type, row.updated_at = digest, media, utcnow()
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        won = session.scalar(query)
        if won is None or won.digest == digest or SIGNATURE_TAG.match(tag):
            raise
        raise immutable(name, tag, won.digest) from None


def check_tag(session: Session, name: str, tag: str, hexdigest: str) -> None:
    """409 when ``name:tag`` is a version tag naming another digest (see ``tag_manifest``)."""
    if SIGNATURE_TAG.match(tag):
        return
    query = select(RegistryTag.digest).where(RegistryTag.repository == name, RegistryTag.tag == tag)
    current = session.scalar(query)
    if current is not None and current != "sha256:" + hexdigest:
        raise immutable(name, tag, current)


def immutable(name: str, tag: str, digest: str) -> OciError:
    return OciError(
        409,
        "DENIED",
        f"{name}:{tag} already names {digest}; versions are immutable: push the new content "
        "as a new version (build the bundle with another --version)",
    )


def version_signed(request: Request, session: Session, name: str, reference: str) -> None:
    """The signature of a bundle arrived (its ``sha256-<hex>`` tag, pushed last): the version
    it signs is complete, and blueprints waiting for it can start rolling it out."""
    subject = "sha256:" + reference.removeprefix("sha256-")
    versions = session.scalars(
        select(RegistryTag.tag).where(RegistryTag.repository == name, RegistryTag.digest == subject)
    ).all()
    services: Services = request.app.state.services
    ctx = services.context()
    for version in versions:
        reconcile_pushed(session, name, version, ctx=ctx)
    reconcile_adapter(session, name, ctx=ctx)  # an adapter's: its rollouts may start now


@v2.put(
    "/{name:path}/manifests/{reference}",
    status_code=201,
    response_class=Response,
    responses=oci_errors(400, 401, 403, 409, 413),
    openapi_extra=raw_body(MT_MANIFEST, MT_INDEX, description="an OCI manifest or index"),
)
async def put_manifest(
    name: str, reference: str, request: Request, caller: Pusher, session: SessionDep, store: Store
) -> Response:
    repo_name(name)
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > MAX_MANIFEST_BYTES:
            raise OciError(413, "SIZE_INVALID", f"manifest over {MAX_MANIFEST_BYTES} bytes")
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    by_digest = bool(DIGEST_RE.match(reference))
    if not by_digest and not _TAG_RE.match(reference):
        raise OciError(400, "TAG_INVALID", f"invalid tag {reference!r}")
    if by_digest and reference != "sha256:" + hashlib.sha256(data).hexdigest():
        raise OciError(400, "DIGEST_INVALID", f"manifest content does not match {reference}")
    tag = None if by_digest else reference
    if tag is not None:  # refused before anything is stored (tag_manifest checks again)
        await run_in_threadpool(check_tag, session, name, tag, hashlib.sha256(data).hexdigest())
    media, digest = await run_in_threadpool(
        check_manifest, store, bytes(data), content_type, name, tag
    )
    if not by_digest:
        await run_in_threadpool(tag_manifest, session, name, reference, digest, media)
        if SIGNATURE_TAG.match(reference):
            await run_in_threadpool(version_signed, request, session, name, reference)
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
    return Response(status_code=201, headers=headers)


@v2.get("/{name:path}/tags/list", responses=oci_errors(400, 401, 403, 404))
def list_tags(
    name: str,
    caller: Reader,
    session: SessionDep,
    store: Store,
    n: Annotated[int | None, Query(ge=0)] = None,
    last: str | None = None,
) -> JSONResponse:
    check_scope(session, store, caller, repo_name(name), None)
    query = select(RegistryTag.tag).where(RegistryTag.repository == name)
    tags = sorted(session.scalars(query))
    if not tags:
        raise OciError(404, "NAME_UNKNOWN", f"repository {name!r} has no tags")
    tags = [t for t in tags if last is None or t > last][:n]
    return JSONResponse({"name": name, "tags": tags})


router = APIRouter()
router.include_router(v2)
