"""The curation runner: keys, views, three outcomes, completeness, crash safety, manifests, gc, the split rule."""
import hashlib
import json
import random

import pytest

from cultureclip import schema
from cultureclip.curate import prompts
from cultureclip.curate.runner import Job, Outcome, Store, in_val, job_range, run_stage, seed_from_key
from cultureclip.curate.runner.gc import gc
from cultureclip.curate.runner.keys import job_key


def _jobs(n, **settings):
    return [Job(inputs={"i": i}, settings=dict(settings)) for i in range(n)]


def _square(fail=(), reject=(), seen=None):
    def process(jobs):
        for job in jobs:
            if seen is not None:
                seen.append(job["i"])
            if job["i"] in fail:
                yield Outcome(job[schema.REC_KEY], error="odd_input", message=f"cannot do {job['i']}")
            elif job["i"] in reject:
                yield Outcome(job[schema.REC_KEY], rejected="negative", message=f"rule on {job['i']}")
            else:
                yield Outcome(job[schema.REC_KEY], record={"i": job["i"], "sq": job["i"] ** 2})
    return process


def test_job_key_hashes_exactly_what_it_names(tmp_path):
    a = job_key("render", {"caption": "x", "w": 512}, model="m", prompts={"p": "text"}, settings={"seed": 3})
    # a Job's key hashes its prompt files' text through their sha256
    job = Job(inputs={"x": 1}, prompts=("judge_twin",))
    text_hash = hashlib.sha256(prompts.load("judge_twin").encode()).hexdigest()
    assert job.key("judge") == job_key("judge", {"x": 1}, prompts={"judge_twin": text_hash})
    assert a == job_key("render", {"w": 512, "caption": "x"}, model="m", prompts={"p": "text"}, settings={"seed": 3})
    payload = json.dumps({"stage": "render", "inputs": {"caption": "x", "w": 512}, "model": "m",
                          "prompts": {"p": "text"}, "settings": {"seed": 3}, "reads": []},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert a == hashlib.sha256(payload.encode()).hexdigest()[:len(a)]
    others = [job_key("render", {"caption": "x", "w": 512}, "m2", {"p": "text"}, {"seed": 3}),
              job_key("render", {"caption": "x", "w": 512}, "m", {"p": "text!"}, {"seed": 3}),
              job_key("render", {"caption": "x", "w": 512}, "m", {"p": "text"}, {"seed": 4}),
              job_key("render", {"caption": "x", "w": 512}, "m", {"p": "text"}, {"seed": 3}, reads=["h"]),
              job_key("judge", {"caption": "x", "w": 512}, "m", {"p": "text"}, {"seed": 3})]
    assert len({a, *others}) == 6
    assert 0 <= seed_from_key(a) < 2 ** 63 and seed_from_key(a) != seed_from_key(others[0])
    # a prompt file's text is in the key: editing the file (here through prompts_dir) changes it
    job = Job(inputs={"x": 1}, prompts=("judge_twin",))
    before = job.key("judge")
    (tmp_path / "judge_twin.txt").write_text(prompts.load("judge_twin") + " Be brief.")
    prompts.use_dir(tmp_path)
    try:
        assert job.key("judge") != before
    finally:
        prompts.use_dir(None)
    assert job.key("judge") == before


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_job_ranges_are_disjoint_cover_everything_and_ignore_input_order(num_shards):
    jobs = [{schema.REC_KEY: f"{i:024x}"} for i in range(20)]
    shuffled = random.Random(1).sample(jobs, len(jobs))
    parts = [job_range(jobs, i, num_shards) for i in range(num_shards)]
    keys = [j[schema.REC_KEY] for p in parts for j in p]
    assert sorted(keys) == sorted(j[schema.REC_KEY] for j in jobs) and len(set(keys)) == len(keys)
    assert parts == [job_range(shuffled, i, num_shards) for i in range(num_shards)]
    with pytest.raises(ValueError, match="shard_index"):
        job_range(jobs, num_shards, num_shards)


def test_three_outcomes_rejections_never_rerun_errors_retried(tmp_path):
    store = Store(tmp_path / "t", "t")
    report = run_stage(store, _jobs(10), _square(fail={3}, reject={5, 6}), part_size=4)
    assert (report.ok, report.rejected, report.errors) == (7, 2, 1)
    assert report.rejected_by_reason == {"negative": 2} and report.errors_by_reason == {"odd_input": 1}
    s = store.status()
    assert (s["done"], s["rejected"], s["errors"], s["missing"], s["not_run"]) == (7, 2, 1, 1, 0)
    with pytest.raises(ValueError, match=r"1 of 10 current t jobs are neither done nor rejected"):
        store.require_complete("next")
    store.verify()
    seen = []
    again = run_stage(store, _jobs(10), _square(seen=seen))
    assert seen == [3] and again.done_before == 9 and again.ok == 1  # the rejections are not asked again
    store.require_complete("next")
    assert sorted(r["sq"] for r in store.records()) == sorted(i * i for i in range(10) if i not in (5, 6))
    assert sorted(r[schema.REASON] for r in store.rejections()) == ["negative", "negative"]
    assert list(store.errors()) == []  # the later success supersedes the error
    seen.clear()
    assert run_stage(store, _jobs(10), _square(seen=seen)).processed == 0 and seen == []


def test_views_hide_old_records_switching_back_reuses_them(tmp_path):
    store = Store(tmp_path / "t", "t")
    run_stage(store, _jobs(4, seed=0), _square())
    seen = []
    run_stage(store, _jobs(4, seed=7), _square(seen=seen))  # a setting that matters: new keys, old ones hidden
    assert len(seen) == 4 and len(list(store.records())) == 4 and store.status()["jobs"] == 4
    assert store.index().done.keys() >= set(store.view()) and len(store.index().done) == 8
    seen.clear()
    run_stage(store, _jobs(4, seed=0), _square(seen=seen))  # switching back reruns nothing
    assert seen == [] and len(list(store.records())) == 4
    run_stage(store, _jobs(2, seed=0), _square(seen=seen))  # a removed input leaves the view
    assert seen == [] and sorted(r["i"] for r in store.records()) == [0, 1]


def test_a_crash_keeps_finished_work_and_an_unlisted_part_is_listed_once(tmp_path):
    jobs = _jobs(12)

    def crashing(it):
        for n, job in enumerate(it):
            if n == 7:
                raise KeyboardInterrupt
            yield Outcome(job[schema.REC_KEY], record={"i": job["i"], "sq": job["i"] ** 2})

    crashed = Store(tmp_path / "a", "t")
    with pytest.raises(KeyboardInterrupt):
        run_stage(crashed, jobs, crashing, part_size=100)
    assert len(list(crashed.records())) == 7
    # a kill between the part's rename and its manifest line: the part is complete but unlisted
    manifest = next((tmp_path / "a" / "manifests").glob("*.jsonl"))
    manifest.write_bytes(manifest.read_bytes()[:-10])  # ... and the append itself was torn
    assert len(list(crashed.records())) == 0
    report = run_stage(crashed, jobs, _square())
    assert (report.done_before, report.ok) == (7, 5)
    clean = Store(tmp_path / "b", "t")
    run_stage(clean, jobs, _square())
    key = lambda r: r[schema.REC_KEY]  # noqa: E731
    assert sorted(crashed.records(), key=key) == sorted(clean.records(), key=key)
    crashed.verify()


def test_bad_process_functions_are_refused(tmp_path):
    jobs = _jobs(3)

    def twice(it):
        job = next(it)
        yield Outcome(job[schema.REC_KEY], record={})
        yield Outcome(job[schema.REC_KEY], record={})

    with pytest.raises(RuntimeError, match="not pending"):
        run_stage(Store(tmp_path / "x", "t"), jobs, twice)
    with pytest.raises(RuntimeError, match="no outcome for 2 jobs"):
        run_stage(Store(tmp_path / "y", "t"), jobs, lambda it: iter([Outcome(next(it)[schema.REC_KEY], record={})]))
    report = run_stage(Store(tmp_path / "z", "t"), jobs + jobs[:1], _square())  # the same work twice is one job
    assert report.jobs_total == 3 and report.extra["duplicate_jobs"] == 1
    with pytest.raises(ValueError, match="exactly one"):
        Outcome("k")
    with pytest.raises(ValueError, match="exactly one"):
        Outcome("k", record={}, rejected="x")


def test_flushes_append_one_manifest_line_and_never_list_the_folder(tmp_path, monkeypatch):
    from pathlib import Path
    store = Store(tmp_path / "t", "t")
    globs = []
    real = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pat: (globs.append(pat), real(self, pat))[1])
    run_stage(store, _jobs(50), _square(), part_size=5)
    lines = next((tmp_path / "t" / "manifests").glob("*.jsonl")).read_text().splitlines()
    assert len(lines) == 10 and len(globs) <= 1 + 3 + 1  # manifests once, the 3 kinds once, this one
    globs.clear()
    assert run_stage(store, _jobs(50), _square()).processed == 0


