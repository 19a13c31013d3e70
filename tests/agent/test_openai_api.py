"""The agent's OpenAI-compatible API, exercised with the official `openai` client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.agent.openai_api import Served, serve_in_thread
from slmops.protocol.device import GenerationDefaults
from slmops.runtimes import open_runtime


@pytest.fixture(scope="module")
def gguf(api_gguf: Path) -> Path:
    return api_gguf


@pytest.fixture(scope="module")
def api(gguf: Path) -> Iterator[tuple[str, dict[str, Served | None]]]:
    state: dict[str, Served | None] = {
        "served": Served(
            open_runtime(gguf, threads=2, n_ctx=256),
            "tiny:1.0.0/q8",
            GenerationDefaults(max_tokens=16),
        )
    }
    srv, _ = serve_in_thread(lambda: state["served"])
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", state
    srv.shutdown()


def _client(base: str):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=base, api_key="unused", max_retries=0)


def test_models_and_chat(api: tuple[str, dict]) -> None:
    base, _ = api
    client = _client(base)
    assert [m.id for m in client.models.list().data] == ["tiny:1.0.0/q8"]
    r = client.chat.completions.create(
        model="tiny:1.0.0/q8",
        messages=[{"role": "user", "content": "Return the"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 9 and r.usage.prompt_tokens > 3
    again = client.chat.completions.create(
        model="tiny:1.0.0/q8",
        messages=[{"role": "user", "content": "Return the"}],
        max_tokens=8,
        temperature=0,
    )
    assert again.choices[0].message.content == r.choices[0].message.content, (
        "greedy is deterministic"
    )


def test_streaming_matches_non_streaming(api: tuple[str, dict]) -> None:
    base, _ = api
    client = _client(base)
    kwargs = dict(
        model="m",
        messages=[{"role": "user", "content": "Return the"}],
        max_tokens=12,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_defaults(api: tuple[str, dict]) -> None:
    base, _ = api
    client = _client(base)
    r = client.completions.create(model="m", prompt="The function", temperature=0)
    assert r.object == "text_completion" and r.usage is not None
    assert r.usage.completion_tokens <= 17, "the blueprint default max_tokens (16) applies"
    stream = list(
        client.completions.create(
            model="m", prompt="The function", max_tokens=5, stream=True, temperature=0
        )
    )
    assert stream and all(c.object == "text_completion" for c in stream)


def test_errors(api: tuple[str, dict]) -> None:
    base, state = api
    r = httpx.post(f"{base}/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{base}/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{base}/nope").status_code == 404
    served, state["served"] = state["served"], None
    try:
        from openai import APIStatusError

        with pytest.raises(APIStatusError) as exc:
            _client(base).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert exc.value.status_code == 503 and "no model is active" in str(exc.value)
        assert httpx.get(f"{base}/models").json()["data"] == []
    finally:
        state["served"] = served


# --- hardening (issue 11, #6): framing, timeouts, Host, queue, API key ------------------------

KEY = "k3y-" + "x" * 28


@pytest.fixture(scope="module")
def guarded(gguf: Path) -> Iterator[Any]:
    """A second API with an API key, a short socket timeout and a queue of one."""
    served = Served(open_runtime(gguf, threads=2, n_ctx=256), "m", GenerationDefaults(max_tokens=4))
    srv, _ = serve_in_thread(
        lambda: served, api_key=lambda: KEY, request_timeout=1.0, max_waiting=1
    )
    yield srv
    srv.shutdown()
    srv.server_close()


def raw(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes (or `wait`); (answer, seconds taken)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                got += chunk
    return got, time.monotonic() - t0


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def post(port: int, headers: str, body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
    head += f"Authorization: Bearer {KEY}\r\n{headers}\r\n"
    return raw(port, head.encode() + body)[0]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Content-Length: -1\r\n", 400),  # before: passed the size check, read until close
        ("Content-Length: abc\r\n", 400),
        ("Content-Length: 1e3\r\n", 400),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
        ("", 411),
        ("Transfer-Encoding: chunked\r\n", 411),
        (f"Content-Length: {(1 << 20) + 1}\r\n", 413),
        ("Content-Length: 99999999999\r\n", 413),
    ],
)
def test_strict_content_length_answers_before_reading(
    guarded: Any, headers: str, status: int
) -> None:
    """The body is never sent: each must be answered at once, never read until close."""
    port = guarded.server_address[1]
    t0 = time.monotonic()
    answer = post(port, headers)
    assert status_of(answer) == status, answer[:300]
    assert time.monotonic() - t0 < 2.0, "answered without waiting for a body"
    assert b"Connection: close" in answer


def test_a_stalled_client_is_dropped(guarded: Any) -> None:
    port = guarded.server_address[1]
    answer, took = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", 10.0)
    assert answer == b"" and took < 5.0, (answer, took)  # request_timeout is 1 s
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    answer, took = raw(  # a body promised and not sent: dropped too
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) + 10}\r\n\r\n".encode()
        + body,
        10.0,
    )
    assert took < 5.0 and status_of(answer) in (0, 400), answer


def test_a_trickling_client_is_dropped_at_the_header_deadline() -> None:
    """One byte every 0.5 s never trips the 1 s socket timeout; the 2 s header deadline ends it."""
    srv, _ = serve_in_thread(lambda: None, request_timeout=1.0, header_timeout=2.0)
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as s:
            with contextlib.suppress(OSError):
                for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
                    s.sendall(bytes([byte]))
                    time.sleep(0.5)
                    if time.monotonic() - t0 > 8:
                        break
            took = time.monotonic() - t0  # sending failed: the server shut the socket
    finally:
        srv.shutdown()
        srv.server_close()
    assert took < 6, f"the trickle held its connection for {took:.1f} s"


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 421),  # DNS rebinding: the page's own name
        ("evil.example:{port}", 421),
        ("127.0.0.1:1", 421),
        ("localhost:{port}", 200),
        ("127.0.0.1:{port}", 200),
        ("[::1]:{port}", 200),
        ("LOCALHOST", 200),
    ],
)
def test_host_header_must_name_this_server(guarded: Any, host: str, status: int) -> None:
    port = guarded.server_address[1]
    req = f"GET /v1/models HTTP/1.1\r\nHost: {host.format(port=port)}\r\n"
    req += f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    answer, _ = raw(port, req.encode())
    assert status_of(answer) == status, answer[:300]
    no_host = f"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    assert status_of(raw(port, no_host.encode())[0]) == 400


def test_api_key_is_required_on_every_route(guarded: Any) -> None:
    base = f"http://127.0.0.1:{guarded.server_address[1]}/v1"
    r = httpx.get(f"{base}/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{base}/chat/completions", json={}).status_code == 401
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=base, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["m"]
    r2 = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r2.choices[0].message.role == "assistant"


def test_queue_is_bounded_429_with_retry_after(guarded: Any) -> None:
    """One generation runs, one waits (max_waiting=1): the next request gets 429 at once."""
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    runner = threading.Thread(target=guarded.inference.run, args=(hold,), daemon=True)
    runner.start()
    assert started.wait(10)
    waiter = threading.Thread(target=guarded.inference.run, args=(lambda: None,), daemon=True)
    waiter.start()
    time.sleep(0.2)
    try:
        base = f"http://127.0.0.1:{guarded.server_address[1]}/v1"
        r = httpx.post(
            f"{base}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
        assert r.json()["error"]["type"] == "overloaded"
    finally:
        release.set()
        runner.join(10)
        waiter.join(10)


def test_bound_to_loopback_by_default() -> None:
    from slmops.agent.config import AgentConfig

    assert AgentConfig(server="http://127.0.0.1:1", data_dir=Path("d")).api_host == "127.0.0.1"
    srv, _ = serve_in_thread(lambda: None)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.shutdown()
        srv.server_close()
