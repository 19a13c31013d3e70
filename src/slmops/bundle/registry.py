"""Push and pull bundles (OCI image layouts) over the OCI Distribution API, with resume.

Works at the layout level only (index.json, blobs/sha256/<hex>) so that any OCI layout holding
a bundle index moves, whoever built it. Everything received is untrusted: a digest must match
`^sha256:[0-9a-f]{64}$` before it names a file, manifests over 4 MiB and blobs longer than their
descriptor are refused, and every byte is hashed while it streams (constant memory).

Signatures: the registries we target (distribution 2.8) have no referrers API, so signature
manifests are pushed by digest and listed in an OCI image index under the referrers tag-schema
fallback tag `sha256-<hex of the bundle digest>` (OCI distribution spec 1.1). A push merges its
signatures into the index already there, so several signers accumulate instead of the latest
replacing the others. A pull accepts that index, or a single manifest under the tag.

Authentication: an optional bearer token (`token=`, sent as `Authorization: Bearer`), as the
slmops control plane takes; no token exchange. Not supported yet: cross-repo blob mounts,
parallel transfers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.bundle._registry_http import (  # noqa: F401  (re-exported)
    ACCEPT,
    CHUNK_SIZE,
    MONOLITHIC_LIMIT,
    PIECE,
    RegistryError,
    RegistryIntegrityError,
    _file_range,
    _Registry,
)
from slmops.bundle.media import (
    ANN_BUNDLE_NAME,
    ANN_REF_NAME,
    ANN_VERSION,
    ARTIFACT_SIGNATURE,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_MANIFEST,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
)
from slmops.bundle.oci_ref import (
    Desc,
    OciContentError,
    OciRef,
    load_manifest,
    parse_oci_ref,
    referrers_tag,
    signs,
    walk,
)
from slmops.core.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from slmops.core.digest import sha256_bytes
from slmops.core.errors import UserInputError


@dataclass(frozen=True)
class PushStats:
    blobs_uploaded: int
    blobs_skipped: int
    bytes_uploaded: int
    manifests_put: int
    digest: str
    chunked_blobs: int = 0


@dataclass(frozen=True)
class PullStats:
    blobs_downloaded: int
    bytes_downloaded: int
    bytes_resumed: int
    digest: str
    signatures: int = 0


def _local_fetch(layout: Path) -> Callable[[Desc], bytes]:
    """Read manifests from a layout, checking size and digest: push never sends what it lists
    under another digest."""

    def fetch(desc: Desc) -> bytes:
        path = layout / "blobs" / "sha256" / desc.hex
        size = path.stat().st_size if path.is_file() else -1
        if size != desc.size or size > MAX_MANIFEST_BYTES:
            raise UserInputError(
                f"manifest blob missing or not {desc.size} bytes",
                where=path,
                hint="the layout is incomplete or damaged; rebuild it",
            )
        data = path.read_bytes()
        if sha256_bytes(data) != desc.digest:
            raise OciContentError("manifest content does not match its digest", where=path)
        return data

    return fetch


def _read_layout(layout: Path, tag: str | None) -> tuple[Desc, str, list[Desc]]:
    """The bundle index to push, the tag to push it under, and its signature manifests."""
    index_path = layout / "index.json"
    try:
        entries = json.loads(index_path.read_text()).get("manifests") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise UserInputError(
            f"not an OCI image layout: {exc}",
            where=index_path,
            hint="pass the folder that `slmops bundle` wrote",
        ) from None
    descs = [
        (Desc.parse(e, str(index_path)), (e.get("annotations") or {}).get(ANN_REF_NAME))
        for e in entries
    ]
    roots = [(d, name) for d, name in descs if d.media_type == MT_INDEX]
    if len(roots) > 1:
        roots = [(d, name) for d, name in roots if name == tag]
    if len(roots) != 1 or not (tag or roots[0][1]):
        raise UserInputError(
            "cannot tell which bundle index to push, or under which tag",
            where=index_path,
            hint="give the version as the ref's :TAG",
        )
    root, name = roots[0]
    fetch, signatures = _local_fetch(layout), []
    for desc, _ in descs:
        if desc.media_type == MT_MANIFEST:
            obj = load_manifest(fetch(desc), desc)[0]
            if signs(obj, root.digest):
                signatures.append(Desc(MT_MANIFEST, desc.digest, desc.size, ARTIFACT_SIGNATURE))
    return root, str(tag or name), signatures


def push(
    layout_dir: Path,
    ref: str | OciRef,
    *,
    chunk_size: int = CHUNK_SIZE,
    monolithic_limit: int = MONOLITHIC_LIMIT,
    allow_http: bool = False,
    timeout: float = 60.0,
    token: str | None = None,
) -> PushStats:
    """Push the bundle in an OCI layout: blobs, manifests children-first, tag, signatures.

    Blobs and manifests the registry already has are skipped (a HEAD each), so a re-push of an
    unchanged bundle moves no blob bytes. The tag goes on only after everything it points to is
    in, so a reader never sees a tag whose content is incomplete. Without a tag in `ref`, the
    layout's ref.name annotation (the version) is the tag.
    """
    oref = parse_oci_ref(ref) if isinstance(ref, str) else ref
    layout = Path(layout_dir)
    if chunk_size <= 0 or monolithic_limit < 0:
        raise UserInputError("chunk_size must be > 0 and monolithic_limit >= 0", where="push")
    root, tag, signatures = _read_layout(layout, oref.tag)
    if oref.digest and oref.digest != root.digest:
        raise UserInputError(
            f"the layout's bundle is {root.digest}",
            where=str(oref),
            hint="drop @sha256:... from the reference or push the right layout",
        )
    check_signed_name(_local_fetch(layout)(root), oref.repository, tag, where=str(oref))
    manifests, blobs = walk([root, *signatures], _local_fetch(layout))
    reg = _Registry(oref, allow_http=allow_http, timeout=timeout, token=token)
    uploaded = skipped = sent = puts = chunked = 0
    with reg.client:
        reg.ping()
        for desc in blobs.values():
            path = layout / "blobs" / "sha256" / desc.hex
            if not path.is_file() or path.stat().st_size != desc.size:
                raise UserInputError(
                    f"blob missing or not {desc.size} bytes",
                    where=path,
                    hint="the layout is incomplete or damaged; rebuild it",
                )
            if reg.has("blobs", desc.digest):
                skipped += 1
                continue
            chunked += reg.upload(path, desc, chunk_size, monolithic_limit)
            uploaded, sent = uploaded + 1, sent + desc.size
        for digest, (desc, data) in manifests.items():
            reference = tag if digest == root.digest else digest
            if reg.has("manifests", reference) != digest:
                reg.put_manifest(reference, desc, data)
                puts += 1
        if signatures:
            puts += _push_referrers(reg, root, signatures)
    return PushStats(uploaded, skipped, sent, puts, root.digest, chunked)


def check_signed_name(index: bytes, repository: str, tag: str, *, where: str) -> None:
    """Refuse (exit 2, before any upload) a push under another name or version than the one
    the bundle signs: the agent checks the signed name:version against its desired state, so
    such a push would succeed and every device would then fail at verifying.

    The repository may carry a namespace in front of the name (``org/assistant`` for a bundle
    named ``assistant`` on a general OCI registry); slmops's own registry wants the exact name
    and refuses the manifest otherwise."""
    try:
        notes = json.loads(index).get("annotations") or {}
    except (ValueError, AttributeError):
        notes = {}
    notes = notes if isinstance(notes, dict) else {}
    name, version = notes.get(ANN_BUNDLE_NAME), notes.get(ANN_VERSION)
    if name is None:
        return  # not an slmops bundle (it would name itself): nothing to compare
    name_ok = repository == name or repository.endswith("/" + str(name))
    if not name_ok or version != tag:
        raise UserInputError(
            f"the bundle is signed as {name}:{version} but the reference names {repository}:{tag}",
            where=where,
            hint=f"push it as oci://HOST/{name}:{version} (the name and version it was built "
            "and signed with), or rebuild it with `slmops bundle --name ... --version ...`",
        )


def _push_referrers(reg: _Registry, root: Desc, signatures: list[Desc]) -> int:
    """Merge signature descriptors into the index under the `sha256-<hex>` tag; PUTs made."""
    tag = referrers_tag(root.digest)
    listed: list[dict[str, Any]] = []
    if (current := reg.manifest(tag)) is not None:
        obj = load_manifest(current[1], current[0])[0]
        if obj.get("mediaType") == MT_INDEX:
            listed = [c for c in obj.get("manifests") or [] if isinstance(c, dict)]
        else:  # a lone signature manifest put there by another tool: keep it
            listed = [
                Desc(MT_MANIFEST, current[0].digest, current[0].size, ARTIFACT_SIGNATURE).to_json()
            ]
    known = {d.get("digest") for d in listed}
    new = [s.to_json() for s in signatures if s.digest not in known]
    if not new:
        return 0
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": listed + new}
    data = json.dumps(index, separators=(",", ":")).encode()
    reg.put_manifest(tag, Desc(MT_INDEX, sha256_bytes(data), len(data)), data)
    return 1


@dataclass
class _Progress:
    blobs: int = 0
    bytes: int = 0
    resumed: int = 0
    stop_after: int | None = None  # test hook: abort once this many blob bytes are written


def _download(reg: _Registry, desc: Desc, dest: Path, prog: _Progress) -> None:
    """Fetch one blob into `dest`, resuming `<dest>.part` with a Range request when possible.

    Only a blob whose size and digest were checked gets its final name, so a complete file in
    the staging folder is trusted on the next run without hashing it again.
    """
    if dest.is_file() and dest.stat().st_size == desc.size:
        return
    part, digest = dest.with_name(dest.name + ".part"), hashlib.sha256()
    have = part.stat().st_size if part.is_file() else 0
    have = have if have <= desc.size else 0
    with contextlib.suppress(FileNotFoundError), part.open("rb") as fh:
        for offset in range(0, have, PIECE):  # the hash must cover the bytes already on disk
            digest.update(fh.read(min(PIECE, have - offset)))
    longer = OciContentError(
        f"blob longer than its descriptor ({desc.size} bytes)", where=desc.digest
    )
    if have < desc.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with reg.get(f"{reg.repo}/blobs/{desc.digest}", (200, 206), headers=headers) as resp:
            if resp.status_code == 206:
                if not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    got = resp.headers.get("Content-Range")
                    raise RegistryError(f"asked for bytes {have}-, got {got}", where=desc.digest)
                prog.resumed += have
            else:  # the registry ignored the Range: start over
                have, digest = 0, hashlib.sha256()
            remaining = desc.size - have
            if int(resp.headers.get("Content-Length", 0)) > remaining:
                raise longer
            with part.open("ab" if have else "wb") as fh:
                # iter_raw: pieces as they arrive, no re-chunking copy. Accept-Encoding identity
                # means raw bytes are the blob; anything else fails the digest check.
                for piece in resp.iter_raw():
                    if len(piece) > remaining:
                        raise longer
                    if prog.stop_after is not None and prog.bytes + len(piece) >= prog.stop_after:
                        fh.write(piece[: max(prog.stop_after - prog.bytes, 0)])
                        raise RegistryError(
                            f"pull stopped after {prog.stop_after} bytes (test hook)"
                        )
                    fh.write(piece)
                    digest.update(piece)
                    remaining -= len(piece)
                    prog.bytes += len(piece)
                fh.flush()
                os.fsync(fh.fileno())
        prog.blobs += 1
    if part.stat().st_size != desc.size or digest.hexdigest() != desc.hex:
        part.unlink()
        raise OciContentError(
            "downloaded blob does not match its size or digest",
            where=desc.digest,
            hint="the registry holds damaged content; pull again or re-push",
        )
    os.replace(part, dest)


def _signatures(reg: _Registry, root: Desc, cache: dict[str, bytes]) -> list[Desc]:
    """Signature manifests of `root` under the `sha256-<hex>` tag; a 404 means unsigned."""
    if (got := reg.manifest(referrers_tag(root.digest))) is None:
        return []
    tagged, data = got
    obj, children, _ = load_manifest(data, tagged)
    cache[tagged.digest] = data
    found = []
    for child in children if obj.get("mediaType") == MT_INDEX else [tagged]:
        if child.artifact_type not in (None, ARTIFACT_SIGNATURE):
            continue
        if child.digest not in cache:
            cache[child.digest] = _fetched(reg, child.digest)
        if signs(load_manifest(cache[child.digest], child)[0], root.digest):
            size = len(cache[child.digest])
            found.append(Desc(MT_MANIFEST, child.digest, size, ARTIFACT_SIGNATURE))
    return found


def _fetched(reg: _Registry, digest: str) -> bytes:
    got = reg.manifest(digest, digest)
    if got is None:  # cannot happen: by-digest fetches raise on 404
        raise RegistryError(f"manifest {digest} not found", where=reg.where)
    return got[1]


def _holds(out: Path, digest: str) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        entries = json.loads((out / "index.json").read_text()).get("manifests") or []
        return any(isinstance(e, dict) and e.get("digest") == digest for e in entries)
    return False


def pull(
    ref: str | OciRef,
    out_dir: Path,
    *,
    resume: bool = True,
    allow_http: bool = False,
    timeout: float = 60.0,
    token: str | None = None,
    _stop_after_bytes: int | None = None,
) -> PullStats:
    """Pull a bundle into a new OCI layout at `out_dir`, resuming an interrupted pull.

    Work happens in `<out_dir>.partial/`, kept across interruptions; `out_dir` appears (one
    rename) only when every manifest and blob is verified. An `out_dir` that already holds the
    same bundle is left alone. `_stop_after_bytes` aborts deterministically mid-blob (tests).
    """
    oref = parse_oci_ref(ref) if isinstance(ref, str) else ref
    out = Path(out_dir)
    staging = out.with_name(out.name + ".partial")
    blob_dir = staging / "blobs" / "sha256"
    reg = _Registry(oref, allow_http=allow_http, timeout=timeout, token=token)
    with reg.client:
        reg.ping()
        if (got := reg.manifest(oref.reference, oref.digest)) is None:
            raise RegistryError(
                f"tag {oref.tag!r} not found in {oref.repository}",
                where=str(oref),
                hint="check the tag, or pull by @sha256:<digest>",
            )
        root_obj = load_manifest(got[1], got[0])[0]
        root = Desc(root_obj.get("mediaType", got[0].media_type), got[0].digest, got[0].size)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if _holds(out, root.digest):
                return PullStats(0, 0, 0, root.digest)
            raise UserInputError(
                "output folder exists and is not empty",
                where=out,
                hint="choose a new or empty folder",
            )
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
        blob_dir.mkdir(parents=True, exist_ok=True)
        cache = {root.digest: got[1]}
        signatures = _signatures(reg, root, cache)

        def fetch(desc: Desc) -> bytes:
            data = cache.get(desc.digest) or _fetched(reg, desc.digest)
            if len(data) != desc.size:
                raise OciContentError(f"manifest size != descriptor {desc.size}", where=desc.digest)
            write_bytes_atomic(blob_dir / desc.hex, data)
            return data

        manifests, blobs = walk([root, *signatures], fetch)
        prog = _Progress(stop_after=_stop_after_bytes)
        for desc in blobs.values():
            _download(reg, desc, blob_dir / desc.hex, prog)
    for stale in blob_dir.iterdir():  # left by an earlier pull of another bundle into this folder
        if f"sha256:{stale.name}" not in manifests and f"sha256:{stale.name}" not in blobs:
            stale.unlink()
    annotations = root_obj.get("annotations")
    version = annotations.get(ANN_VERSION) if isinstance(annotations, dict) else None
    ref_name = oref.tag or (version if isinstance(version, str) else None)
    entries = [root.to_json({ANN_REF_NAME: ref_name} if ref_name else None)]
    entries += [s.to_json() for s in signatures]
    layout_version = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION})
    write_text_atomic(staging / OCI_LAYOUT_FILE, layout_version)
    write_json_atomic(
        staging / "index.json", {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}
    )
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return PullStats(prog.blobs, prog.bytes, prog.resumed, root.digest, len(signatures))
