"""An OpenAI-compatible HTTP API over the active model: /v1/models, /v1/chat/completions and
/v1/completions, streaming (server-sent events) and not.

Standard library only (http.server): the agent must stay lean, and one device serves one model
to local clients, so a threaded server with one generation at a time (runtimes are not
thread-safe) is the honest design. Requests are validated; errors use OpenAI's error shape so
existing clients show them. While no model is active every model route answers 503.

Streaming sends one server-sent event per token as soon as it is decoded: Nagle's algorithm is
off on the socket (otherwise a small write waits for the client's delayed ACK, up to 40 ms), each
event is a single write, and its JSON is the request's constant envelope, encoded once, around
the token's text, so the server adds as little as possible to the time between two tokens.

Each request (and each error) is counted by an optional ``Recorder`` (the agent's telemetry
aggregator): time to first token, total latency, decode tokens/s, token counts and, when the
recorder asks for them, the per-token log-probabilities and entropies the runtime reports.
``POST /v1/feedback`` takes a thumbs up or down on a response id this server issued recently.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.agent.inference_thread import InferenceThread
from slmops.protocol.device import GenerationDefaults
from slmops.runtimes.base import Runtime, TokenStats

MAX_BODY = 1 << 20


@dataclass
class Served:
    runtime: Runtime
    model_id: str
    defaults: GenerationDefaults


Provider = Callable[[], Served | None]
RECENT_RESPONSES = 4096


class Recorder(Protocol):
    """What the API reports to; the agent's telemetry ``Aggregator`` is one."""

    def wants_quality(self) -> bool: ...

    def record_request(
        self,
        *,
        ttft_ms: float,
        latency_ms: float,
        prompt_tokens: int,
        output_tokens: int,
        decode_tps: float,
        error: str | None = None,
        logprobs: list[float] | None = None,
        entropies: list[float] | None = None,
    ) -> None: ...

    def record_feedback(self, up: bool) -> None: ...

    def offer_sample(self, prompt: str, response: str) -> bool: ...


