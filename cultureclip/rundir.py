"""Run-directory safety: one owner per run directory, the checkpoint to resume from, the "before"
metrics kept across resumes, metrics logs merged across attempts, and atomic checkpoint writes.

Plain Python (no Lightning, no Hydra): the training entry point calls these in order, holding the
lock before anything is written into the run directory.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional, Union

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
BEFORE_NAME = "before_metrics.json"
ATTEMPT_GLOB = "metrics.attempt-*.csv"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked; the message is one line naming the folder and what to do.

    Entry points print it as ``error: <message>`` without a traceback.
    """


class RunDirLocked(RunDirError):
    """Another live process owns the run directory."""


class RunDirExists(RunDirError, FileExistsError):
    """A fresh run was started in a run directory that already holds checkpoints."""


def is_launch_owner() -> bool:
    """True in the one process per launch that owns the run directory: global rank 0.

    torchrun sets RANK on every process; Lightning's own DDP launcher re-runs the command with
    LOCAL_RANK/NODE_RANK set for the other ranks. A process without these variables is rank 0.
    """
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunDirLock:
    """A lock file ``<run_dir>/.lock`` holding ``{"pid", "host", "since"}``.

    Taken with ``O_CREAT | O_EXCL``; the check-and-take runs under an ``fcntl`` lock on a guard file so
    that two processes finding the same stale lock cannot both take it over. A lock whose pid is dead
    on this host is stale and taken over with a warning; a lock from another host is never judged
    from here (its pid means nothing on this machine).

    Re-entrant within one process (tests call the training function several times).
    """

    def __init__(self, run_dir: Union[str, Path]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _owner(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # torn or foreign content: report it rather than guess
            return {"pid": None, "host": None, "raw": self.path.read_bytes()[:200].decode(errors="replace")}

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise :class:`RunDirLocked` naming the owner and what to do."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = self._owner()
        with open(self.run_dir / ".lock.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes or the process dies
            current = self._read()
            if current is not None:
                pid, host = current.get("pid"), current.get("host")
                if pid == me["pid"] and host == me["host"]:
                    self.held = True
                    return self
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning("taking over the stale lock %s of pid %d (no longer running on %s)",
                                self.path, pid, host)
                    self.path.unlink()
                else:
                    raise RunDirLocked(
                        f"run directory {self.run_dir} is in use by pid {pid} on host {host} "
                        f"(since {current.get('since')}; lock file {self.path}). Pass another run_name=... "
                        f"to start a separate run, or wait for that one to end. Nothing was written. "
                        f"If that process is gone (e.g. its machine crashed), delete {self.path}.")
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
        self.held = True
        return self

    def release(self) -> None:
        """Remove the lock file if this process still owns it."""
        if not self.held:
            return
        current = self._read()
        if current and current.get("pid") == os.getpid() and current.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------- checkpoints
def tmp_leftovers(ckpt_dir: Path) -> list[Path]:
    """Temporary checkpoint files (``.<name>.tmp-<pid>``) left by a writer that was killed."""
    return sorted(ckpt_dir.glob(".*.tmp-*")) if ckpt_dir.is_dir() else []


def _describe(paths: list[Path]) -> str:
    return ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in paths)


def resolve_ckpt_path(run_dir: Union[str, Path], ckpt_path: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh run), ``"last"`` or a path.

    Raises:
        FileNotFoundError: ``last`` without ``checkpoints/last.ckpt``, or a missing path; the message
            lists the checkpoints and temporary leftovers that are there and what to do.
    """
    if ckpt_path is None:
        return None
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = ckpt_dir / "last.ckpt" if str(ckpt_path) == "last" else Path(ckpt_path)
    if path.is_file():
        return path
    found = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    leftovers = tmp_leftovers(ckpt_dir)
    there = []
    if found:
        there.append(f"checkpoints: {_describe(found)}; resume from one with ckpt_path=<its path>")
    if leftovers:
        there.append(f"temporary files of an interrupted checkpoint write (not resumable, safe to delete): "
                     f"{_describe(leftovers)}")
    if not there:
        there.append(f"no checkpoint in {ckpt_dir}; start a fresh run with ckpt_path=null")
    raise FileNotFoundError(f"ckpt_path={ckpt_path}: {path} does not exist. Found {'; '.join(there)}. "
                            f"Nothing was trained or written.")


def check_fresh_or_resuming(run_dir: Union[str, Path], ckpt_path: Optional[Path]) -> None:
    """Refuse to start a fresh run (``ckpt_path`` None) over a run directory that already holds checkpoints.

    Raises:
        RunDirExists: one line naming the folder and the two ways forward (a new ``run_name=`` or
            ``ckpt_path=last``); nothing is written or overwritten.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if existing and ckpt_path is None:
        raise RunDirExists(
            f"{run_dir} already holds checkpoints of an earlier run ({existing[-1].name}, ...): start a new run "
            f"with run_name=<new name>, or resume this one with ckpt_path=last; nothing was overwritten.")


def remove_tmp_leftovers(ckpt_dir: Path) -> None:
    """Delete temporary checkpoint files of a killed writer (call while holding the run-dir lock)."""
    for p in tmp_leftovers(ckpt_dir):
        log.warning("removing %s, the partial write of a checkpoint that was interrupted (%.1f MB)",
                    p, p.stat().st_size / 1e6)
        p.unlink(missing_ok=True)


class _RecordingWriter:
    """File wrapper that remembers the OSError of a failed write: torch.save reports such a failure
    as a bare serializer RuntimeError, losing e.g. "No space left on device"."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exn:
            self.error = exn
            raise

    def flush(self) -> None:
        self.f.flush()


def raise_if_disk_full(cause: BaseException, what: str, after: str = "", source: Optional[BaseException] = None) -> None:
    """Re-raise a full disk or a file-size limit (ENOSPC, EDQUOT, EFBIG) as an OSError naming ``what``
    (the file being written) and saying ``after`` (what became of it); any other error: return."""
    if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
        hint = " (a file-size limit, see ulimit -f)" if cause.errno == errno.EFBIG else ""
        raise OSError(cause.errno, f"{os.strerror(cause.errno)}{hint} while writing {what}"
                                   f"{'; ' + after if after else ''}") from (source or cause)


def save_atomic(save: Callable[[object], None], path: Union[str, Path],
                opener: Callable[[Path], object] = lambda p: open(p, "wb")) -> None:
    """Write ``path`` through a temporary file in the same folder (fsync, rename).

    ``save(file)`` writes the content. On any failure the temporary file is removed and the previous
    ``path`` is left untouched; a full disk or a file-size limit (ENOSPC, EDQUOT, EFBIG) is re-raised
    as an OSError whose message says so and names ``path``. ``opener`` is for tests (a file object
    whose writes fail).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = None
    try:
        with opener(tmp) as f:
            writer = _RecordingWriter(f)
            save(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exn:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else exn
        raise_if_disk_full(cause, f"checkpoint {path}", "the partial file was removed and earlier checkpoints are "
                                                        "unchanged", exn)
        raise


# ---------------------------------------------------------------------------------- metrics
def load_or_compute_before(run_dir: Union[str, Path], compute: Callable[[], dict], resuming: bool,
                           enabled: bool = True) -> dict:
    """The "before training" metrics: computed once at the start of a fresh run and saved
    (atomically) as ``before_metrics.json``; a resumed run reads them back instead of measuring a
    half-trained model."""
    path = Path(run_dir) / BEFORE_NAME
    if resuming:
        if path.is_file():
            return json.loads(path.read_text())
        if enabled:
            log.warning("%s is missing (the first attempt stopped before measuring it): metrics.json will "
                        "have no 'before' metrics", path)
        return {}
    if not enabled:
        return {}
    before = compute()  # on every rank: validation is collective
    if is_launch_owner():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(before, indent=2))
        os.replace(tmp, path)
    return before


def archive_metrics_log(log_dir: Union[str, Path]) -> Optional[Path]:
    """Move ``metrics.csv`` of an earlier attempt aside (``metrics.attempt-N.csv``) before a resumed
    run's CSV logger starts, since the logger deletes an existing ``metrics.csv``."""
    log_dir = Path(log_dir)
    current = log_dir / "metrics.csv"
    if not current.is_file():
        return None
    n = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in log_dir.glob(ATTEMPT_GLOB)), default=0)
    target = log_dir / f"metrics.attempt-{n}.csv"
    os.replace(current, target)
    return target


