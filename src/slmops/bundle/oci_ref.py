"""Names of OCI content: `oci://` references, digests, descriptors and the manifest graph.

`parse_oci_ref` reads `oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]` and picks the base URL;
`Desc`, `load_manifest` and `walk` read untrusted manifests without doing any I/O themselves.

Parsing is strict because every part ends up in a URL path or a file name: a digest that is not
exactly `sha256:` plus 64 lowercase hex digits is refused, so a registry or a user can never
smuggle `../` into the staging directory through a digest. Malformed input raises
`OciRefError` (exit code 2) naming the part that was wrong.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slmops.bundle.media import ARTIFACT_SIGNATURE, MAX_BLOB_BYTES, MT_INDEX, MT_MANIFEST
from slmops.core.errors import CheckFailedError, UserInputError

SCHEME = "oci://"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
# Repository path components and tags as the OCI distribution spec defines them.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*\Z"
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
Json = dict[str, Any]
_EXAMPLE = "oci://127.0.0.1:5000/models/demo:1.0.0 or oci://HOST:PORT/REPO@sha256:<64 hex>"


class OciRefError(UserInputError):
    """A malformed `oci://` reference or digest (exit code 2)."""


def check_digest(digest: object, *, where: str = "digest") -> str:
    """Return `digest` if it is `sha256:<64 lowercase hex>`, else raise OciRefError."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise OciRefError(
            f"invalid digest {digest!r}: expected sha256: followed by 64 lowercase hex digits",
            where=where,
            hint="only sha256 digests are supported",
        )
    return digest


