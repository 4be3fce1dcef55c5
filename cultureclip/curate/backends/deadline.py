"""A total deadline per HTTP request, and requests in flight that stop when asked.

The HTTP client's own timeouts apply to each socket operation: a server that trickles its answer (a
byte a second) never trips a 60 s read timeout and holds a request for as long as it likes. Here the
socket operations of one request share one deadline: :func:`request_deadline` sets it for the calling
thread, and the network backend made by :func:`http_transport` gives every connect, read and write at
most the time left (a read that finds none left raises the client's ``ReadTimeout``, which the OpenAI
SDK reports as ``APITimeoutError``). Reads wait in slices of :data:`POLL_S` and give up when the
thread's ``stop`` event is set, so a Ctrl-C never waits out a slow server.

The deadline lives in a thread-local: the synchronous client does a whole request (connect, send,
headers, body) in the calling thread, which is how :class:`~cultureclip.curate.backends.chat.ChatClient` uses it.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
import time
from typing import Any, Iterator, Optional

POLL_S = 0.2  # how often a blocked read looks at the stop event
_local = threading.local()


def http_modules() -> tuple[Any, Any]:
    """``(httpx, httpcore)`` as the installed OpenAI SDK uses them (``httpx2``/``httpcore2`` where the
    SDK moved to those names)."""
    for pair in (("httpx2", "httpcore2"), ("httpx", "httpcore")):
        try:
            return importlib.import_module(pair[0]), importlib.import_module(pair[1])
        except ImportError:
            continue
    raise ImportError("the chat client needs httpx (installed with openai); pip install 'cultureclip[curate]'")


class Interrupted(Exception):
    """The request was abandoned because its stop event was set (Ctrl-C, SIGTERM)."""


@contextlib.contextmanager
def request_deadline(seconds: float, stop: Optional[threading.Event] = None) -> Iterator[None]:
    """Within this block, the calling thread's HTTP requests end ``seconds`` from now at the latest,
    and as soon as ``stop`` is set."""
    _local.deadline, _local.stop = time.monotonic() + float(seconds), stop
    try:
        yield
    finally:
        _local.deadline = _local.stop = None


def _left(timeout: Optional[float], httpcore: Any, what: str) -> Optional[float]:
    """The timeout for one socket operation: the client's, capped by the time left to the deadline."""
    stop = getattr(_local, "stop", None)
    if stop is not None and stop.is_set():
        raise httpcore.ReadError("request abandoned: the run is stopping")
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise {"connect": httpcore.ConnectTimeout, "write": httpcore.WriteTimeout}.get(what, httpcore.ReadTimeout)(
            "the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


def http_transport(max_connections: int = 1000, max_keepalive: int = 100) -> Any:
    """An httpx transport whose requests keep the deadline and stop event of :func:`request_deadline`."""
    httpx, httpcore = http_modules()

    class Stream(httpcore.NetworkStream):
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
            while True:
                left = _left(timeout, httpcore, "read")
                if getattr(_local, "stop", None) is None or (left is not None and left <= POLL_S):
                    return self._inner.read(max_bytes, left)
                try:  # a timed-out recv consumed nothing: waiting again in slices loses no byte
                    return self._inner.read(max_bytes, POLL_S)
                except httpcore.ReadTimeout:
                    if timeout is not None:
                        timeout -= POLL_S
                        if timeout <= 0:
                            raise

        def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
            self._inner.write(buffer, _left(timeout, httpcore, "write"))  # not sliced: a partial send can't resume

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: Any, server_hostname: Optional[str] = None,
                      timeout: Optional[float] = None) -> Any:
            return Stream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore, "connect")))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class Backend(httpcore.NetworkBackend):
        def __init__(self) -> None:
            self._inner = httpcore.SyncBackend()

        def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None, local_address: Any = None,
                        socket_options: Any = None) -> Any:
            return Stream(self._inner.connect_tcp(host, port, _left(timeout, httpcore, "connect"), local_address,
                                                  socket_options))

        def connect_unix_socket(self, path: str, timeout: Optional[float] = None, socket_options: Any = None) -> Any:
            return Stream(self._inner.connect_unix_socket(path, _left(timeout, httpcore, "connect"), socket_options))

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=max_connections,
                                                        max_keepalive_connections=max_keepalive))
    # httpx builds its connection pool without a way to pass a network backend; the pool reads this
    # attribute for every new connection (httpcore's ConnectionPool(network_backend=...) sets the same).
    transport._pool._network_backend = Backend()
    return transport
