"""Progress you can read: a bar with rate and ETA on a terminal, a plain line every N seconds elsewhere.

One helper for every long loop (curation stages, embedding, evaluation)::

    with Progress("render 00000of00001", total=len(todo), unit="jobs") as bar:
        for outcome in work:
            bar.update(errors=0 if outcome.ok else 1)

On a terminal this draws a `rich <https://rich.readthedocs.io>`_ bar (done/total, rate, elapsed, ETA,
errors). When stderr is not a terminal (a SLURM log, a pipe, a test) it writes a plain line every
``every_s`` seconds instead, e.g. ``render 00000of00001: 52/130 jobs (40%), 5.8 jobs/s, elapsed 0:00:09,
ETA 0:00:13, 0 errors``, and a final ``... done: ...`` line. Two environment variables override the
settings for a whole run: ``CULTURECLIP_PROGRESS`` (``bar``, ``lines`` or ``off``) and
``CULTURECLIP_PROGRESS_EVERY`` (seconds between plain lines, default 30).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

MODE_ENV = "CULTURECLIP_PROGRESS"
EVERY_ENV = "CULTURECLIP_PROGRESS_EVERY"
MODES = ("bar", "lines", "off")
DEFAULT_EVERY_S = 30.0
T = TypeVar("T")

_live: dict = {"progress": None, "users": 0}  # one rich display per process; nested bars share it
_consoles: dict = {}  # one rich console per stream


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def choose_mode(stream: TextIO, mode: Optional[str] = None) -> str:
    """``bar`` on a terminal, ``lines`` elsewhere, unless ``mode`` or ``$CULTURECLIP_PROGRESS`` says otherwise."""
    mode = mode or os.environ.get(MODE_ENV) or None
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV}={mode!r}: choose one of {list(MODES)}")
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() and os.environ.get("TERM") != "dumb" else "lines"


class Progress:
    """Progress of one loop; use as a context manager and call :meth:`update` per item.

    Args:
        description: what is running, e.g. ``"render 00000of00001"`` (starts every plain line).
        total: items to do; None when unknown (no ETA then).
        unit: what an item is (``jobs``, ``batches``, ``texts``).
        every_s: seconds between plain lines (default 30; ``$CULTURECLIP_PROGRESS_EVERY`` overrides it).
        summary: keep the finished bar / write a final line. False for short inner loops: their bar
            disappears when done and a plain final line is written only if a periodic one was.
        stream: where to write (default: ``sys.stderr`` at the time of writing).
        mode: ``bar``, ``lines`` or ``off`` (default: :func:`choose_mode`).
    """

    def __init__(self, description: str, total: Optional[int] = None, unit: str = "items",
                 every_s: Optional[float] = None, summary: bool = True, stream: Optional[TextIO] = None,
                 mode: Optional[str] = None) -> None:
        self.description, self.total, self.unit, self.summary = description, total, unit, summary
        # the environment is the user's setting for the whole run: it wins over the caller's default
        env_every = os.environ.get(EVERY_ENV)
        self.every_s = float(env_every if env_every else every_s if every_s is not None else DEFAULT_EVERY_S)
        self._stream = stream
        self.mode = choose_mode(self.stream, mode)
        self.done = self.errors = 0
        self.start = self._last_line = time.monotonic()
        self._lines = 0
        self._task = None
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.mode == "bar" and total != 0:
            self._start_bar()
        elif self.mode == "lines" and total != 0:  # a line every every_s even while no item finishes
            threading.Thread(target=self._heartbeat, name="progress-lines", daemon=True).start()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    # ------------------------------------------------------------------------------------ bar mode
    def _start_bar(self) -> None:
        try:
            from rich.errors import LiveError
            if _live["progress"] is None:
                _live["progress"] = _rich_progress(self.stream)
                _live["progress"].start()
            _live["users"] += 1
            self._task = _live["progress"].add_task(self.description, total=self.total, errors="", rate="?",
                                                    eta="?" if self.total is not None else "")
        except (ImportError, LiveError):  # no rich, or (rich < 14) another live display on this console
            _live["progress"] = None
            self.mode = "lines"

    def _end_bar(self) -> None:
        progress = _live["progress"]
        if progress is None or self._task is None:
            return
        if not self.summary:
            progress.remove_task(self._task)
        _live["users"] -= 1
        if _live["users"] <= 0:
            progress.stop()
            _live["progress"], _live["users"] = None, 0

    # ------------------------------------------------------------------------------------- updates
    def update(self, n: int = 1, errors: int = 0) -> None:
        """``n`` more items done, ``errors`` of them failed."""
        self.done += n
        self.errors += errors
        if self.mode == "bar" and self._task is not None:
            # rate and ETA over the whole run, as in the plain lines: rich's own speed looks at recent
            # updates only and jumps when outcomes arrive in bursts (a batch of renders at once)
            now = time.monotonic()
            rate, eta = self.rate(now), self.eta(now)
            _live["progress"].update(self._task, advance=n, rate=f"{rate:.3g} {self.unit}/s",
                                     eta="" if self.total is None else f"ETA {_clock(eta)}",
                                     errors=f"{self.errors} errors" if self.errors else "")
        elif self.mode == "lines":
            self._line_if_due()

    def _line_if_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._closed and now - self._last_line >= self.every_s:
                self._write(self.status(now))
                self._last_line = now
                self._lines += 1

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.every_s / 4)):
            self._line_if_due()

    def rate(self, now: Optional[float] = None) -> float:
        """Items per second since the start."""
        elapsed = (now or time.monotonic()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left at the rate so far (None without a total or before the first item)."""
        rate = self.rate(now)
        return (self.total - self.done) / rate if self.total is not None and rate > 0 else None

    def status(self, now: Optional[float] = None) -> str:
        """The plain progress line: done/total, percent, rate, elapsed, ETA, errors."""
        now = now or time.monotonic()
        rate, eta = self.rate(now), self.eta(now)
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = (f"{self.description}: {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s, "
                f"elapsed {_clock(now - self.start)}")
        if self.total is not None:
            line += f", ETA {_clock(eta)}"
        return line + f", {self.errors} errors"

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish: keep or remove the bar, or write the final plain line (see ``summary``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self.mode == "bar":
            self._end_bar()
        elif self.mode == "lines" and self.total != 0 and (self.summary or self._lines):
            now = time.monotonic()
            self._write(f"{self.description} done: {self.done} {self.unit} in {_clock(now - self.start)}, "
                        f"{self.rate(now):.3g} {self.unit}/s, {self.errors} errors")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], description: str, total: Optional[int] = None, unit: str = "items",
          **kwargs) -> Iterator[T]:
    """Yield ``items`` while showing their progress (``total`` defaults to ``len(items)`` when it has one).

    Keyword arguments go to :class:`Progress` (``every_s``, ``summary``, ``stream``, ``mode``).
    """
    if total is None and hasattr(items, "__len__"):
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:  # a loader over an IterableDataset raises here
            total = None
    with Progress(description, total=total, unit=unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


def _rich_progress(stream: TextIO):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

    return RichProgress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TextColumn("elapsed"), TimeElapsedColumn(),
                        TextColumn("{task.fields[eta]}"), TextColumn("[red]{task.fields[errors]}"),
                        console=console(stream))


def console(stream: TextIO):
    """The rich console that draws bars on ``stream`` (one per stream)."""
    from rich.console import Console
    if id(stream) not in _consoles:
        _consoles[id(stream)] = (stream, Console(file=stream))
    return _consoles[id(stream)][1]
