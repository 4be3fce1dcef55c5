"""A small client for OpenAI-compatible chat servers (vLLM, SGLang, Ollama, hosted APIs) with
JSON-schema structured output, bounded retries and bounded concurrency.

Every answer is validated against a pydantic model. A request that keeps failing (HTTP 429/5xx,
timeouts, connection errors, malformed JSON, answers that violate the schema) is retried up to
``max_attempts`` times in all, then returned as a :class:`ChatAnswer` with a short ``error`` reason
and the message: never a default value. The SDK's own hidden retries are switched off
(``max_retries=0``) so that the attempt count in every answer is the true one.

Concurrency uses threads, not asyncio: the stages' ``process`` functions are plain generators driven
by :func:`cultureclip.curate.runner.run_stage`, the time goes to waiting on the network (the
GIL is released), and a pool of ``concurrency`` threads bounds the requests in flight by
construction. ``rate_limit`` (requests/s, retries included) is a token bucket shared by the threads.

The API key is read from the environment variable named by ``api_key_env`` when the client is made;
it is never stored in the config, logged, or put in an answer: every string of every answer and error
message is scrubbed of it (:mod:`cultureclip.curate.sanitize`), also when the server echoes it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Hashable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from cultureclip import logs
from cultureclip.curate.backends.chat_config import ChatConfig, effective_chat  # noqa: F401 (API)
from cultureclip.curate.backends.chat_wire import (MAX_RETRY_AFTER_S, RETRYABLE_STATUS, ChatAnswer,  # noqa: F401
                                                   TokenBucket, _Retry, _retry_after, image_part, strict_json_schema)
from cultureclip.curate.backends.deadline import http_transport, request_deadline
from cultureclip.curate.backends.preflight import ChatServerError, preflight
from cultureclip.curate.sanitize import bound, register_secret, scrub, scrub_tree

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "EMPTY"  # what local servers (vLLM, SGLang, Ollama) accept when no key is set


def _require_curate() -> None:
    try:
        import openai  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise ImportError(f"the chat client needs openai and pydantic ({exc}); "
                          f"pip install 'cultureclip[curate]'") from exc


class ChatClient:
    """Ask an OpenAI-compatible server for structured answers.

    Args:
        cfg: a :class:`ChatConfig` (or a mapping of its fields).
    """

    def __init__(self, cfg: Union[ChatConfig, Mapping[str, Any]]) -> None:
        _require_curate()
        import openai
        self.cfg = cfg if isinstance(cfg, ChatConfig) else ChatConfig.from_mapping(cfg)
        key = os.environ.get(self.cfg.api_key_env) or ""
        if not key:  # the same fact for every stage and client of a run: said once
            logs.once(log, logging.INFO, f"api_key_env:{self.cfg.api_key_env}",
                      "chat: %s is not set; sending the placeholder key (fine for local servers)", self.cfg.api_key_env)
        self._secret = key  # only to scrub answers and messages; never logged or returned
        register_secret(key)  # log records and the entry point's error line are scrubbed of it too
        # timeout_s is the whole request's deadline (connect + every read), not each read's: see deadline.py
        self._client = openai.OpenAI(api_key=key or PLACEHOLDER_KEY, base_url=self.cfg.base_url,
                                     timeout=float(self.cfg.timeout_s), max_retries=0,
                                     http_client=openai.DefaultHttpxClient(transport=http_transport()))
        self._bucket = TokenBucket(self.cfg.rate_limit) if self.cfg.rate_limit else None
        self._schemas: dict[type, dict] = {}
        self._lock = threading.Lock()
        self._preflight_lock = threading.Lock()
        self._preflight: Optional[Union[bool, Exception]] = None  # True once passed, or the error it raised

    def check_server(self) -> None:
        """Before the first request: one tiny request that fails fast, naming the URL, the model and the
        server's answer, when the server, model or key is wrong (:mod:`cultureclip.curate.backends.preflight`).

        Raises:
            ChatServerError: the check failed (raised again on every later call).
        """
        with self._preflight_lock:  # the first of many threads checks; the others wait for its verdict
            if self._preflight is None:
                try:
                    preflight(self._client, self.cfg.base_url, self.cfg.model, self.cfg.timeout_s, self._scrub)
                    self._preflight = True
                except ChatServerError as exc:
                    self._preflight = exc
            if isinstance(self._preflight, Exception):
                raise self._preflight

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ one request
    def _response_format(self, schema: type, name: Optional[str]) -> dict:
        with self._lock:
            body = self._schemas.get(schema)
            if body is None:
                body = self._schemas[schema] = strict_json_schema(schema)
        return {"type": "json_schema",
                "json_schema": {"name": name or schema.__name__, "schema": body, "strict": True}}

    def _scrub(self, text: str) -> str:
        return bound(scrub(text, [self._secret]))

    def _once(self, messages: Sequence[Mapping], schema: type, response_format: dict,
              stop: Optional[threading.Event] = None) -> Any:
        import openai
        import pydantic
        from openai.types.chat import ChatCompletion
        if self._bucket is not None:
            self._bucket.acquire()
        body = {"model": self.cfg.model, "messages": list(messages), "response_format": response_format,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                **(self.cfg.extra_body or {})}
        try:
            # The SDK's documented raw-request path (auth, timeouts, status errors, response parsing as
            # in chat.completions.create) with the body serialised once by us: create() walks every
            # message through its type transforms, which costs more CPU than the request itself for
            # image messages of a few hundred kB.
            with request_deadline(float(self.cfg.timeout_s), stop):
                completion = self._client.post("/chat/completions", cast_to=ChatCompletion,
                                               content=json.dumps(body).encode("ascii"),
                                               options={"headers": {"Content-Type": "application/json"}})
        except openai.APITimeoutError as exc:
            raise _Retry("timeout", f"no complete answer within {self.cfg.timeout_s} s ({exc})") from None
        except openai.APIConnectionError as exc:
            raise _Retry("connection", f"connection error: {exc}") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status in RETRYABLE_STATUS or status >= 500
            raise _Retry(f"http_{status}", f"HTTP {status}: {exc.message}",
                         _retry_after(exc.response.headers), retryable) from None
        except openai.OpenAIError as exc:  # anything else the SDK raises: an error answer, not a crash
            raise _Retry("api_error", f"{type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # a 200 whose body is not JSON at all
            raise _Retry("bad_response", f"unreadable response: {exc}") from None
        if not isinstance(completion, ChatCompletion) or not isinstance(completion.choices, list):
            raise _Retry("bad_response", f"not a chat completion: {str(completion)[:200]!r}")
        if not completion.choices:
            raise _Retry("empty_answer", "the server returned no choices")
        choice = completion.choices[0]
        content = choice.message.content
        if not content:
            refusal = getattr(choice.message, "refusal", None)
            raise _Retry("empty_answer", f"empty message (finish_reason={choice.finish_reason}"
                                         f"{', refusal: ' + refusal if refusal else ''})")
        try:
            data = json.loads(content)
        except ValueError as exc:
            reason = "truncated" if choice.finish_reason == "length" else "malformed_json"
            raise _Retry(reason, f"{exc}; answer starts {content[:200]!r}") from None
        data = scrub_tree(data, [self._secret])  # a server that quotes the key back: never into a record
        try:
            return schema.model_validate(data)
        except pydantic.ValidationError as exc:
            raise _Retry("schema_violation", f"{exc.error_count()} errors: {exc.errors()[0]['loc']}: "
                                             f"{exc.errors()[0]['msg']}; answer {content[:200]!r}") from None

    def ask(self, messages: Sequence[Mapping], schema: type, name: Optional[str] = None,
            stop: Optional[threading.Event] = None) -> ChatAnswer:
        """Ask once (with bounded retries) for an answer that validates against ``schema``.

        Args:
            messages: chat messages in the OpenAI format (content parts may hold :func:`image_part`).
            schema: a pydantic model class; its strict JSON schema is sent as the response format.
            name: the schema name sent to the server (default: the class name).
            stop: when set, the request in flight and any wait before a retry end at once (the answer
                is then an ``interrupted`` error).

        Returns:
            A :class:`ChatAnswer`: the validated value, or the last error's reason and message.
        """
        self.check_server()
        response_format = self._response_format(schema, name)
        last: Optional[_Retry] = None
        for attempt in range(1, int(self.cfg.max_attempts) + 1):
            if stop is not None and stop.is_set():
                return ChatAnswer(value=None, error="interrupted", message="the run is stopping", attempts=attempt - 1)
            try:
                value = self._once(messages, schema, response_format, stop)
                return ChatAnswer(value=value, error=None, message="", attempts=attempt)
            except _Retry as exc:
                last = exc
                log.debug("chat attempt %d/%d: %s", attempt, self.cfg.max_attempts, exc.reason)
                if not exc.retryable or attempt == self.cfg.max_attempts:
                    return ChatAnswer(value=None, error=exc.reason, message=self._scrub(exc.message),
                                      attempts=attempt)
                if exc.retry_after is not None:
                    delay = exc.retry_after  # the server said when: honour it exactly
                else:
                    delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempt - 1))
                    delay *= 0.5 + random.random()  # jitter: retries of many threads do not collide
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
        raise AssertionError(f"unreachable: {last}")  # pragma: no cover

    # ------------------------------------------------------------------ many requests
    def ask_many(self, requests: Iterable[tuple]) -> Iterator[tuple[Hashable, ChatAnswer]]:
        """Ask many questions with at most ``concurrency`` in flight; yields ``(key, answer)`` as they
        finish (unordered).

        Args:
            requests: ``(key, messages, schema)`` or ``(key, messages, schema, name)`` tuples; read
                lazily, so a long iterator is never held in memory.
        """
        import queue
        limit = int(self.cfg.concurrency)
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="chat")
        stop = threading.Event()  # set when the caller stops early (Ctrl-C, SIGTERM, an error downstream)
        done: "queue.SimpleQueue[tuple[Hashable, Future]]" = queue.SimpleQueue()
        source = iter(requests)
        running = 0
        exhausted = False
        try:
            while True:
                while not exhausted and running < limit:  # at most `limit` submitted, so in flight
                    try:
                        key, messages, schema, *rest = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    future = pool.submit(self.ask, messages, schema, *rest, stop=stop)
                    future.add_done_callback(lambda f, k=key: done.put((k, f)))
                    running += 1
                if not running:
                    return
                while True:  # a timed wait: a blocking one would hold Ctrl-C back on some platforms
                    try:
                        key, future = done.get(timeout=0.5)
                        break
                    except queue.Empty:
                        continue
                running -= 1
                yield key, future.result()
        finally:
            # Stopping early: requests in flight and retry waits end within deadline.POLL_S, so the
            # caller writes what finished at once instead of waiting out timeouts and Retry-After sleeps.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)


class LazyChatClient:
    """A :class:`ChatClient` made on the first request: a rerun with nothing to do opens no connection."""

    def __init__(self, cfg: Union[ChatConfig, Mapping[str, Any]]) -> None:
        self.cfg = cfg if isinstance(cfg, ChatConfig) else ChatConfig.from_mapping(cfg)
        self._client: Optional[ChatClient] = None

    def ask_many(self, requests: Iterable[tuple]) -> Iterator[tuple[Hashable, ChatAnswer]]:
        if self._client is None:
            self._client = ChatClient(self.cfg)
        return self._client.ask_many(requests)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