def test_gc_dry_run_lists_then_removes_only_what_no_view_reaches(tmp_path):
    store = Store(tmp_path / "t", "t")
    run_stage(store, _jobs(6, seed=0), _square(), part_size=4)
    run_stage(store, [Job(inputs={"i": i}, settings={"seed": 0 if i < 3 else 1}) for i in range(6)], _square(),
              part_size=4)
    images = tmp_path / "t" / "images" / "ab"
    images.mkdir(parents=True)
    (images / "not-a-view-key.png").write_bytes(b"x")
    before = sorted(store.records(), key=lambda r: r[schema.REC_KEY])
    lines = []
    summary = gc(tmp_path, dry_run=True, echo=lines.append)
    assert summary[0]["records"] == 3 and summary[0]["files"] == 1 and (images / "not-a-view-key.png").exists()
    assert len(store.index().done) == 9
    gc(tmp_path, dry_run=False, echo=lines.append)
    assert len(store.index().done) == 6 and not (images / "not-a-view-key.png").exists()
    assert sorted(store.records(), key=lambda r: r[schema.REC_KEY]) == before
    store.verify()
    assert gc(tmp_path, dry_run=True, echo=lines.append)[0]["records"] == 0


def test_split_rule_is_stable_under_added_and_removed_twins():
    ids = [f"twin-{i}" for i in range(200)]
    side = {t: in_val(t, 0, 0.1) for t in ids}
    assert 5 <= sum(side.values()) <= 40  # about a tenth
    more = ids[50:] + [f"new-{i}" for i in range(300)]
    assert all(in_val(t, 0, 0.1) == side[t] for t in more if t in side)
    assert {t for t in ids if in_val(t, 0, 0.2)} >= {t for t in ids if side[t]}  # a larger fraction only adds
    assert [in_val(t, 1, 0.1) for t in ids] != list(side.values())  # the seed matters


