"""Property-based fuzz of the agent API's request parsing, over a raw socket (issue 11).

Random methods, paths, HTTP versions, headers (Host, Authorization, Content-Length and
Transfer-Encoding chosen to be wrong in many ways) and bodies (random bytes, or JSON shaped
like an OpenAI request with random values) against a real server over a real model. Every
request must get an answer that is not a 5xx, or, when it promised more body than it sent, be
dropped after the socket timeout; nothing may hang; the process RSS stays bounded.

Bounded: 100 examples, each with a short socket timeout, well under a minute in all.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.agent.openai_api import OpenAIServer, Served, serve_in_thread
from slmops.protocol.device import GenerationDefaults
from slmops.runtimes import open_runtime

KEY = "fuzz-key-" + "z" * 24
TIMEOUT = 1.0  # the server's socket timeout: a stalled request is dropped after it
DEADLINE = 8.0  # no answer (or close) within this is a hang


@pytest.fixture(scope="module")
def server(api_gguf: Path) -> Iterator[OpenAIServer]:
    served = Served(
        open_runtime(api_gguf, threads=2, n_ctx=256), "m", GenerationDefaults(max_tokens=4)
    )
    srv, _ = serve_in_thread(lambda: served, api_key=lambda: KEY, request_timeout=TIMEOUT)
    yield srv
    srv.shutdown()
    srv.server_close()


token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-_0123456789"), min_size=1, max_size=12)
header_value = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\r\n"), max_size=40
)
json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | header_value
json_any = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(header_value, c, max_size=3),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
        "content": header_value
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": header_value}), max_size=2
        )
        | json_any,
    }
)
openai_body = st.fixed_dictionaries(
    {"model": st.just("m") | json_any},
    optional={
        "messages": st.lists(message, max_size=3) | json_any,
        "prompt": header_value | json_any,
        "max_tokens": st.integers(-2, 8) | json_any,
        "temperature": st.floats(-1, 3) | json_any,
        "top_p": st.floats(-1, 2) | json_any,
        "stream": st.booleans() | json_any,
        "stop": header_value | st.lists(header_value, max_size=2) | json_any,
        "n": st.integers(0, 3),
        "rating": st.sampled_from(["up", "down", "sideways"]),
        "response_id": header_value,
    },
).map(lambda d: json.dumps(d).encode())
valid_chat = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": header_value}),
            min_size=1,
            max_size=2,
        ),
        "max_tokens": st.integers(1, 4),
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
    },
    optional={"stop": st.lists(header_value, max_size=2), "user": json_any},
).map(lambda d: json.dumps(d).encode())
bodies = (
    valid_chat
    | openai_body
    | st.binary(max_size=512)
    | json_any.map(lambda v: json.dumps(v).encode())
)


@st.composite
def requests(draw: Any, port: int) -> tuple[bytes, bool]:
    """(raw request bytes, whether it promised more body than it sent)."""
    if draw(st.integers(0, 9)) < 4:  # a well-formed generation with random content
        body = draw(valid_chat)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body, False
    # mostly well-formed, so the fuzz reaches the parsing behind each early refusal
    method = draw(st.sampled_from(["GET"] * 2 + ["POST"] * 8 + ["PUT", "HEAD", "DELETE", "FOO"]))
    path = draw(
        st.sampled_from(
            ["/v1/models"]
            + ["/v1/chat/completions"] * 4
            + ["/v1/completions"] * 2
            + ["/v1/feedback", "/", "/v1/"]
        )
        | token.map(lambda t: "/" + t)
    )
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "X"]))
    body = draw(bodies)
    headers: list[tuple[str, str]] = []
    hosts = [f"127.0.0.1:{port}"] * 6 + ["localhost", f"[::1]:{port}", "evil.example", "", None]
    host = draw(st.sampled_from(hosts) | header_value) if draw(st.booleans()) else hosts[0]
    if host is not None:
        headers.append(("Host", host))
    auths = [f"Bearer {KEY}"] * 6 + ["Bearer x", KEY, "", None]
    auth = draw(st.sampled_from(auths) | header_value) if draw(st.booleans()) else auths[0]
    if auth is not None:
        headers.append(("Authorization", auth))
    length = draw(
        st.sampled_from(["ok"] * 8 + ["none", "neg", "junk", "big", "two", "short", "long"])
    )
    promised_more = False
    if length == "ok":
        headers.append(("Content-Length", str(len(body))))
    elif length == "neg":
        headers.append(("Content-Length", "-1"))
    elif length == "junk":
        headers.append(("Content-Length", draw(header_value)))
    elif length == "big":
        headers.append(("Content-Length", str(draw(st.integers(1 << 20, 1 << 62)))))
    elif length == "two":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
    elif length == "short":
        headers.append(("Content-Length", str(max(0, len(body) - 1))))
    elif length == "long":
        headers.append(("Content-Length", str(len(body) + 5)))
        promised_more = True
    if draw(st.booleans()) and draw(st.booleans()):
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "gzip", "x"]))))
    headers += draw(st.lists(st.tuples(token, header_value), max_size=4))
    headers.append(("Connection", "close"))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8") + b"\r\n" + body, promised_more


def exchange(port: int, data: bytes) -> tuple[int, float]:
    """Send, then read the status line and until close; (status or 0, seconds)."""
    t0 = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            s.sendall(data)
        try:
            while (chunk := s.recv(65536)) and time.monotonic() - t0 < DEADLINE:
                got += chunk
        except ConnectionResetError:
            pass
    took = time.monotonic() - t0
    if not got.startswith(b"HTTP/"):
        return 0, took
    return int(got.split(b" ", 2)[1]), took


def test_fuzz_agent_api_requests(server: OpenAIServer) -> None:
    port = server.server_address[1]
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    seen: dict[int, int] = {}

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(port))
    def one(req: tuple[bytes, bool]) -> None:
        data, promised_more = req
        status, took = exchange(port, data)
        seen[status] = seen.get(status, 0) + 1
        assert took < DEADLINE, f"hung for {took:.1f} s on {data[:300]!r}"
        assert status < 500, f"{status} on {data[:300]!r}"
        if not promised_more:
            assert status != 0, f"no answer to {data[:300]!r}"

    one()
    grew = (proc.memory_info().rss - rss0) / 2**20
    print(
        f"fuzz: {sum(seen.values())} requests, statuses {sorted(seen.items())}, RSS +{grew:.1f} MiB"
    )
    assert grew < 64, f"RSS grew by {grew:.1f} MiB"
