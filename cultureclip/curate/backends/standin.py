"""A stand-in OpenAI-compatible chat server: a real HTTP server on localhost with deterministic answers.

It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` in the OpenAI wire format (and its
counters at ``GET /v1/standin/stats``), so the
curation stages talk to it through the same SDK and code path as to vLLM or a hosted API. It is not a
model: each request is dispatched on the name of its ``response_format`` JSON schema to a *responder*
(a function of the request body returning the answer object), which the stage modules provide
(``standin_responders()``). Answers are derived from the request content only, so reruns agree.

For tests and benchmarks it can add a fixed latency to every answer and script failures per request
(:class:`Fault`): HTTP 429 with ``Retry-After``, 5xx, an answer slower than the client's timeout,
malformed JSON, an answer that violates the schema. It counts requests, the most ever in flight, and
keeps the request bodies (``keep_bodies``) so tests can check exactly what was asked.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from cultureclip.curate.messages import request_images, request_text, schema_name  # noqa: F401 (re-exported)

STAGE_MODULES = ("cultureclip.curate.stages.judge",)  # stage modules whose standin_responders() the CLI serves

FAULT_KINDS = ("429", "500", "503", "slow", "malformed", "schema", "garbage", "trickle", "patch")
KEY_PLACEHOLDER = "{api_key}"  # in a patch's strings: replaced by the bearer token the request carried
_TRICKLE_HEADER = "X-Standin-Trickle"  # internal: tells the handler to send the answer byte by byte
SCHEMA_VIOLATION = {"not_in_schema": True}  # every closed schema with a required field rejects it


@dataclass
class Fault:
    """A scripted failure of one request.

    Attributes:
        kind: ``"429"`` / ``"500"`` / ``"503"`` (that status), ``"slow"`` (answer after ``delay_s``,
            meant to exceed the client's timeout), ``"malformed"`` (content that is not JSON),
            ``"schema"`` (JSON that violates the requested schema), ``"garbage"`` (HTTP 200 whose body
            is not a chat completion at all), ``"trickle"`` (a valid answer sent one byte every
            ``interval_s``, status line and headers included: every read returns in time, the whole
            answer does not), ``"patch"`` (the responder's answer with ``patch`` merged into it: a
            boolean score, a reason holding Markdown, or the caller's key echoed back through
            :data:`KEY_PLACEHOLDER`).
        retry_after: for 429/503, the ``Retry-After`` header in seconds (omitted when None).
        delay_s: for ``slow``, the delay before answering.
    """

    kind: str
    retry_after: Optional[float] = None
    delay_s: float = 5.0
    interval_s: float = 1.0
    patch: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; kinds: {FAULT_KINDS}")


FaultSpec = Union[None, str, Fault]
Faults = Union[None, Sequence[FaultSpec], Callable[[int, dict], FaultSpec]]


class StandinServer:
    """An OpenAI-compatible chat server on ``host`` (a free port), in a daemon thread.

    Use as a context manager (or :meth:`start` / :meth:`stop`); ``.url`` is the ``base_url`` to give
    the client, e.g. ``http://127.0.0.1:43125/v1``.

    Args:
        responders: schema name -> function(request body) -> answer object (JSON-able).
        latency_s: seconds added to every chat answer (to measure client throughput).
        faults: failures to script: a sequence indexed by the chat request's arrival number (0-based;
            ``None`` or past the end = answer normally), or a function ``(index, body) -> fault``.
            A fault is a :class:`Fault` or its kind as a string.
        host: the interface to bind (keep the default: localhost only).
        model: the id listed by ``/v1/models``.
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>`` (else 401).
        keep_bodies: keep every chat request body in :attr:`bodies`.
        port: the port to bind; 0 (default) for a free one.
        models: when given, the only model ids served (a request for another gets vLLM's 404 "does not
            exist"); None (default): any model id is answered.
    """

    def __init__(self, responders: Mapping[str, Callable[[dict], Any]], latency_s: float = 0.0,
                 faults: Faults = None, host: str = "127.0.0.1", model: str = "standin",
                 api_key: Optional[str] = None, keep_bodies: bool = True, port: int = 0,
                 models: Optional[Sequence[str]] = None) -> None:
        self.responders = dict(responders)
        self.latency_s, self.faults, self.host, self.model = float(latency_s), faults, host, model
        self._api_key, self.keep_bodies, self.port = api_key, keep_bodies, int(port)
        self.models = None if models is None else list(models)
        self.preflights = 0  # requests without a response format (a client's preflight): answered, not counted
        self.lock = threading.Lock()
        self.requests = 0  # chat requests received
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_schema: Counter = Counter()
        self.statuses: Counter = Counter()
        self.arrivals: list[float] = []  # time.monotonic() of each chat request
        self.bodies: list[dict] = []
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the stand-in server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> "StandinServer":
        handler = type("Handler", (_Handler,), {"standin": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True  # a slow answer never blocks shutdown
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="standin-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "StandinServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ answering
    def _fault_for(self, index: int, body: dict) -> Optional[Fault]:
        if self.faults is None:
            return None
        if callable(self.faults):
            spec = self.faults(index, body)
        else:
            spec = self.faults[index] if index < len(self.faults) else None
        return Fault(spec) if isinstance(spec, str) else spec

    def answer(self, body: dict, api_key: str = "") -> tuple[int, dict, dict]:
        """(status, headers, JSON payload) for one chat request; counts it. ``api_key`` is the bearer
        token the request carried (a ``patch`` fault may echo it)."""
        with self.lock:
            index = self.requests
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.arrivals.append(time.monotonic())
            if self.keep_bodies:
                self.bodies.append(body)
        try:
            status, headers, payload = self._answer(index, body, api_key)
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.statuses[status] += 1
        return status, headers, payload

    def _answer(self, index: int, body: dict, api_key: str = "") -> tuple[int, dict, dict]:
        name = schema_name(body)
        with self.lock:
            self.by_schema[name] += 1
        fault = self._fault_for(index, body)
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None and fault.kind in ("429", "500", "503"):
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return int(fault.kind), headers, _error(f"stand-in fault {fault.kind}", "server_error")
        if fault is not None and fault.kind == "garbage":
            return 200, {}, {"unexpected": "not a chat completion"}
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if name is None:
            return 400, {}, _error("the stand-in answers only response_format json_schema requests",
                                   "invalid_request_error")
        responder = self.responders.get(name)
        if responder is None:
            return 400, {}, _error(f"no stand-in responder for schema {name!r}; known: "
                                   f"{sorted(self.responders)}", "invalid_request_error")
        try:
            answer = responder(body)
        except Exception as exc:  # a responder bug must be visible to the client, not hang it
            return 500, {}, _error(f"stand-in responder {name!r} failed: {type(exc).__name__}: {exc}",
                                   "server_error")
        if fault is not None and fault.kind == "patch":
            answer = {**answer, **_with_key(fault.patch or {}, api_key)}
        if fault is not None and fault.kind == "schema":
            content = json.dumps(SCHEMA_VIOLATION)
        elif fault is not None and fault.kind == "malformed":
            content = json.dumps(answer)[:-1] + " trailing"  # cut and garbled: not JSON
        else:
            content = json.dumps(answer, ensure_ascii=False)
        prompt_tokens = len(request_text(body)) // 4 + 256 * len(request_images(body))
        headers = {_TRICKLE_HEADER: f"{fault.interval_s:g}"} if fault is not None and fault.kind == "trickle" else {}
        return 200, headers, {
            "id": f"chatcmpl-standin-{index}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                      "total_tokens": prompt_tokens + len(content) // 4},
        }


def _with_key(value: Any, api_key: str) -> Any:
    if isinstance(value, str):
        return value.replace(KEY_PLACEHOLDER, api_key)
    if isinstance(value, dict):
        return {k: _with_key(v, api_key) for k, v in value.items()}
    return [_with_key(v, api_key) for v in value] if isinstance(value, list) else value


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections, as with vLLM
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    standin: StandinServer

    def log_message(self, *args: Any) -> None:  # quiet: tests and benchmarks make thousands
        pass

    def _send(self, status: int, payload: dict, headers: Optional[Mapping[str, str]] = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        headers = dict(headers or {})
        trickle = headers.pop(_TRICKLE_HEADER, None)
        if trickle is not None:
            self._trickle(status, data, float(trickle))
            return
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
            self.close_connection = True

    def _trickle(self, status: int, data: bytes, interval_s: float) -> None:
        head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                f"\r\n").encode("ascii")
        self.close_connection = True
        try:
            for i, byte in enumerate(head + data):
                if i:
                    time.sleep(interval_s)
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: what it should do
            pass

    def _authorised(self) -> bool:
        key = self.standin._api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, _error("invalid API key", "invalid_request_error"))
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/standin/stats":  # counters, for clients in another process
            with self.standin.lock:
                stats = {"requests": self.standin.requests, "max_in_flight": self.standin.max_in_flight,
                         "by_schema": dict(self.standin.by_schema),
                         "statuses": {str(k): v for k, v in self.standin.statuses.items()}}
            self._send(200, stats)
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "cultureclip-standin"}
                for m in (self.standin.models or [self.standin.model])]})
        else:
            self._send(404, _error(f"no route {self.path}", "invalid_request_error"))

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(f"no route {self.path}", "invalid_request_error"))
            return
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._send(400, _error(f"request body is not JSON: {exc}", "invalid_request_error"))
            return
        auth = self.headers.get("Authorization") or ""
        model = body.get("model") if isinstance(body, dict) else None
        if self.standin.models is not None and model not in self.standin.models:
            self._send(404, _error(f"The model `{model}` does not exist.", "NotFoundError"))
            return
        if isinstance(body, dict) and "response_format" not in body:  # a client's preflight: one tiny answer
            with self.standin.lock:
                self.standin.preflights += 1
            self._send(200, {"id": "chatcmpl-standin-preflight", "object": "chat.completion", "created": 0,
                             "model": model or self.standin.model, "choices": [{
                                 "index": 0, "finish_reason": "length", "logprobs": None,
                                 "message": {"role": "assistant", "content": "ok"}}]})
            return
        status, headers, payload = self.standin.answer(body, auth.removeprefix("Bearer "))
        self._send(status, payload, headers)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cultureclip.curate.backends.standin``: serve the stand-in in this process until interrupted.

    Prints the base URL on the first line of stdout (for scripts and benchmarks that need the server
    in another process than the client).
    """
    import argparse
    import importlib
    p = argparse.ArgumentParser(description="A stand-in OpenAI-compatible chat server (deterministic answers).")
    p.add_argument("--modules", default=",".join(STAGE_MODULES),
                   help="comma-separated modules whose standin_responders() to serve")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    args = p.parse_args(argv)
    responders: dict = {}
    for name in filter(None, args.modules.split(",")):
        responders.update(importlib.import_module(name).standin_responders())
    with StandinServer(responders, latency_s=args.latency, port=args.port, keep_bodies=False) as server:
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
