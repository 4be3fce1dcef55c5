"""The curation record store: stable keys, job ranges, resumption, errors, manifests."""
import hashlib
import json
import random

import pytest

from cultureclip import schema
from cultureclip.curate.records import (Outcome, StageMismatchError, StageStore, job_range, record_key,
                                        seed_from_key)


def _jobs(n):
    return [{schema.REC_KEY: record_key("t", {"i": i}), "i": i} for i in range(n)]


def _square(fail=()):
    def process(jobs):
        for job in jobs:
            if job["i"] in fail:
                yield Outcome(job[schema.REC_KEY], error="odd_input", message=f"cannot do {job['i']}")
            else:
                yield Outcome(job[schema.REC_KEY], record={"i": job["i"], "sq": job["i"] ** 2})
    return process


def test_record_key_is_a_stable_hash_of_everything_it_names():
    a = record_key("render", {"caption": "x", "w": 512}, model="m", prompt_version="1", seed=3)
    # the same inputs in another order give the same key; the key is the sha256 of the canonical JSON
    assert a == record_key("render", {"w": 512, "caption": "x"}, model="m", prompt_version="1", seed=3)
    payload = json.dumps({"stage": "render", "inputs": {"caption": "x", "w": 512}, "model": "m",
                          "prompt_version": "1", "seed": 3}, sort_keys=True, separators=(",", ":"))
    assert a == hashlib.sha256(payload.encode()).hexdigest()[:len(a)]
    others = [record_key("render", {"caption": "x", "w": 512}, model="m2", prompt_version="1", seed=3),
              record_key("render", {"caption": "x", "w": 512}, model="m", prompt_version="2", seed=3),
              record_key("render", {"caption": "x", "w": 512}, model="m", prompt_version="1", seed=4),
              record_key("judge", {"caption": "x", "w": 512}, model="m", prompt_version="1", seed=3)]
    assert len({a, *others}) == 5
    assert 0 <= seed_from_key(a) < 2 ** 63 and seed_from_key(a) != seed_from_key(others[0])


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_job_ranges_are_disjoint_cover_everything_and_ignore_input_order(num_shards):
    jobs = _jobs(20)
    shuffled = random.Random(1).sample(jobs, len(jobs))
    parts = [job_range(jobs, i, num_shards) for i in range(num_shards)]
    keys = [j[schema.REC_KEY] for p in parts for j in p]
    assert sorted(keys) == sorted(j[schema.REC_KEY] for j in jobs) and len(set(keys)) == len(keys)
    assert parts == [job_range(shuffled, i, num_shards) for i in range(num_shards)]
    with pytest.raises(ValueError, match="shard_index"):
        job_range(jobs, num_shards, num_shards)


def test_run_writes_records_and_errors_and_a_rerun_only_retries_the_errors(tmp_path):
    jobs = _jobs(10)
    store = StageStore(tmp_path / "t", "t", {"model": "m"})
    report = store.run(jobs, _square(fail={3, 5}), part_size=4)
    assert (report.ok, report.errors, report.errors_by_reason) == (8, 2, {"odd_input": 2})
    assert [r["sq"] for r in store.records()] == [r["sq"] for r in sorted(
        ({schema.REC_KEY: j[schema.REC_KEY], "sq": j["i"] ** 2} for j in jobs if j["i"] not in (3, 5)),
        key=lambda r: r[schema.REC_KEY])]
    errors = store.errors()
    assert sorted(e[schema.REC_MESSAGE] for e in errors.values()) == ["cannot do 3", "cannot do 5"]
    store.verify()

    seen = []

    def spy(inner):
        def process(it):
            for job in it:
                seen.append(job["i"])
                yield from inner(iter([job]))
        return process

    kept = StageStore(tmp_path / "t", "t", {"model": "m"}).run(jobs, spy(_square(fail={3, 5})), retry_errors=False)
    assert seen == [] and kept.done_before == 10
    again = StageStore(tmp_path / "t", "t", {"model": "m"}).run(jobs, spy(_square()))
    assert sorted(seen) == [3, 5] and again.done_before == 8 and again.ok == 2
    assert len(store.records()) == 10 and store.errors() == {}  # a later success supersedes the error


def test_a_crash_keeps_finished_work_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
    jobs = _jobs(12)

    def crashing(it):
        for n, job in enumerate(it):
            if n == 7:
                raise KeyboardInterrupt
            yield Outcome(job[schema.REC_KEY], record={"i": job["i"], "sq": job["i"] ** 2})

    crashed = StageStore(tmp_path / "a", "t", {})
    with pytest.raises(KeyboardInterrupt):
        crashed.run(jobs, crashing, part_size=100)
    assert len(crashed.records()) == 7  # buffered outcomes were written on the way out
    report = crashed.run(jobs, _square())
    assert (report.done_before, report.ok) == (7, 5)
    clean = StageStore(tmp_path / "b", "t", {})
    clean.run(jobs, _square())
    assert crashed.records() == clean.records()


def test_bad_process_functions_and_changed_settings_are_refused(tmp_path):
    jobs = _jobs(3)

    def twice(it):
        job = next(it)
        yield Outcome(job[schema.REC_KEY], record={})
        yield Outcome(job[schema.REC_KEY], record={})

    with pytest.raises(RuntimeError, match="not pending"):
        StageStore(tmp_path / "x", "t").run(jobs, twice)
    with pytest.raises(RuntimeError, match="no outcome for 2 jobs"):
        StageStore(tmp_path / "y", "t").run(jobs, lambda it: iter([Outcome(next(it)[schema.REC_KEY], record={})]))
    with pytest.raises(ValueError, match="more than once"):
        StageStore(tmp_path / "z", "t").run(jobs + jobs[:1], _square())
    with pytest.raises(ValueError, match="exactly one"):
        Outcome("k")
    StageStore(tmp_path / "s", "t", {"model": "a", "steps": 4})
    with pytest.raises(StageMismatchError, match=r"\['model'\]"):
        StageStore(tmp_path / "s", "t", {"model": "b", "steps": 4})


def test_duplicates_across_parts_are_read_once_and_tampering_is_detected(tmp_path):
    jobs = _jobs(6)
    store = StageStore(tmp_path / "t", "t")
    store.run(jobs, _square(), shard_index=0, num_shards=2)
    part = sorted((tmp_path / "t" / "parts").glob("*.jsonl"))[0]
    copy = part.with_name("part-99999of99999-000000.jsonl")  # as if two processes did the same range
    copy.write_bytes(part.read_bytes())
    assert len(store.records()) == 3
    copy.unlink()
    part.write_text(part.read_text().replace('"sq":0', '"sq":1'))
    with pytest.raises(ValueError, match="does not match its manifest"):
        store.verify()
