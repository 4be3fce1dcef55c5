"""Curation records on disk: stable keys, atomic part files, resumption, job ranges, errors, reports.

Every curation stage (render, judge, export, ...) turns a list of *jobs* into *records*. A job is a
dict with a stable :func:`record_key` (a hash of its inputs, the model id, the prompt version and the
seed), so the same work always has the same key, whatever the order of the input or the process that
does it. A stage folder holds::

    stage.json                      the settings its keys depend on (a rerun with others is refused)
    parts/part-<job>-<n>.jsonl      finished records, one JSON object per line
    errors/part-<job>-<n>.jsonl     jobs that failed after their retries: key, reason, message, attempts
    manifests/<job>.json            that job range's parts, with their record counts and sha256
    reports/<job>.json              counts of the last run of that job range

``<job>`` names a job range, ``00000of00001`` for a single process. Every file is written to a
temporary name, fsynced and renamed into place, so a part is either complete or absent: after a crash
at any moment (kill -9 included) the same command skips every key that is in a part and redoes only
the rest, which gives no duplicate and no missing record. Readers deduplicate by key anyway (first
part in name order wins), so even two processes given the same range by mistake cannot duplicate.

Failed jobs are not dropped: they go to the errors files with a reason and are counted in the
report. A rerun retries them (``retry_errors=True``, the default): a server that was down may be up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from cultureclip import schema
from cultureclip.progress import Progress
from cultureclip.rundir import RunDirLock, RunDirLocked, raise_if_disk_full

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
STAGE_FILE = "stage.json"
PARTS, ERRORS, MANIFESTS, REPORTS = "parts", "errors", "manifests", "reports"
KEY_CHARS = 24  # 96 bits of sha256: no collision in any realistic dataset


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same string."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_key(stage: str, inputs: Mapping[str, Any], model: str = "", prompt_version: str = "",
               seed: Optional[int] = None) -> str:
    """The stable key of one unit of work.

    Args:
        stage: the stage name (keys of different stages never collide).
        inputs: everything the output depends on besides model, prompt and seed (texts, sizes, ...),
            JSON-serialisable.
        model: the model id of the backend.
        prompt_version: the version of the prompt or template, bumped whenever its text changes.
        seed: the seed, if the output is random.

    Returns:
        A hex string of :data:`KEY_CHARS` characters.
    """
    payload = canonical_json({"stage": stage, "inputs": inputs, "model": model,
                              "prompt_version": prompt_version, "seed": seed})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:KEY_CHARS]


def seed_from_key(key: str) -> int:
    """A generator seed (0 <= seed < 2**63) derived from a record key."""
    return int(hashlib.sha256(("seed:" + key).encode()).hexdigest()[:16], 16) >> 1


def job_id(shard_index: int, num_shards: int) -> str:
    """The name of a job range, e.g. ``00002of00008``."""
    if not (isinstance(shard_index, int) and isinstance(num_shards, int) and 0 <= shard_index < num_shards):
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
                         f"num_shards={num_shards}")
    return f"{shard_index:05d}of{num_shards:05d}"


def job_range(jobs: Sequence[Mapping], shard_index: int = 0, num_shards: int = 1) -> list[Mapping]:
    """This process's share of ``jobs``: a contiguous slice of the jobs sorted by key.

    The slices of ``shard_index = 0 .. num_shards-1`` are disjoint and cover every job, whatever the
    input order (the sort is by key), so job arrays (SLURM ``$SLURM_ARRAY_TASK_ID``) and one process
    per GPU can split a stage with no coordination.
    """
    job_id(shard_index, num_shards)  # validates
    ordered = sorted(jobs, key=lambda j: j[schema.REC_KEY])
    n = len(ordered)
    return ordered[n * shard_index // num_shards: n * (shard_index + 1) // num_shards]


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, str(path), "the partial file was removed")  # the bare errno names no file
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _json_files(folder: Path) -> list[Path]:
    """The ``*.json`` files of ``folder``, sorted, without the temporary files of :func:`write_atomic`."""
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []


class StageMismatchError(ValueError):
    """A stage folder was made with other settings than the current ones."""


@dataclass
class Outcome:
    """What a stage made of one job: a record, or an error after ``attempts`` tries."""

    key: str
    record: Optional[dict] = None
    error: Optional[str] = None  # a short reason, e.g. "schema_violation", "http_503"
    message: str = ""
    attempts: int = 1

    def __post_init__(self) -> None:
        if (self.record is None) == (self.error is None):
            raise ValueError(f"outcome {self.key}: exactly one of record and error must be given")


@dataclass
class StageReport:
    """Counts of one run of a stage over one job range."""

    stage: str
    job: str
    jobs_total: int = 0  # jobs of the whole stage (all ranges)
    jobs_in_range: int = 0
    done_before: int = 0  # skipped because a previous run finished them
    processed: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_reason: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class StageStore:
    """One stage's output folder (see the module docstring).

    Args:
        root: the stage folder, e.g. ``out/render``.
        stage: the stage name.
        settings: the settings the record keys depend on (model id, prompt version, sizes...); stored in
            ``stage.json`` on first use. A later run with different settings raises
            :class:`StageMismatchError` naming the keys that differ, rather than mixing records.
    """

    def __init__(self, root: PathLike, stage: str, settings: Optional[Mapping[str, Any]] = None) -> None:
        self.root, self.stage = Path(root), stage
        self.settings = json.loads(canonical_json(dict(settings or {})))  # plain JSON types
        if settings is not None:
            self._check_settings()

    def _check_settings(self) -> None:
        path = self.root / STAGE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("stage") != self.stage or stored.get("settings") != self.settings:
                old = stored.get("settings") or {}
                diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise StageMismatchError(
                    f"{self.root} holds stage {stored.get('stage')!r} output made with other settings "
                    f"(differing: {diff}; stored in {path}). Use another output folder, or delete it to start over.")
        else:
            write_atomic(path, json.dumps({"stage": self.stage, "settings": self.settings}, indent=1,
                                          sort_keys=True, ensure_ascii=False))

    # ------------------------------------------------------------------ reading
    def _part_files(self, kind: str) -> list[Path]:
        folder = self.root / kind
        return sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []

    def _read_lines(self, kind: str) -> Iterator[tuple[str, dict]]:
        for path in self._part_files(kind):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except ValueError as exc:  # parts are written atomically: this is damage, not a crash
                        raise ValueError(f"{path}:{lineno}: damaged record file: {exc}") from exc

    def records(self) -> list[dict]:
        """Every finished record, sorted by key, each key once."""
        by_key: dict[str, dict] = {}
        duplicates = 0
        for _, rec in self._read_lines(PARTS):
            if rec[schema.REC_KEY] in by_key:
                duplicates += 1
                continue
            by_key[rec[schema.REC_KEY]] = rec
        if duplicates:
            log.warning("%s: %d duplicate records ignored (two processes were given the same job range?)",
                        self.root, duplicates)
        return [by_key[k] for k in sorted(by_key)]

    def done_keys(self) -> set[str]:
        """Keys of finished records."""
        return {rec[schema.REC_KEY] for _, rec in self._read_lines(PARTS)}

    def errors(self) -> dict[str, dict]:
        """The latest error of every key that has no finished record, by key."""
        done = self.done_keys()
        latest: dict[str, dict] = {}
        for _, rec in self._read_lines(ERRORS):
            if rec[schema.REC_KEY] not in done:
                latest[rec[schema.REC_KEY]] = rec
        return dict(sorted(latest.items()))

    def reports(self) -> list[dict]:
        """The last report of every job range."""
        folder = self.root / REPORTS
        return [json.loads(p.read_text()) for p in _json_files(folder)]

    def verify(self) -> None:
        """Check every part against the manifests (record count and sha256); raise ValueError naming it."""
        listed: dict[str, dict] = {}
        for path in _json_files(self.root / MANIFESTS):
            listed.update(json.loads(path.read_text())["parts"])
        for path in self._part_files(PARTS) + self._part_files(ERRORS):
            rel = f"{path.parent.name}/{path.name}"
            entry = listed.get(rel)
            if entry is None:  # written, then killed before the manifest: complete but unlisted
                log.warning("%s is not in a manifest (a run was killed right after writing it)", path)
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"] or data.count(b"\n") != entry["records"]:
                raise ValueError(f"{path} does not match its manifest (changed or truncated since written)")

    # ------------------------------------------------------------------ writing
    def save_report(self, report: StageReport) -> None:
        """Write ``reports/<job>.json``; stages call it again after adding to ``report.extra``."""
        write_atomic(self.root / REPORTS / f"{report.job}.json", json.dumps(asdict(report), indent=1))

    def _next_part(self, kind: str, job: str) -> Path:
        existing = [p for p in self._part_files(kind) if p.name.startswith(f"part-{job}-")]
        n = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)
        return self.root / kind / f"part-{job}-{n:06d}.jsonl"

    def _write_part(self, kind: str, job: str, rows: list[dict], manifest: dict) -> None:
        if not rows:
            return
        path = self._next_part(kind, job)
        data = "".join(canonical_json(r) + "\n" for r in rows).encode("utf-8")
        write_atomic(path, data)
        manifest["parts"][f"{kind}/{path.name}"] = {"records": len(rows),
                                                    "sha256": hashlib.sha256(data).hexdigest()}
        write_atomic(self.root / MANIFESTS / f"{job}.json", json.dumps(manifest, indent=1, sort_keys=True))

    def _manifest(self, job: str) -> dict:
        path = self.root / MANIFESTS / f"{job}.json"
        return json.loads(path.read_text()) if path.is_file() else {"stage": self.stage, "job": job, "parts": {}}

    def run(self, jobs: Sequence[Mapping], process: Callable[[Iterator[Mapping]], Iterable[Outcome]], *,
            shard_index: int = 0, num_shards: int = 1, retry_errors: bool = True, part_size: int = 512,
            part_seconds: float = 30.0, log_every: float = 30.0) -> StageReport:
        """Run ``process`` over this range's unfinished jobs, writing records and errors as parts.

        Args:
            jobs: every job of the stage; each a mapping with a unique ``key``.
            process: takes an iterator of jobs and yields exactly one :class:`Outcome` per job, in any
                order (so it may batch, or keep several requests in flight).
            shard_index, num_shards: which contiguous range of the key-sorted jobs this process does.
            retry_errors: redo jobs that ended in an error in an earlier run (else they stay errors).
            part_size, part_seconds: a part is written after this many outcomes or seconds, whichever
                comes first; at most that much work is redone after a crash.
            log_every: seconds between plain progress lines when stderr is not a terminal
                (:mod:`cultureclip.progress`).

        Returns:
            The :class:`StageReport`, also written to ``reports/<job>.json``.

        Raises:
            RuntimeError: ``process`` returned an outcome for an unknown key, twice for one key, or
                none for some job (a bug in the stage, not a data problem).
        """
        job = job_id(shard_index, num_shards)
        keys = [j[schema.REC_KEY] for j in jobs]
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in Counter(keys).items() if n > 1)
            raise ValueError(f"stage {self.stage}: job key {dup} appears more than once")
        mine = job_range(jobs, shard_index, num_shards)
        done = self.done_keys()
        if not retry_errors:
            done |= set(self.errors())
        todo = [j for j in mine if j[schema.REC_KEY] not in done]
        report = StageReport(stage=self.stage, job=job, jobs_total=len(jobs), jobs_in_range=len(mine),
                             done_before=len(mine) - len(todo))
        lock = RunDirLock(self.root / ".jobs" / job)
        try:
            lock.acquire()
        except RunDirLocked as exc:
            raise RunDirLocked(f"stage {self.stage} range {job} in {self.root} is being run by another "
                               f"process ({exc}); run another shard_index, or wait") from exc
        try:
            self._run(todo, process, job, report, part_size, part_seconds, log_every)
        finally:
            lock.release()
        return report

    def _run(self, todo, process, job, report, part_size, part_seconds, log_every) -> None:
        pending = {j[schema.REC_KEY] for j in todo}
        manifest = self._manifest(job)
        good: list[dict] = []
        bad: list[dict] = []
        reasons: Counter = Counter()
        start = last_part = time.monotonic()
        # the stage report line (curate.app.format_report) is the summary: the bar itself goes when done
        bar = Progress(f"{self.stage} {job}", total=len(todo), unit="jobs", every_s=log_every, summary=False)

        def flush() -> None:
            self._write_part(PARTS, job, good, manifest)
            self._write_part(ERRORS, job, bad, manifest)
            good.clear()
            bad.clear()

        try:
            for outcome in process(iter(todo)):
                if outcome.key not in pending:
                    raise RuntimeError(f"stage {self.stage}: outcome for key {outcome.key} that is not pending "
                                       f"(unknown, or returned twice)")
                pending.discard(outcome.key)
                report.processed += 1
                if outcome.record is not None:
                    good.append({schema.REC_KEY: outcome.key, **outcome.record})
                    report.ok += 1
                else:
                    bad.append({schema.REC_KEY: outcome.key, schema.REC_STAGE: self.stage,
                                schema.REC_ERROR: outcome.error, schema.REC_MESSAGE: outcome.message,
                                schema.REC_ATTEMPTS: outcome.attempts})
                    reasons[outcome.error] += 1
                now = time.monotonic()
                if len(good) + len(bad) >= part_size or now - last_part >= part_seconds:
                    flush()
                    last_part = now
                bar.update(errors=int(outcome.record is None))
        finally:
            bar.close()
            flush()  # finished outcomes are kept even when the run stops with an exception
            report.errors = sum(reasons.values())
            report.errors_by_reason = dict(sorted(reasons.items()))
            report.seconds = round(time.monotonic() - start, 3)
            self.save_report(report)
        if pending:
            raise RuntimeError(f"stage {self.stage}: no outcome for {len(pending)} jobs, e.g. {sorted(pending)[0]}")
