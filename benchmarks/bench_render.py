"""Render stage speed on the tiny random-weight SD3 stand-in (CPU): seconds per image of the pipeline
alone, and the stage's orchestration overhead per record (jobs, PNG encoding, sha256, atomic writes,
part files) over the pipeline time.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_render.py --images 48 --size 64 --batch-size 4
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cultureclip import schema
from cultureclip.curate.runner import seed_from_key
from cultureclip.curate.runner.jobs import keyed
from cultureclip.curate.stages import render
from cultureclip.curate.backends import t2i
from cultureclip.curate.registry import Context


def pairs(n_images: int) -> list[dict]:
    """Twin pairs with 2 captions per side: 4 unique images each."""
    out = []
    for i in range(max(1, n_images // 4)):
        out.append({schema.CATEGORY: "Cuisine",
                    schema.POS_CONCEPT: f"dish {i}", schema.POS_COUNTRY: "A",
                    schema.POS_CAPTIONS: [f"dish {i} on a plate", f"dish {i} at a street stall"],
                    schema.NEG_CONCEPT: f"twin dish {i}", schema.NEG_COUNTRY: "B",
                    schema.NEG_CAPTIONS: [f"twin dish {i} in a bowl", f"twin dish {i} at dinner"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {"model": "tiny-sd3", "dtype": "float32", "device": "cpu", "width": args.size, "height": args.size,
           "steps": args.steps, "batch_size": args.batch_size}
    t = time.perf_counter()
    pipe = t2i.build_tiny_pipeline()
    build_s = time.perf_counter() - t
    data = pairs(args.images)
    s = render.settings(cfg)
    jobs, _ = keyed(render.NAME, render.render_jobs(data, s))  # keyed by the runner, as the stage does
    t2i.render_batch(pipe, [jobs[0][schema.PROMPT]], [1], s, args.batch_size)  # warm-up
    # the pipeline alone (same batches) and the whole stage, alternated; the best of --repeats each
    pipe_s, stage_s, backend = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for i in range(0, len(jobs), args.batch_size):
            b = jobs[i:i + args.batch_size]
            t2i.render_batch(pipe, [j[schema.PROMPT] for j in b], [seed_from_key(j[schema.REC_KEY]) for j in b], s,
                                args.batch_size)
        pipe_s.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            rep = render.run_pairs(data, cfg, Context(out_dir=Path(tmp)), pipeline=pipe)
            stage_s.append(time.perf_counter() - t)
            backend.append(rep.extra["backend_seconds"])
    n, p, st = len(jobs), min(pipe_s), min(stage_s)
    print(json.dumps({
        "images": n, "size": args.size, "steps": args.steps, "batch_size": args.batch_size,
        "threads": args.threads, "build_s": round(build_s, 2),
        "pipeline_s_per_image": round(p / n, 4),
        "stage_s_per_image": round(st / n, 4),
        "overhead_ms_per_record": round(1000 * (st - p) / n, 2),
        "overhead_vs_pipeline": round((st - p) / p, 4),
        "stage_time_outside_pipeline_calls": round((st - backend[stage_s.index(st)]) / st, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
