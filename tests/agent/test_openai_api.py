"""The agent's OpenAI-compatible API, exercised with the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import run_pass
from slmops.agent.openai_api import Served, serve_in_thread
from slmops.protocol.device import GenerationDefaults
from slmops.runtimes import open_runtime


@pytest.fixture(scope="module")
def gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api")
    run_pass("export-gguf", {"outtype": "f16"}, tiny_model, root / "f16")
    run_pass("quantize-gguf", {"type": "Q8_0"}, root / "f16", root / "q8")
    return root / "q8"


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
