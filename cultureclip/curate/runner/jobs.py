"""What a stage hands the runner (:class:`Job`) and what it gets back for each job (:class:`Outcome`).

Three outcomes: **done** (a record), **rejected** (a rule decision, or a valid answer that failed a
check: permanent, counted, never retried or re-billed) and **error** (transient: a server down, a
timeout, an answer that kept violating its schema; retried on the next run).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate.runner.keys import job_key


@dataclass
class Job:
    """One unit of work as a stage declares it; the runner derives its key.

    Attributes:
        inputs: the job's own data, every upstream field it reads (JSON); part of the key.
        model: the backend model id ("" for none); part of the key.
        prompts: names of the prompt files the job uses; their *text* is part of the key.
        settings: the stage settings that change this job's output; part of the key.
        reads: content hashes of whole upstream records the job reads; part of the key.
        extra: what ``process`` needs besides ``inputs`` but the output does not depend on (e.g. the
            input file and line, for messages); not part of the key.
    """

    inputs: dict
    model: str = ""
    prompts: Sequence[str] = ()
    settings: dict = field(default_factory=dict)
    reads: Sequence[str] = ()
    extra: dict = field(default_factory=dict)

    def key(self, stage: str, prompt_hashes: Optional[Mapping[str, str]] = None) -> str:
        """The job's key (see :func:`cultureclip.curate.runner.keys.job_key`): the prompts enter as the
        sha256 of their text; ``prompt_hashes`` saves reading the files again for every job."""
        if prompt_hashes is None:
            from cultureclip.curate.prompts import texts
            prompt_hashes = {n: hashlib.sha256(t.encode("utf-8")).hexdigest() for n, t in texts(self.prompts).items()}
        return job_key(stage, self.inputs, self.model, prompt_hashes, self.settings, self.reads)


def iter_keyed(stage: str, jobs: Iterable[Job]) -> Iterator[tuple[str, Job]]:
    """``(key, job)`` of every job, in the order given (each prompt file read once)."""
    from cultureclip.curate.prompts import texts
    read: dict[tuple, dict] = {}
    for job in jobs:
        names = tuple(job.prompts)
        if names not in read:  # the key hashes each text's sha256: the same content, ~1 kB less JSON per job
            read[names] = {n: hashlib.sha256(t.encode("utf-8")).hexdigest() for n, t in texts(names).items()}
        yield job.key(stage, read[names]), job


def job_dict(key: str, job: Job) -> dict:
    """What ``process`` gets for a job: ``{**extra, **inputs, "key": key}``."""
    return {**job.extra, **job.inputs, schema.REC_KEY: key}


def keyed(stage: str, jobs: Iterable[Job]) -> tuple[list[dict], int]:
    """The job dicts ``process`` gets, each key once, sorted by key, and how many duplicate jobs (same key:
    the same work) were merged. ``jobs`` may be a generator: only the job dicts are kept."""
    out: dict[str, dict] = {}
    dup = 0
    for k, job in iter_keyed(stage, jobs):
        if k in out:
            dup += 1
            continue
        out[k] = job_dict(k, job)
    return [out[k] for k in sorted(out)], dup


@dataclass
class Outcome:
    """What a stage made of one job: exactly one of a ``record``, a ``rejected`` reason or an ``error`` reason."""

    key: str
    record: Optional[dict] = None
    error: Optional[str] = None  # a short reason, e.g. "schema_violation", "http_503"
    rejected: Optional[str] = None  # a short reason, e.g. "no_country", "incomplete_caption_set"
    message: str = ""
    attempts: int = 1

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.record, self.error, self.rejected)) != 1:
            raise ValueError(f"outcome {self.key}: exactly one of record, rejected and error must be given")


@dataclass
class StageReport:
    """Counts of one run of a stage over one job range."""

    stage: str
    job: str
    jobs_total: int = 0  # current jobs of the whole stage (all ranges)
    jobs_in_range: int = 0
    done_before: int = 0  # finished (done or rejected) by an earlier run
    processed: int = 0
    ok: int = 0
    rejected: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    errors: int = 0
    errors_by_reason: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def job_id(shard_index: int, num_shards: int) -> str:
    """The name of a job range, e.g. ``00002of00008``."""
    if not (isinstance(shard_index, int) and isinstance(num_shards, int) and 0 <= shard_index < num_shards):
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
                         f"num_shards={num_shards}")
    return f"{shard_index:05d}of{num_shards:05d}"


def range_bounds(n: int, shard_index: int = 0, num_shards: int = 1) -> tuple[int, int]:
    """``(lo, hi)``: the slice of ``n`` key-sorted jobs that range ``shard_index`` of ``num_shards`` runs
    (contiguous, disjoint across ranges, covering all); the one place the split is computed."""
    job_id(shard_index, num_shards)  # validates
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


def job_range(jobs: Sequence[Mapping], shard_index: int = 0, num_shards: int = 1) -> list[Mapping]:
    """This process's share of ``jobs``: a contiguous slice of the jobs sorted by key.

    The slices of ``shard_index = 0 .. num_shards-1`` are disjoint and cover every job, whatever the
    input order, so job arrays (SLURM ``$SLURM_ARRAY_TASK_ID``) and one process per GPU split a stage
    with no coordination.
    """
    ordered = sorted(jobs, key=lambda j: j[schema.REC_KEY])
    lo, hi = range_bounds(len(ordered), shard_index, num_shards)
    return ordered[lo:hi]