def _row_key(row: dict) -> tuple:
    # a step logs several kinds of rows (training, validation): the row's filled columns tell them apart
    return int(float(row["step"])), frozenset(k for k, v in row.items() if v not in ("", None) and k != "step")


def merge_metrics_logs(log_dir: Union[str, Path]) -> Optional[Path]:
    """Merge the archived attempts and the current ``metrics.csv`` into ``metrics.csv``.

    Rows are keyed by (step, filled columns); a later attempt's row replaces an earlier one with the
    same key, so steps that a killed attempt ran after its last checkpoint, and that the resumed
    attempt ran again, appear once (the resumed run's). Rows are ordered by step. The archived files
    stay beside it. Returns the merged file, or None when there was nothing to merge.
    """
    log_dir = Path(log_dir)
    attempts = sorted(log_dir.glob(ATTEMPT_GLOB), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    files = attempts + [p for p in [log_dir / "metrics.csv"] if p.is_file()]
    if not attempts:
        return None
    rows: dict[tuple, tuple[int, dict]] = {}
    fields: list[str] = []
    order = 0
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields += [k for k in reader.fieldnames or [] if k not in fields]
            for row in reader:
                key = _row_key(row)
                rows[key] = (rows[key][0] if key in rows else order, row)
                order += 1
    merged = sorted(rows.values(), key=lambda item: (_row_key(item[1])[0], item[0]))
    out = log_dir / "metrics.csv"
    tmp = out.with_name(".metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted(fields))
        writer.writeheader()
        writer.writerows(row for _, row in merged)
    os.replace(tmp, out)
    return out
