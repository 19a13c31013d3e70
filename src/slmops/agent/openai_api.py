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

Hardened for a box where other programs and a browser run (http_guard.py): Host check (DNS
rebinding), optional API key, strict Content-Length, a socket timeout per connection, a cap on
open connections and a bounded queue of waiting generations (429 with Retry-After beyond it).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from slmops.agent.generation import (
    ChatRequest,
    CompletionRequest,
    Served,
    Timing,
    _generate,
    _parse,
    _Sampling,
)
from slmops.agent.http_guard import (
    ApiError,
    HeaderDeadlines,
    Refused,
    allowed_host_names,
    body_length,
    check_api_key,
    check_host,
)
from slmops.agent.inference_thread import Busy, InferenceThread
from slmops.runtimes.base import TokenStats

__all__ = ["ApiError", "OpenAIServer", "Recorder", "Served", "serve_in_thread"]

MAX_BODY = 1 << 20
MAX_WAITING = 4  # generations queued behind the running one; more get 429
REQUEST_TIMEOUT_S = 30.0  # a socket read or write that stalls this long drops the connection
HEADER_TIMEOUT_S = 10.0  # request line and headers (or a kept-alive idle wait), however slow
MAX_CONNECTIONS = 32  # open connections (one thread each); more are answered 503 and closed
RETRY_AFTER_S = 2


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


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # token events are small writes: send each at once

    def setup(self) -> None:
        super().setup()
        # every recv and send on this connection: a client that stalls is dropped after it
        self.connection.settimeout(self.server.request_timeout)

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request stderr lines
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method, HTTP/2.0, headers too
        long) are the client's fault: never a 5xx (501 and 505 become 405 and 400)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # set before the line parsed: answer as 1.0
            self.request_version = "HTTP/1.0"
        super().send_error({501: 405, 505: 400}.get(code, code), message, explain)

    def handle_one_request(self) -> None:
        self.server.deadlines.start(self.connection)  # line + headers within the deadline
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.done(self.connection)

    def parse_request(self) -> bool:
        """http.server takes a two-word line as an HTTP/0.9 request and answers it without a
        status line or headers; refuse it instead (no client of this API speaks 0.9)."""
        ok = super().parse_request()  # has read the headers: generating may take its time
        self.server.deadlines.done(self.connection)
        if not ok:
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return True

    def _preflight(self) -> None:
        """Host and API key, before anything else is looked at (and before any body is read)."""
        srv = self.server
        check_host(self.headers.get("Host"), srv.allowed_hosts, srv.port, srv.bind_host)
        check_api_key(self.headers.get("Authorization"), srv.api_key())

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
        if e.status >= 400 and e.status != 404:
            # refused bodies are never read: the connection must not be parsed any further
            self.close_connection = True
        self._send_json(
            e.status,
            {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
            {**e.headers, **({"Connection": "close"} if self.close_connection else {})},
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
            self._preflight()
            if (
                self.headers.get("Content-Length", "0") != "0"
                or "Transfer-Encoding" in self.headers
            ):
                self.close_connection = True  # a GET body is never read: never parse it either
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
            self._preflight()
            length = body_length(self.headers, MAX_BODY, method="POST")
            try:
                data = self.rfile.read(length)
            except OSError:  # the client stalled past the timeout or went away: drop it
                self.close_connection = True
                return
            if len(data) < length:
                raise Refused(400, f"body ended after {len(data)} of {length} bytes")
            try:
                body = json.loads(data or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise ApiError(400, f"body is not JSON: {msg}") from None
            except RecursionError:
                raise ApiError(400, "body is not JSON: nested too deeply") from None
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
            generating = self.path.rstrip("/") in ("/v1/chat/completions", "/v1/completions")
            if generating and not isinstance(e, Refused):
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

        self._run(job)

    def _completion(self, req: CompletionRequest) -> None:
        served = self._served()

        def job() -> None:
            with self.server.lock:
                rt = served.runtime
                ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(req.prompt)
                self._respond(served, ids, req, chat=False, prompt=req.prompt)

        self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            self.server.inference.run(job)
        except Busy as exc:
            raise ApiError(
                429,
                f"{exc.waiting} generations are already waiting; retry in {RETRY_AFTER_S} s",
                "overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

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


ERROR_KINDS = {503: "no_model", 429: "overloaded", 504: "timeout"}


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        provider: Provider,
        recorder: Recorder | None = None,
        *,
        api_key: Callable[[], str | None] | None = None,
        max_waiting: int = MAX_WAITING,
        request_timeout: float = REQUEST_TIMEOUT_S,
        header_timeout: float = HEADER_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(address, _Handler)
        self.provider = provider
        self.recorder = recorder
        self.api_key: Callable[[], str | None] = api_key or (lambda: None)
        self.request_timeout = request_timeout
        self.deadlines = HeaderDeadlines(header_timeout)
        self.bind_host, self.port = str(address[0]), int(self.server_address[1])
        self.allowed_hosts = allowed_host_names(self.bind_host)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.lock = threading.Lock()
        self.inference = InferenceThread(max_waiting=max_waiting)
        self._issued: OrderedDict[str, None] = OrderedDict()
        self._issued_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most `max_connections`: beyond, 503 and close."""
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def server_close(self) -> None:
        self.deadlines.close()
        super().server_close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

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


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 2\r\nConnection: close\r\nContent-Length: 89\r\n\r\n"
    b'{"error": {"message": "too many open connections", "type": "overloaded", "param": null}}\n'
)


def serve_in_thread(
    provider: Provider,
    host: str = "127.0.0.1",
    port: int = 0,
    recorder: Recorder | None = None,
    **options: Any,
) -> tuple[OpenAIServer, threading.Thread]:
    """Start the API on a daemon thread; `options` go to OpenAIServer (api_key, limits)."""
    srv = OpenAIServer((host, port), provider, recorder, **options)
    t = threading.Thread(target=srv.serve_forever, name="openai-api", daemon=True)
    t.start()
    return srv, t
