"""The runner loop: plan keys, write the view, take the range lock, skip finished keys, run, write parts.

:func:`run_stage` is the only place jobs get keys and outcomes get written. A stage hands it its
:class:`~cultureclip.curate.runner.jobs.Job` list and a ``process`` function that turns an iterator of
job dicts into one :class:`~cultureclip.curate.runner.jobs.Outcome` per job, in any order (so it may
batch, or keep many requests in flight). The backend is built lazily inside ``process``: a rerun with
nothing to do never reaches it, so it loads no model and opens no connection.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from cultureclip import schema
from cultureclip.curate.runner.jobs import (Job, Outcome, StageReport, iter_keyed, job_dict, job_id, keyed,
                                            range_bounds)
from cultureclip.curate.runner.keys import digest
from cultureclip.curate.runner.store import (ERRORS, KINDS, MANIFESTS, PARTS, REJECTED, REPORTS, Index, Store,
                                             line_key, record_line, write_atomic)
from cultureclip.progress import Progress
from cultureclip.rundir import RunDirLock, RunDirLocked

log = logging.getLogger(__name__)

Process = Callable[[Iterator[Mapping]], Iterable[Outcome]]


class _Writer:
    """Appends parts of one job range: part file first (atomic), then one manifest line (fsynced)."""

    def __init__(self, store: Store, job: str, index: Index) -> None:
        self.store, self.job = store, job
        self.manifest = store.root / MANIFESTS / f"{job}.jsonl"
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        self._repair_manifest()
        # one listing per run (not per part): the next part number, and parts a kill left unlisted
        self.next = 0
        for kind in KINDS:
            folder = store.root / kind
            for path in sorted(folder.glob(f"part-{job}-*.jsonl")) if folder.is_dir() else []:
                self.next = max(self.next, int(path.stem.rsplit("-", 1)[1]) + 1)
                if f"{kind}/{path.name}" not in index.listed:
                    log.warning("%s was written but not listed (a run was killed in between); listing it", path)
                    data = path.read_bytes()
                    keys = [line_key(line) for line in data.splitlines()]
                    self._append(kind, path.name, data, keys, index)

    def _repair_manifest(self) -> None:
        """Cut a torn last line (a kill mid-append) so the next line starts clean."""
        if self.manifest.is_file():
            data = self.manifest.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.manifest, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def _append(self, kind: str, name: str, data: bytes, keys: list, index: Index) -> None:
        entry = {"kind": kind, "part": name, "records": len(keys), "sha256": hashlib.sha256(data).hexdigest(),
                 "keys": keys}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        index.add(entry)

    def write(self, kind: str, rows: list[tuple[str, dict]], index: Index) -> None:
        if not rows:
            return
        name = f"part-{self.job}-{self.next:06d}.jsonl"
        self.next += 1
        data = "".join(record_line(k, r) + "\n" for k, r in rows).encode("utf-8")
        write_atomic(self.store.root / kind / name, data)
        self._append(kind, name, data, [k for k, _ in rows], index)


def plan(store: Store, jobs: Iterable[Job], upstream: Sequence[Store] = (),
         fingerprint: Optional[str] = None) -> tuple[list[dict], int]:
    """Key the jobs and make them the store's current view, planned from the current views of ``upstream``
    (and under ``fingerprint``, see :func:`up_to_date`); returns the job dicts and the duplicates merged."""
    keyed_jobs, dup = keyed(store.stage, jobs)
    store.write_view((j[schema.REC_KEY] for j in keyed_jobs), upstream, fingerprint)
    return keyed_jobs, dup


def run_stage(store: Store, jobs: Union[Iterable[Job], Callable[[], Iterable[Job]]], process: Process, *,
              shard_index: int = 0, num_shards: int = 1, retry_errors: bool = True, part_size: int = 512,
              part_seconds: float = 30.0, log_every: float = 30.0, upstream: Sequence[Store] = (),
              fingerprint: Optional[str] = None, keyed_jobs: Optional[list[dict]] = None) -> StageReport:
    """Plan ``jobs`` (keys, view) and run ``process`` over this range's unfinished ones.

    Args:
        store: the stage's store.
        jobs: every job of the stage (all ranges): a list or a generator, or a function returning a fresh
            iterator of them. With a function the plan streams: a first pass keeps only the keys (view,
            ranges, finished keys), a second makes the job dicts of this range's unfinished jobs as
            ``process`` consumes them, so memory holds keys, not a million job dicts.
        process: takes an iterator of job dicts and yields exactly one Outcome per job.
        shard_index, num_shards: which contiguous range of the key-sorted jobs this process does.
        retry_errors: redo jobs that ended in an error in an earlier run (rejections are never redone).
        part_size, part_seconds: a part is written after this many outcomes or seconds, whichever first.
        log_every: seconds between plain progress lines when stderr is not a terminal
            (:mod:`cultureclip.progress`).
        upstream: the stores whose current views the jobs were planned from (recorded in the view).
        fingerprint: :func:`fingerprint` of what the plan depends on (recorded in the view).
        keyed_jobs: already planned job dicts (:func:`plan`), instead of ``jobs``.

    Returns:
        The :class:`StageReport`, also written to ``reports/<job>.json``.

    Raises:
        RunDirLocked: another process runs this range. RuntimeError: ``process`` returned an outcome for
        an unknown key, twice for one key, or none for some job (a bug in the stage).
    """
    job = job_id(shard_index, num_shards)
    streaming = keyed_jobs is None and callable(jobs)
    dup = 0
    if streaming:  # pass 1: the keys only
        all_keys = [k for k, _ in iter_keyed(store.stage, jobs())]
        keys = sorted(set(all_keys))
        dup = len(all_keys) - len(keys)
        del all_keys
        store.write_view(keys, upstream, fingerprint)
    else:
        if keyed_jobs is None:
            keyed_jobs, dup = plan(store, jobs, upstream, fingerprint)
        keys = [j[schema.REC_KEY] for j in keyed_jobs]
    n = len(keys)
    lo, hi = range_bounds(n, shard_index, num_shards)
    mine = keys[lo:hi]
    lock = RunDirLock(store.root / ".jobs" / job)
    try:
        lock.acquire()
    except RunDirLocked as exc:
        raise RunDirLocked(f"stage {store.stage} range {job} in {store.root} is being run by another process "
                           f"({exc}); run another shard_index, or wait") from exc
    try:  # done keys are read under the lock: a process that finished the range just before is seen
        index = store.index()
        writer = _Writer(store, job, index)
        todo = {k for k in mine if not index.finished(k) and (retry_errors or k not in index.errors)}
        report = StageReport(stage=store.stage, job=job, jobs_total=n, jobs_in_range=len(mine),
                             done_before=sum(index.finished(k) for k in mine))
        if dup:
            report.extra["duplicate_jobs"] = dup
        if streaming:  # pass 2: the job dicts of this range's unfinished jobs, made as process takes them
            todo_jobs = _stream(store.stage, jobs, todo)
        else:
            todo_jobs = iter([j for j in keyed_jobs if j[schema.REC_KEY] in todo])
            del keyed_jobs
        _loop(store, todo_jobs, set(todo), process, writer, index, report, part_size, part_seconds, log_every)
    finally:
        lock.release()
    return report


def _stream(stage: str, jobs: Callable[[], Iterable[Job]], todo: set) -> Iterator[dict]:
    left = set(todo)
    for key, job in iter_keyed(stage, jobs()):
        if key in left:
            left.discard(key)
            yield job_dict(key, job)


def fingerprint(settings: Mapping, prompts: Sequence[str] = (), upstream: Sequence[Store] = ()) -> str:
    """A digest of everything a stage's plan depends on: its settings that matter, the text of its prompt
    files and the current views of its upstream stores (whose keys hash their records' content)."""
    from cultureclip.curate.prompts import texts
    return digest({"settings": dict(settings), "prompts": texts(prompts),
                   "upstream": {u.stage: u.view_digest() for u in upstream}})


def up_to_date(store: Store, fp: str, shard_index: int = 0, num_shards: int = 1) -> Optional[StageReport]:
    """The report of a run with nothing to do, without planning: when the current view was planned under
    fingerprint ``fp`` (so planning again would give the same keys) and every key of it is done or
    rejected. None otherwise (the stage plans and runs as usual).

    This is what makes a rerun of a million finished jobs cost a read of the view and the manifests
    instead of re-reading every upstream record and hashing every job again.
    """
    if not store.has_view() or store.view_meta().get("fingerprint") != fp:
        return None
    view = store.view()
    index = store.index()
    if any(not index.finished(k) for k in view):
        return None
    job = job_id(shard_index, num_shards)
    n = len(view)
    lo, hi = range_bounds(n, shard_index, num_shards)
    in_range = hi - lo
    report = StageReport(stage=store.stage, job=job, jobs_total=n, jobs_in_range=in_range, done_before=in_range,
                         extra={"planned": False})
    save_report(store, report)
    return report


def save_report(store: Store, report: StageReport) -> None:
    """Write ``reports/<job>.json`` (stages call it again after adding to ``report.extra``)."""
    write_atomic(store.root / REPORTS / f"{report.job}.json", json.dumps(asdict(report), indent=1))


def _loop(store, todo, pending, process, writer, index, report, part_size, part_seconds, log_every) -> None:
    n_todo = len(pending)
    buf: dict[str, list] = {PARTS: [], REJECTED: [], ERRORS: []}
    errors: Counter = Counter()
    rejected: Counter = Counter()
    start = last_part = time.monotonic()
    # the stage report line (curate.app.format_report) is the summary: the bar itself goes when done
    bar = Progress(f"{store.stage} {writer.job}", total=n_todo, unit="jobs", every_s=log_every, summary=False)

    def flush() -> None:
        for kind, rows in buf.items():
            writer.write(kind, rows, index)
            rows.clear()

    try:
        for outcome in process(todo) if pending else ():
            if outcome.key not in pending:
                raise RuntimeError(f"stage {store.stage}: outcome for key {outcome.key} that is not pending "
                                   f"(unknown, or returned twice)")
            pending.discard(outcome.key)
            report.processed += 1
            if outcome.record is not None:
                buf[PARTS].append((outcome.key, outcome.record))
                report.ok += 1
            elif outcome.rejected is not None:
                buf[REJECTED].append((outcome.key, {schema.REASON: outcome.rejected,
                                                    schema.REC_MESSAGE: outcome.message}))
                rejected[outcome.rejected] += 1
            else:
                buf[ERRORS].append((outcome.key, {schema.REC_STAGE: store.stage, schema.REC_ERROR: outcome.error,
                                                  schema.REC_MESSAGE: outcome.message,
                                                  schema.REC_ATTEMPTS: outcome.attempts}))
                errors[outcome.error] += 1
            now = time.monotonic()
            if sum(map(len, buf.values())) >= part_size or now - last_part >= part_seconds:
                flush()
                last_part = now
            bar.update(errors=int(outcome.record is None and outcome.rejected is None))
    finally:
        bar.close()
        flush()  # finished outcomes are kept even when the run stops with an exception
        report.errors, report.errors_by_reason = sum(errors.values()), dict(sorted(errors.items()))
        report.rejected, report.rejected_by_reason = sum(rejected.values()), dict(sorted(rejected.items()))
        report.seconds = round(time.monotonic() - start, 3)
        save_report(store, report)
    if pending:
        raise RuntimeError(f"stage {store.stage}: no outcome for {len(pending)} jobs, e.g. {sorted(pending)[0]}")