@dataclass
class Timing:
    """When a generation started and produced its first and last token."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not use (user, seed, logprobs...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, gt=0, le=8192)
    max_completion_tokens: int | None = Field(None, gt=0, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _generate(
    served: Served,
    ids: list[int],
    req: _Sampling,
    counted: list[int] | None = None,
    *,
    stats: TokenStats | None = None,
    timing: Timing | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Yield (text delta, finish reason or None); stops at EOS, a stop string or max tokens.
    ``counted[0]`` is kept at the number of tokens generated (EOS not counted); ``stats`` gets
    each token's log-prob and entropy (only asked for when telemetry wants them), ``timing``
    the first and last token times."""
    d = served.defaults
    max_tokens = req.max_completion_tokens or req.max_tokens or d.max_tokens
    temperature = d.temperature if req.temperature is None else req.temperature
    stops = _stops(req.stop)
    rt = served.runtime
    out: list[int] = []
    text = ""
    # Incremental detokenization (as transformers' TextStreamer does): decode only a short window
    # since the last clean boundary, so each token costs O(1) instead of re-decoding everything.
    prefix = read = 0
    stream = (
        rt.stream(ids, max_tokens, temperature)
        if stats is None
        else rt.stream(ids, max_tokens, temperature, stats=stats)
    )
    for tok in stream:
        if timing is not None:
            timing.end = time.perf_counter()
            if timing.first is None:
                timing.first = timing.end
        if tok in rt.eos_ids:
            if stats is not None:
                stats.truncate(len(out))  # EOS is not output
            yield "", "stop"
            return
        out.append(tok)
        if timing is not None:
            timing.tokens = len(out)
        if counted is not None:
            counted[0] = len(out)
        window = rt.detokenize(out[prefix:])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        delta = window[len(rt.detokenize(out[prefix:read])) if read > prefix else 0 :]
        prefix, read = read, len(out)
        if stops:
            cut = min((i for st in stops if (i := (text + delta).find(st)) >= 0), default=-1)
            if cut >= 0:
                yield (text + delta)[len(text) : cut], "stop"
                return
        text += delta
        yield delta, None
    yield "", "length"


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # token events are small writes: send each at once

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request stderr lines
        pass

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: ApiError) -> None:
        self._send_json(
            e.status,
            {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
        )

    def _served(self) -> Served:
        served = self.server.provider()
        if served is None:
            raise ApiError(
                503,
                "no model is active on this device yet; the agent is installing one",
                "unavailable",
            )
        return served

    def do_GET(self) -> None:
        try:
            if self.path.rstrip("/") != "/v1/models":
                raise ApiError(404, f"unknown route {self.path}", "not_found")
            served = self.server.provider()
            data = (
                [{"id": served.model_id, "object": "model", "created": 0, "owned_by": "slmops"}]
                if served
                else []
            )
            self._send_json(200, {"object": "list", "data": data})
        except ApiError as e:
            self._error(e)

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"body is not JSON: {exc.msg}") from None
            route = self.path.rstrip("/")
            if route == "/v1/chat/completions":
                self._chat(_parse(ChatRequest, body))
            elif route == "/v1/completions":
                self._completion(_parse(CompletionRequest, body))
            elif route == "/v1/feedback":
                self._feedback(body)
            else:
                raise ApiError(404, f"unknown route {self.path}", "not_found")
        except ApiError as e:
            if self.path.rstrip("/") in ("/v1/chat/completions", "/v1/completions"):
                self.server.count_error(e)
            self._error(e)

    def _feedback(self, body: Any) -> None:
        if not isinstance(body, dict) or body.get("rating") not in ("up", "down"):
            raise ApiError(400, 'send {"response_id": ..., "rating": "up" | "down"}')
        rid = body.get("response_id")
        if not isinstance(rid, str) or not self.server.issued(rid):
            raise ApiError(
                404, f"response {rid!r} was not served here recently", "not_found", "response_id"
            )
        if self.server.recorder is not None:
            self.server.recorder.record_feedback(body["rating"] == "up")
        self._send_json(200, {"response_id": rid, "rating": body["rating"], "recorded": True})

    def _chat(self, req: ChatRequest) -> None:
        served = self._served()
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        if served.defaults.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": served.defaults.system_prompt})

        prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")

        def job() -> None:
            with self.server.lock:
                ids = served.runtime.chat_prompt(msgs)
                self._respond(served, ids, req, chat=True, prompt=prompt)

        self.server.inference.run(job)

    def _completion(self, req: CompletionRequest) -> None:
        served = self._served()

        def job() -> None:
            with self.server.lock:
                rt = served.runtime
                ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(req.prompt)
                self._respond(served, ids, req, chat=False, prompt=req.prompt)

        self.server.inference.run(job)

    def _respond(
        self, served: Served, ids: list[int], req: _Sampling, *, chat: bool, prompt: str
    ) -> None:
        """Answer, then count the request (and offer a sample) to the recorder."""
        recorder = self.server.recorder
        stats = TokenStats() if recorder is not None and recorder.wants_quality() else None
        timing = Timing(start=time.perf_counter())
        text: list[str] = []
        error: str | None = None
        try:
            self._answer(served, ids, req, chat=chat, stats=stats, timing=timing, text=text)
        except (OSError, ValueError):  # the client went away mid-stream
            error = "other"
            raise
        except Exception:
            error = "runtime"
            raise
        finally:
            if recorder is not None:
                self.server.record(recorder, timing, len(ids), stats, error)
                if error is None:
                    recorder.offer_sample(prompt, "".join(text))

    def _answer(
        self,
        served: Served,
        ids: list[int],
        req: _Sampling,
        *,
        chat: bool,
        stats: TokenStats | None,
        timing: Timing,
        text: list[str],
    ) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.server.remember(rid)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            parts, finish, counted = [], "length", [0]
            for delta, fin in _generate(served, ids, req, counted, stats=stats, timing=timing):
                parts.append(delta)
                finish = fin or finish
            whole = "".join(parts)
            text.append(whole)
            n_out = counted[0]
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": whole}
            else:
                choice.update(text=whole, logprobs=None)
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": n_out,
                "total_tokens": len(ids) + n_out,
            }
            self._send_json(
                200,
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": served.model_id,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        # Every event is {"id", "object", "created", "model", "choices": [{"index": 0, ...}]};
        # only the text and the finish reason change, so the rest is encoded once.
        envelope = json.dumps(
            {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": served.model_id,
            }
        )
        head = b"data: " + envelope[:-1].encode() + b', "choices": [{"index": 0, '
        first = chat
        write = self.wfile.write
        for delta, fin in _generate(served, ids, req, stats=stats, timing=timing):
            text.append(delta)
            piece = json.dumps(delta).encode()
            reason = b"null" if fin is None else json.dumps(fin).encode()
            if chat:
                role = b', "role": "assistant"' if first else b""
                body = b'"delta": {"content": ' + piece + role + b'}, "finish_reason": '
                write(head + body + reason + b"}]}\n\n")
                first = False
            else:
                body = b'"text": ' + piece + b', "finish_reason": ' + reason
                write(head + body + b', "logprobs": null}]}\n\n')
        write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _parse(cls: type[_Sampling], body: Any) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(
            400, f"{param}: {err['msg']}" if param else err["msg"], param=param
        ) from None


ERROR_KINDS = {503: "no_model", 429: "overloaded", 504: "timeout"}


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], provider: Provider, recorder: Recorder | None = None
    ) -> None:
        super().__init__(address, _Handler)
        self.provider = provider
        self.recorder = recorder
        self.lock = threading.Lock()
        self.inference = InferenceThread()
        self._issued: OrderedDict[str, None] = OrderedDict()
        self._issued_lock = threading.Lock()

    def remember(self, response_id: str) -> None:
        with self._issued_lock:
            self._issued[response_id] = None
            while len(self._issued) > RECENT_RESPONSES:
                self._issued.popitem(last=False)

    def issued(self, response_id: str) -> bool:
        with self._issued_lock:
            return response_id in self._issued

    def count_error(self, e: ApiError) -> None:
        """A request refused before generating: counted with its kind, no timings."""
        if self.recorder is not None:
            kind = ERROR_KINDS.get(e.status, "bad_request" if e.status < 500 else "other")
            self.recorder.record_request(
                ttft_ms=0.0,
                latency_ms=0.0,
                prompt_tokens=0,
                output_tokens=0,
                decode_tps=0.0,
                error=kind,
            )

    @staticmethod
    def record(
        recorder: Recorder,
        timing: Timing,
        prompt_tokens: int,
        stats: TokenStats | None,
        error: str | None,
    ) -> None:
        end = timing.end or time.perf_counter()
        first = timing.first or end
        decode_s = end - first
        tps = (timing.tokens - 1) / decode_s if timing.tokens > 1 and decode_s > 0 else 0.0
        recorder.record_request(
            ttft_ms=(first - timing.start) * 1000,
            latency_ms=(end - timing.start) * 1000,
            prompt_tokens=prompt_tokens,
            output_tokens=timing.tokens,
            decode_tps=tps,
            error=error,
            logprobs=list(stats.logprobs) if stats is not None else None,
            entropies=list(stats.entropies) if stats is not None else None,
        )


def serve_in_thread(
    provider: Provider, host: str = "127.0.0.1", port: int = 0, recorder: Recorder | None = None
) -> tuple[OpenAIServer, threading.Thread]:
    srv = OpenAIServer((host, port), provider, recorder)
    t = threading.Thread(target=srv.serve_forever, name="openai-api", daemon=True)
    t.start()
    return srv, t
