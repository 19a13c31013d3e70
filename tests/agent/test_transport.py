"""The agent's one HTTP transport (transport.py) and the registry reads on it (oci_client.py).

Real sockets where the behaviour is the network's (keep-alive, proxies, redirects, streaming),
a FakeTransport where a registry must misbehave on purpose (wrong digests, ignored Range, error
envelopes). The control-plane client and the registry source share one transport, so they
share proxy, TLS and error behaviour; httpx is no longer imported by `slmops agent`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from slmops.agent.client import DeviceClient, Unreachable
from slmops.agent.fetch import RegistrySource
from slmops.agent.oci_client import ACCEPT, RegistryError
from slmops.agent.transport import (
    FakeTransport,
    HttpTransport,
    Request,
    TransportError,
    proxy_for,
    reply,
)
from slmops.bundle.layout import Descriptor
from slmops.bundle.oci_ref import OciContentError
from slmops.protocol.device import CheckIn, Inventory

BLOB = bytes(range(256)) * 64  # 16 KiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with 200 and what it saw; redirects /go to /target."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        body_len = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(body_len)
        type(self).seen.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers),
                "body": body,
                "port": self.client_address[1],
            }
        )
        if self.path.endswith("/go"):
            self.send_response(302)
            self.send_header("Location", self.headers["X-Redirect-To"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_HEAD = _answer


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Rec", (_Recorder,), {"seen": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def test_kept_alive_connection_is_reused(recorder: tuple[str, type[_Recorder]]) -> None:
    addr, handler = recorder
    t = HttpTransport(timeout=5)
    for _ in range(3):
        assert t.request("GET", f"http://{addr}/x").read() == b'{"path": "/x"}'
    t.close()
    assert len({s["port"] for s in handler.seen}) == 1, "one connection for three requests"


def test_redirect_to_another_host_drops_the_credential(
    recorder: tuple[str, type[_Recorder]],
) -> None:
    addr, handler = recorder
    other = addr.replace("127.0.0.1", "localhost")
    t = HttpTransport(timeout=5)
    headers = {"Authorization": "Bearer secret", "X-Redirect-To": f"http://{other}/target"}
    assert t.request("GET", f"http://{addr}/go", headers).status == 200
    first, second = handler.seen
    assert first["headers"]["Authorization"] == "Bearer secret"
    assert second["path"] == "/target" and "Authorization" not in second["headers"]


def test_proxy_from_the_environment_is_used_by_control_plane_and_registry_alike(
    recorder: tuple[str, type[_Recorder]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The recorder stands in for an HTTP proxy: it receives absolute-URI requests for hosts
    that are never resolved (nothing leaves the machine)."""
    addr, handler = recorder
    monkeypatch.setenv("HTTP_PROXY", f"http://{addr}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = DeviceClient("http://cp.invalid:8080", tmp_path)
    (tmp_path / "credential").write_text("c" * 40)
    with pytest.raises(Unreachable, match="not a DesiredState"):  # the proxy's own answer
        client.checkin(_checkin(), None)
    source = RegistrySource("http://registry.invalid:5000", "acme/bot", allow_http=True)
    source.get_referrers_tag("sha256-" + "0" * 64)
    paths = [s["path"] for s in handler.seen]
    assert paths[0] == "http://cp.invalid:8080/device/v1/checkin"
    assert paths[1].startswith("http://registry.invalid:5000/v2/acme/bot/manifests/sha256-")
    monkeypatch.setenv("NO_PROXY", "example.org,.invalid")
    assert proxy_for("http", "cp.invalid") is None and proxy_for("http", "x.invalid") is None
    assert proxy_for("http", "127.0.0.1") is None, "never for loopback"
    assert proxy_for("http", "other.org") == ("127.0.0.1", int(addr.split(":")[1]))


def _checkin() -> CheckIn:
    inv = Inventory(
        arch="x86_64",
        cores=2,
        ram_bytes=1 << 30,
        free_disk_bytes=1 << 30,
        agent_version="t",
        model_ram_bytes=1 << 29,
        model_cores=1,
    )
    return CheckIn(inventory=inv)


def test_network_failures_are_transport_errors_naming_the_url() -> None:
    t = HttpTransport(timeout=2)
    with pytest.raises(TransportError, match=r"127\.0\.0\.1:9/"):
        t.request("GET", "http://127.0.0.1:9/v2/")


# --- registry reads over a FakeTransport -------------------------------------------------------


def _registry(handler: Any) -> tuple[RegistrySource, FakeTransport]:
    fake = FakeTransport(handler)
    return RegistrySource("127.0.0.1:5000", "acme/bot", token="tok", transport=fake), fake


def test_manifest_get_sends_oci_accept_and_token_and_checks_digests() -> None:
    body = b'{"schemaVersion": 2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    def handler(req: Request) -> Any:
        if req.url.endswith("/manifests/lie"):
            return reply(200, body, {"Docker-Content-Digest": "sha256:" + "1" * 64})
        if req.url.endswith("/manifests/missing"):
            return reply(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}')
        return reply(200, body)

    source, fake = _registry(handler)
    assert source.get_manifest(digest) == body
    req = fake.requests[0]
    assert req.url == f"http://127.0.0.1:5000/v2/acme/bot/manifests/{digest}"
    assert req.headers["Accept"] == ACCEPT and req.headers["Authorization"] == "Bearer tok"
    with pytest.raises(OciContentError, match="content digest"):
        source.get_manifest("sha256:" + "2" * 64)  # bytes that do not hash to what was asked
    with pytest.raises(OciContentError, match="content digest"):
        source.get_referrers_tag("lie")
    assert source.get_referrers_tag("missing") is None
    with pytest.raises(RegistryError, match="MANIFEST_UNKNOWN: no"):
        source.manifest("missing", "sha256:" + "3" * 64)  # by digest: a 404 is an error


def test_blob_range_resume_and_registry_ignoring_range(tmp_path: Path) -> None:
    honour = {"range": True}

    def handler(req: Request) -> Any:
        rng = req.headers.get("Range")
        if rng and honour["range"]:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return reply(206, BLOB[start:], piece=1000)
        return reply(200, BLOB, piece=1000)

    source, fake = _registry(handler)
    desc = Descriptor.model_validate(
        {"mediaType": "application/octet-stream", "digest": BLOB_DIGEST, "size": len(BLOB)}
    )
    dest = tmp_path / "blob"
    dest.with_name("blob.part").write_bytes(BLOB[:5000])
    stats = source.fetch_blob(desc, dest)
    assert (stats.resumed, stats.bytes) == (5000, len(BLOB) - 5000)
    assert fake.requests[-1].headers["Range"] == "bytes=5000-"
    assert dest.read_bytes() == BLOB
    dest.unlink()
    honour["range"] = False  # a registry that ignores Range: start over, still right
    dest.with_name("blob.part").write_bytes(BLOB[:5000])
    stats = source.fetch_blob(desc, dest)
    assert stats.bytes == len(BLOB) and dest.read_bytes() == BLOB


def test_slmops_agent_no_longer_imports_httpx() -> None:
    code = (
        "import sys\n"
        "import slmops.agent.daemon, slmops.agent.client, slmops.agent.fetch\n"
        "import slmops.agent.install, slmops.agent.verify_variant, slmops.cli.agent\n"
        "print(','.join(m for m in ('httpx', 'httpcore', 'h11') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the agent imports {out.stdout.strip()}"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_verifies_against_a_ca_file_and_refuses_an_unknown_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    handler = type("Rec", (_Recorder,), {"seen": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{srv.server_address[1]}/v2/"
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    try:
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            HttpTransport(timeout=5).request("GET", url)
        assert HttpTransport(timeout=5, ca_file=str(cert)).request("GET", url).status == 200
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the same for the control plane client
        client = DeviceClient(f"https://127.0.0.1:{srv.server_address[1]}", tmp_path)
        (tmp_path / "credential").write_text("c" * 40)
        with pytest.raises(Unreachable, match="not a DesiredState"):  # reached over TLS
            client.checkin(_checkin(), None)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_redirect_never_takes_a_request_off_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """https -> http to a remote host is refused before anything is sent there (the credential
    would travel in clear); to a loopback host it is followed. The seam is the one-request
    method: no TLS server is needed to show what the redirect loop does with the answer."""
    from slmops.agent.transport import Response

    sent: list[tuple[str, dict[str, str]]] = []

    def once(
        method: str, url: str, headers: dict[str, str], body: bytes, stream: bool, t: float
    ) -> Response:
        sent.append((url, dict(headers)))
        if url.startswith("https://"):
            target = url.replace("https://reg.example", "http://" + monkeypatch_target[0])
            return Response(302, "Found", {"location": target})
        return Response(200, "OK", {})

    t = HttpTransport(timeout=5)
    monkeypatch.setattr(t, "_once", once)
    monkeypatch_target = ["reg.example"]
    with pytest.raises(TransportError, match="https to plain http"):
        t.request("GET", "https://reg.example/v2/x", {"Authorization": "Bearer s"})
    assert [u for u, _ in sent] == ["https://reg.example/v2/x"]
    sent.clear()
    monkeypatch_target[0] = "127.0.0.1:5000"
    assert t.request("GET", "https://reg.example/v2/x", {"Authorization": "Bearer s"}).status == 200
    assert sent[1][0] == "http://127.0.0.1:5000/v2/x" and "Authorization" not in sent[1][1]