@dataclass(frozen=True)
class OciRef:
    """A parsed reference. `host` is without brackets; `port` is None when the ref gave none."""

    host: str
    port: int | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def netloc(self) -> str:
        """`host:port` as used in URLs and error messages (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port is not None else host

    @property
    def reference(self) -> str:
        """What to fetch: the digest when given (immutable), else the tag."""
        ref = self.digest or self.tag
        if ref is None:
            raise OciRefError(
                "reference names neither a tag nor a digest", where=str(self), hint=_EXAMPLE
            )
        return ref

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def base_url(self, *, allow_http: bool = False) -> str:
        """http:// only for loopback hosts or when explicitly allowed; https otherwise."""
        scheme = "http" if (self.is_loopback or allow_http) else "https"
        return f"{scheme}://{self.netloc}"

    def __str__(self) -> str:
        text = f"{SCHEME}{self.netloc}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _parse_host(netloc: str, text: str) -> tuple[str, int | None]:
    port: int | None = None
    if netloc.startswith("["):
        host, sep, rest = netloc[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise OciRefError(f"malformed IPv6 host {netloc!r}", where=text, hint=_EXAMPLE)
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise OciRefError(f"invalid IPv6 address {host!r}", where=text) from None
    else:
        host, sep, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if sep else None
        if not _HOSTNAME_RE.match(host):
            raise OciRefError(f"invalid registry host {host!r}", where=text, hint=_EXAMPLE)
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise OciRefError(
                f"invalid port {port_text!r}: expected 1-65535", where=text, hint=_EXAMPLE
            )
        port = int(port_text)
    return host, port


def parse_oci_ref(text: str) -> OciRef:
    """Parse `oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]`; raise OciRefError when malformed."""
    if not isinstance(text, str) or not text.startswith(SCHEME):
        raise OciRefError(
            f"not an oci:// reference: {text!r}", where="reference", hint=f"use {_EXAMPLE}"
        )
    rest = text[len(SCHEME) :]
    netloc, slash, path = rest.partition("/")
    if not netloc or not slash or not path:
        raise OciRefError(
            "reference needs a registry host and a repository", where=text, hint=_EXAMPLE
        )
    host, port = _parse_host(netloc, text)
    digest: str | None = None
    if "@" in path:
        path, _, digest_text = path.partition("@")
        digest = check_digest(digest_text, where=text)
    tag: str | None = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise OciRefError(
                f"invalid tag {tag!r}: letters, digits, '_', '.', '-' (max 128, no leading . or -)",
                where=text,
            )
    if not _REPO_RE.match(path) or len(path) > 255:
        raise OciRefError(
            f"invalid repository {path!r}: lowercase letters, digits and separators . _ - /",
            where=text,
            hint=_EXAMPLE,
        )
    return OciRef(host=host, port=port, repository=path, tag=tag, digest=digest)


class OciContentError(CheckFailedError):
    """Content broke its descriptor: wrong digest or size, malformed, or over a limit (exit 1)."""


@dataclass(frozen=True)
class Desc:
    """The fields of an OCI descriptor that transfer needs, validated."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None

    @staticmethod
    def parse(obj: object, where: str) -> Desc:
        if not isinstance(obj, dict) or not isinstance(obj.get("mediaType"), str):
            raise OciContentError("malformed descriptor (no mediaType)", where=where)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_BYTES:
            raise OciContentError(f"descriptor size {size!r} is invalid", where=where)
        art = obj.get("artifactType")
        return Desc(
            obj["mediaType"], check_digest(obj.get("digest"), where=where), size, art or None
        )

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def to_json(self, annotations: dict[str, str] | None = None) -> Json:
        out: Json = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if annotations:
            out["annotations"] = annotations
        return out


def load_manifest(data: bytes, desc: Desc) -> tuple[Json, list[Desc], list[Desc]]:
    """Parse a manifest or index: (json, child manifests, blobs: config and layers)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise OciContentError("manifest is not JSON", where=desc.digest) from None
    if not isinstance(obj, dict):
        raise OciContentError("manifest is not a JSON object", where=desc.digest)
    media_type = obj.get("mediaType", desc.media_type)
    for key in ("manifests", "layers"):  # {"manifests": 5} is malformed, not a crash
        if not isinstance(obj.get(key) or [], list):
            raise OciContentError(f"manifest field {key!r} is not a list", where=desc.digest)
    if media_type == MT_INDEX:
        return obj, [Desc.parse(d, desc.digest) for d in obj.get("manifests") or []], []
    if media_type == MT_MANIFEST:
        blobs = [Desc.parse(obj.get("config"), desc.digest)]
        return obj, [], blobs + [Desc.parse(d, desc.digest) for d in obj.get("layers") or []]
    raise OciContentError(f"unsupported manifest media type {media_type!r}", where=desc.digest)


def walk(
    roots: list[Desc], fetch: Callable[[Desc], bytes]
) -> tuple[dict[str, tuple[Desc, bytes]], dict[str, Desc]]:
    """Manifests reachable from `roots`, children first (the order a registry accepts them),
    and the blobs (configs, layers) they reference, each once. `fetch` returns verified bytes."""
    manifests: dict[str, tuple[Desc, bytes]] = {}
    blobs: dict[str, Desc] = {}

    def visit(desc: Desc, depth: int) -> None:
        if depth > 4:
            raise OciContentError("manifests nested deeper than 4 levels", where=desc.digest)
        if desc.digest in manifests:
            return
        data = fetch(desc)
        _, children, layers = load_manifest(data, desc)
        for child in children:
            visit(child, depth + 1)
        for blob in layers:
            blobs.setdefault(blob.digest, blob)
        manifests[desc.digest] = (desc, data)

    for root in roots:
        visit(root, 0)
    return manifests, blobs


def signs(manifest: Json, digest: str) -> bool:
    """Whether a parsed manifest is an slmops signature whose subject is `digest`."""
    subject = manifest.get("subject")
    return (
        manifest.get("artifactType") == ARTIFACT_SIGNATURE
        and isinstance(subject, dict)
        and subject.get("digest") == digest
    )


def referrers_tag(digest: str) -> str:
    """The OCI 1.1 referrers tag-schema fallback tag of `digest`: `sha256-<hex>`."""
    return check_digest(digest).replace(":", "-")