def test_up_to_date_skips_planning_only_when_nothing_can_have_changed(tmp_path):
    from cultureclip.curate.runner import fingerprint, up_to_date
    up = Store(tmp_path / "up", "up")
    run_stage(up, _jobs(3), _square())
    store = Store(tmp_path / "t", "t")
    fp = fingerprint({"seed": 0}, ("judge_twin",), (up,))
    assert up_to_date(store, fp) is None  # never planned
    run_stage(store, _jobs(4), _square(fail={2}), upstream=(up,), fingerprint=fp)
    assert up_to_date(store, fp) is None  # a job failed: the normal path retries it
    run_stage(store, _jobs(4), _square(), upstream=(up,), fingerprint=fp)
    done = up_to_date(store, fp, shard_index=1, num_shards=2)
    assert (done.jobs_total, done.jobs_in_range, done.done_before, done.processed) == (4, 2, 2, 0)
    assert fingerprint({"seed": 1}, ("judge_twin",), (up,)) != fp  # a setting that matters
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "judge_twin.txt").write_text("another prompt")
    prompts.use_dir(prompts_dir)
    try:
        assert fingerprint({"seed": 0}, ("judge_twin",), (up,)) != fp  # a prompt file
    finally:
        prompts.use_dir(None)
    run_stage(up, _jobs(2), _square())  # the upstream view changed
    assert fingerprint({"seed": 0}, ("judge_twin",), (up,)) != fp


def test_the_range_lock_is_taken_before_finished_keys_are_read(tmp_path, monkeypatch):
    """Read before the lock, a process that finished the range just before would be redone (and billed)."""
    store = Store(tmp_path / "t", "t")
    lock_file = tmp_path / "t" / ".jobs" / "00000of00001" / ".lock"
    seen = []
    real = Store.index

    def index(self):
        seen.append(lock_file.is_file())
        return real(self)
    monkeypatch.setattr(Store, "index", index)
    run_stage(store, _jobs(3), _square())
    assert seen == [True]


@pytest.mark.parametrize("num_shards", [1, 3])
def test_streamed_jobs_plan_like_a_list_and_make_dicts_only_for_the_unfinished(tmp_path, num_shards):
    made = []

    def jobs():  # a fresh generator per call, as a stage hands it over
        for j in _jobs(10) + _jobs(2):  # two duplicates
            made.append(j.inputs["i"])
            yield j

    listed, streamed = Store(tmp_path / "l", "t"), Store(tmp_path / "s", "t")
    for shard in range(num_shards):
        a = run_stage(listed, list(_jobs(10) + _jobs(2)), _square(fail={4}), shard_index=shard, num_shards=num_shards)
        b = run_stage(streamed, jobs, _square(fail={4}), shard_index=shard, num_shards=num_shards)
        assert (a.jobs_total, a.jobs_in_range, a.ok, a.errors) == (b.jobs_total, b.jobs_in_range, b.ok, b.errors)
        assert a.extra == b.extra == {"duplicate_jobs": 2}
    key = lambda r: r[schema.REC_KEY]  # noqa: E731
    assert sorted(listed.records(), key=key) == sorted(streamed.records(), key=key)
    assert listed.view() == streamed.view()
    seen = []
    made.clear()
    rerun = run_stage(streamed, jobs, _square(seen=seen))
    assert seen == [4] and rerun.processed == 1 and len(made) == 2 * 12  # two passes over the generator
