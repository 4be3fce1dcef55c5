"""Curation bookkeeping at scale: a million render records, their judgments and the export's reading.

What is measured is the runner's and the stages' own work (planning and keying jobs, the view, the
range lock, skipping finished keys, part files and manifest lines, reading views back), with the
backends replaced by null ones so that nothing else is timed:

1. render: ``render.render_jobs`` over N/(2*captions) twin pairs (N images), run by ``run_stage`` with a
   null backend that returns each job's record at once (no pixels; records only);
2. judge: ``judge.judge_jobs`` over the current render view, run by ``run_stage`` with a null chat backend
   answering every job at once (the HTTP path is measured by ``bench_judge.py``);
3. export's reading: the pairs, render and judge views read once each, ``build_pairs`` and the split
   (shard writing, I/O per exported pair, is left out: ``bench_judge``/the tests cover it);
4. a rerun with nothing to do, through the stages' own entry points (``render.run``, ``judge.run``): each
   finds its view planned under the same fingerprint and finished, and reads nothing else;
5. 1% more twin pairs, then the rerun: it must run exactly the new 1% of jobs.

    python benchmarks/bench_curate_store.py --images 1000000 [--out /tmp/bench-store]

Prints one line per step (seconds, microseconds per record, records run) and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cultureclip import schema
from cultureclip.curate.stages import export, judge, render
from cultureclip.curate.backends.chat import ChatConfig
from cultureclip.curate.stages.importer import import_pairs, load_pairs, pairs_store, twin_id
from cultureclip.curate.registry import Context
from cultureclip.curate.runner import Outcome, Store, run_stage

CAPTIONS = 5  # per side: a twin pair makes 10 images
PART_SIZE = 1024  # records per part: each part costs 3 fsyncs (~5 ms each here), amortised over its records


def make_pairs(n_twins: int, start: int = 0) -> list[dict]:
    pairs = []
    for t in range(start, start + n_twins):
        pos, neg = f"dish {t}a", f"dish {t}b"
        pairs.append({schema.TWIN_ID: twin_id("Cuisine", pos, "Aland", neg, "Bland"), schema.CATEGORY: "Cuisine",
                      schema.POS_CONCEPT: pos, schema.POS_COUNTRY: "Aland", schema.NEG_CONCEPT: neg,
                      schema.NEG_COUNTRY: "Bland", schema.POS_CONTEXT: "a dish", schema.NEG_CONTEXT: "a dish",
                      schema.POS_FEATURES: ["round"], schema.NEG_FEATURES: ["flat"],
                      schema.POS_CAPTIONS: [f"{pos} on a table, view {i}" for i in range(CAPTIONS)],
                      schema.NEG_CAPTIONS: [f"{neg} on a table, view {i}" for i in range(CAPTIONS)]})
    return pairs


def null_render(todo):
    """Records as the render stage writes them, without pixels (the sha256 stands for the image's)."""
    for j in todo:
        key = j[schema.REC_KEY]
        yield Outcome(key, record={schema.CONCEPT: j[schema.CONCEPT], schema.COUNTRY: j[schema.COUNTRY],
                                   schema.CATEGORY: j[schema.CATEGORY], schema.CAPTION: j[schema.CAPTION],
                                   schema.PROMPT: j[schema.PROMPT], schema.SEED_INDEX: j[schema.SEED_INDEX],
                                   schema.IMAGE_FILE: f"images/{key[:2]}/{key}.png", schema.IMAGE_SHA256: key * 2,
                                   schema.MODEL_ID: "null"})


def null_judge(todo):
    """A judge record per job, answered at once (scores from the key: some pass, some do not)."""
    for j in todo:
        k = int(j[schema.REC_KEY][:2], 16)
        yield Outcome(j[schema.REC_KEY], record={
            **{f: j[f] for f in (schema.RENDER_KEY, schema.TWIN_ID, schema.SIDE, schema.CATEGORY, schema.CONCEPT,
                                 schema.COUNTRY, schema.TWIN_CONCEPT, schema.TWIN_COUNTRY, schema.IMAGE_SHA256)},
            schema.SCORE_AUTHENTICITY: 2 + k % 4, schema.SCORE_CONSISTENCY: 4, schema.SCORE_FIDELITY: 4,
            schema.TWIN_CHOICE: j[schema.CONCEPT], schema.PICKS_OWN: True, schema.REASON: "null",
            schema.MODEL_ID: "null"})


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(name: str, fn, records: int) -> object:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    ran = getattr(out, "processed", "")
    print(f"{name:28s} {dt:8.2f} s  {1e6 * dt / max(records, 1):8.1f} us/record  ran {ran!s:>8}  "
          f"peak RSS {rss_mb():7.0f} MB", flush=True)
    return out


def run_all(out: Path, n_twins: int, render_cfg: dict, chat: ChatConfig) -> tuple:
    """The render stage's planning and the runner, with the null backend (render.run_pairs without pixels)."""
    pairs = load_pairs(out, "render")
    upstream = (pairs_store(out),)
    r = run_stage(Store(out / "render", "render"), lambda: render.render_jobs(pairs, render_cfg), null_render,
                  part_size=render_cfg["part_size"], upstream=upstream,
                  fingerprint=render.plan_fingerprint(render_cfg, 0, upstream))
    del pairs
    return r


def judge_all(out: Path, chat: ChatConfig):
    pairs = load_pairs(out, "judge")
    rstore = Store(out / "render", "render")
    rstore.require_complete("judge", upstream=(pairs_store(out),))
    slots = judge.caption_slots(pairs, rstore.records())  # as judge.run: the render store read once
    jobs = lambda: judge.jobs_from_slots(slots, chat, rstore.root)  # noqa: E731 (streamed, as judge.run)
    upstream = (rstore, pairs_store(out))
    fp = judge.plan_fingerprint(chat, upstream)
    return run_stage(Store(out / "judge", "judge"), jobs, null_judge, part_size=PART_SIZE, upstream=upstream,
                     fingerprint=fp)


def export_reading(out: Path) -> int:
    """What export does before writing shards: each view once, the pairs, the split."""
    pairs = load_pairs(out, "export")
    rstore, jstore = Store(out / "render", "render"), Store(out / "judge", "judge")
    rstore.require_complete("export", upstream=(pairs_store(out),))
    jstore.require_complete("export", upstream=(rstore, pairs_store(out)))
    renders = {r[schema.REC_KEY]: {f: r.get(f) for f in export.RENDER_FIELDS} for r in rstore.records()}
    judged = sorted(({f: j.get(f) for f in export.JUDGE_FIELDS} for j in jstore.records()),
                    key=lambda j: j[schema.REC_KEY])
    rows = export.build_pairs(pairs, renders, judged, export.check_rule(None), 10, 0)
    export.split_twins(sorted({r[schema.TWIN_ID] for r in rows}), 0.1, 0)
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-store-"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_twins = args.images // (2 * CAPTIONS)
    n = 2 * CAPTIONS * n_twins
    render_cfg = render.settings({"model": "null", "device": "cpu", "part_size": PART_SIZE})
    chat = ChatConfig(base_url="http://127.0.0.1:1/v1", model="null-judge")
    src = out.parent / f"{out.name}-pairs.jsonl"
    try:
        with open(src, "w") as f:
            for p in make_pairs(n_twins):
                f.write(json.dumps(p) + "\n")
        print(f"{n} images of {n_twins} twin pairs in {out}")
        step("import pairs", lambda: import_pairs([src], out), n_twins)
        step("render (null backend)", lambda: run_all(out, n_twins, render_cfg, chat), n)
        step("judge (null chat)", lambda: judge_all(out, chat), n)
        step("export reading", lambda: export_reading(out), n)
        ctx = Context(out_dir=out, chat={"base_url": chat.base_url, "model": chat.model})
        step("render.run, nothing to do", lambda: render.run({"model": "null", "device": "cpu"}, ctx), n)
        step("judge.run, nothing to do", lambda: judge.run({}, ctx), n)
        more = max(1, n_twins // 100)
        with open(src, "a") as f:
            for p in make_pairs(more, start=n_twins):
                f.write(json.dumps(p) + "\n")
        step("import 1% more pairs", lambda: import_pairs([src], out), n_twins + more)
        r = step("render rerun, 1% new", lambda: run_all(out, n_twins, render_cfg, chat), n)
        j = step("judge rerun, 1% new", lambda: judge_all(out, chat), n)
        assert r.processed == j.processed == 2 * CAPTIONS * more, (r.processed, j.processed)
        step("render.run, nothing to do", lambda: render.run({"model": "null", "device": "cpu"}, ctx), n)
        step("export reading", lambda: export_reading(out), n)
        print(f"peak RSS {rss_mb():.0f} MB; parts: render {len(list((out / 'render' / 'parts').iterdir()))}")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
        src.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
