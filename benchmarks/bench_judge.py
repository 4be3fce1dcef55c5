#!/usr/bin/env python
"""Benchmark the judge stage against the stand-in OpenAI-compatible server (localhost, no GPU).

Examples::

    python benchmarks/bench_judge.py                       # latency 0.2 s, concurrency 8 and 32
    python benchmarks/bench_judge.py --concurrency 8,32,64 --seconds 10 --out bench_judge.json

Two measurements, both through the real stage (``judge.run`` -> ``runner.run_stage`` -> ``ChatClient``
-> HTTP -> server), on synthetic PNGs (``--image-size``, default 512) written as a render store in a temporary folder:

1. **Throughput.** The server (in its own process, so its CPU does not compete with the client's GIL)
   sleeps ``--latency`` seconds before every answer. With ``c`` requests in flight the ideal rate is
   ``c / latency`` requests/s; we report the measured rate (server requests / stage seconds, the
   stage's own processing loop) and its ratio to the ideal (target >= 0.8).
2. **Orchestration overhead.** The server (in this process) answers at once. The stage judges
   ``--overhead-images`` images one request at a time (concurrency 1, so no time overlaps); the very
   same request bodies are then replayed on a bare keep-alive ``http.client`` connection (``http``:
   the server's own work plus the transfer, which a real backend replaces with its own time) and
   through :class:`ChatClient` alone (``client``: + the openai SDK and validation). ``overhead =
   stage - http`` is everything our side adds per record (job iteration, reading and base64-encoding
   the image, the SDK, validation, outcomes, part files), shown split into its SDK-client and stage
   parts and as a fraction of the backend time per record at each concurrency of the throughput runs
   (``2 requests x latency / c``: what a record costs when the backend is the bottleneck; target
   < 5%). The one-off startup (imports, client, job list) is shown apart.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from cultureclip import schema
from cultureclip.curate.stages import judge
from cultureclip.curate.backends.chat import ChatClient, ChatConfig
from cultureclip.curate.stages.importer import import_pairs, pairs_store, twin_id
from cultureclip.curate.runner import Job, Outcome, Store, run_stage, write_atomic
from cultureclip.curate.registry import Context
from cultureclip.curate.backends.standin import StandinServer


def make_world(out_dir: Path, n_images: int, size: int, captions: int = 5) -> list[dict]:
    """Twin pairs with ``captions`` captions per side and one rendered PNG per caption (n_images in all)."""
    rng = np.random.default_rng(0)
    n_twins = max(1, n_images // (2 * captions))
    pairs, jobs = [], []
    for t in range(n_twins):
        ident = {schema.CATEGORY: "Cuisine", schema.POS_CONCEPT: f"dish {t}a", schema.POS_COUNTRY: "A",
                 schema.NEG_CONCEPT: f"dish {t}b", schema.NEG_COUNTRY: "B"}
        pair = {schema.TWIN_ID: twin_id(*ident.values()), **ident,
                schema.POS_CONTEXT: "a dish", schema.NEG_CONTEXT: "a dish", schema.POS_FEATURES: ["round"],
                schema.NEG_FEATURES: ["flat"],
                schema.POS_CAPTIONS: [f"dish {t}a on a table, view {i}" for i in range(captions)],
                schema.NEG_CAPTIONS: [f"dish {t}b on a table, view {i}" for i in range(captions)]}
        pairs.append(pair)
        for concept, country, caps in ((pair[schema.POS_CONCEPT], "A", pair[schema.POS_CAPTIONS]),
                                       (pair[schema.NEG_CONCEPT], "B", pair[schema.NEG_CAPTIONS])):
            for caption in caps:
                ident = {schema.CONCEPT: concept, schema.COUNTRY: country, schema.CATEGORY: "Cuisine",
                         schema.CAPTION: caption}
                jobs.append(Job(inputs=ident, model="bench", settings={"seed": 0}))
    src = out_dir / "pairs.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    import_pairs([src], out_dir)  # the judge reads the current caption sets of the run folder
    root = out_dir / "render"

    def process(todo):
        for job in todo:  # smooth images (upsampled 16x16 noise): PNG sizes like real renders'
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            path = f"images/{job[schema.REC_KEY][:2]}/{job[schema.REC_KEY]}.png"
            buf = io.BytesIO()
            im.save(buf, "PNG")
            data = buf.getvalue()
            write_atomic(root / path, data)
            yield Outcome(job[schema.REC_KEY], record={**{k: v for k, v in job.items() if k != schema.REC_KEY},
                                                      schema.IMAGE_FILE: path,
                                                      schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest()})

    run_stage(Store(root, "render"), jobs, process, upstream=(pairs_store(out_dir),))
    return pairs


@contextlib.contextmanager
def external_server(latency: float):
    """The stand-in server in its own process (its CPU must not compete with the client's GIL)."""
    proc = subprocess.Popen([sys.executable, "-m", "cultureclip.curate.backends.standin", "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the stand-in server did not start (printed {url!r})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_stage(out_dir: Path, pairs: list[dict], url: str, concurrency: int):
    ctx = Context(out_dir=out_dir, chat={"base_url": url, "model": "bench-vlm", "concurrency": concurrency,
                                         "timeout_s": 60, "max_attempts": 1})
    t0 = time.perf_counter()
    report = judge.run({"part_size": 256}, ctx)
    wall = time.perf_counter() - t0
    if report.errors:
        raise RuntimeError(f"benchmark run had errors: {report.errors_by_reason}")
    return report, wall


def replay(url: str, bodies: list[dict]) -> float:
    """Seconds to POST ``bodies`` one after another on one keep-alive connection (the bare HTTP time)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    payloads = [json.dumps(b).encode() for b in bodies]  # serialised beforehand: not part of the HTTP time
    t0 = time.perf_counter()
    for data in payloads:
        conn.request("POST", u.path + "/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Authorization": "Bearer EMPTY"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"replay got HTTP {resp.status}")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def replay_client(url: str, bodies: list[dict]) -> float:
    """Seconds to send the same requests one after another through :class:`ChatClient` (SDK + validation)."""
    with ChatClient(ChatConfig(base_url=url, model="bench-vlm", max_attempts=1)) as client:
        todo = []
        for body in bodies:
            fmt = body["response_format"]["json_schema"]
            model = (judge.scores_model() if fmt["name"] == judge.SCORES_SCHEMA else
                     judge.twin_model(tuple(fmt["schema"]["properties"][schema.TWIN_CHOICE]["enum"])))
            todo.append((body["messages"], model, fmt["name"]))
        t0 = time.perf_counter()
        for messages, model, name in todo:
            if not client.ask(messages, model, name).ok:
                raise RuntimeError("replay through the client failed")
        return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.2, help="seconds the server adds to every answer")
    p.add_argument("--concurrency", default="8,32", help="requests in flight, comma-separated")
    p.add_argument("--seconds", type=float, default=6.0, help="ideal duration of each throughput run")
    p.add_argument("--overhead-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = {"latency_s": args.latency, "image_size": args.image_size, "throughput": [], "overhead": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for c in concurrencies:
            ideal = c / args.latency
            n_images = max(c, int(ideal * args.seconds / 2))  # two requests per image
            world = Path(tmp) / f"c{c}"
            pairs = make_world(world, n_images, args.image_size)
            with external_server(args.latency) as url:
                report, wall = run_stage(world, pairs, url, c)
                with urllib.request.urlopen(url + "/standin/stats", timeout=30) as resp:
                    stats = json.load(resp)
            rate = stats["requests"] / report.seconds
            results["throughput"].append({"concurrency": c, "requests": stats["requests"], "stage_s": report.seconds,
                                          "wall_s": round(wall, 3), "requests_per_s": round(rate, 1),
                                          "ideal_per_s": round(ideal, 1), "ratio": round(rate / ideal, 3),
                                          "max_in_flight": stats["max_in_flight"]})
        world = Path(tmp) / "overhead"
        pairs = make_world(world, args.overhead_images, args.image_size)
        with StandinServer(judge.standin_responders()) as server:
            cpu = time.process_time()
            report, wall = run_stage(world, pairs, server.url, 1)
            cpu_stage = time.process_time() - cpu
            bodies = list(server.bodies)
            cpu = time.process_time()
            http_s = replay(server.url, bodies)
            cpu_http = time.process_time() - cpu
            cpu = time.process_time()
            client_s = replay_client(server.url, bodies)
            cpu_client = time.process_time() - cpu
        n, stage_s = report.processed, report.seconds
        ov = {"records": n, "requests": len(bodies), "startup_s": round(wall - stage_s, 3)}
        for kind, (h, c_, st) in {"wall": (http_s, client_s, stage_s),
                                  "cpu": (cpu_http, cpu_client, cpu_stage)}.items():
            ov[kind] = {"http_ms_per_record": round(1e3 * h / n, 2),
                        "client_ms_per_record": round(1e3 * (c_ - h) / n, 2),
                        "stage_ms_per_record": round(1e3 * (st - c_) / n, 2),
                        "overhead_ms_per_record": round(1e3 * (st - h) / n, 2),
                        **{f"fraction_of_backend_c{c}": round((st - h) / n / (2 * args.latency / c), 4)
                           for c in concurrencies}}
        results["overhead"] = ov
    print(f"### Judge stage on the stand-in server (latency {args.latency} s, {args.image_size}px PNGs)\n")
    print("| concurrency | requests | stage s | requests/s | ideal c/latency | ratio | max in flight |")
    print("|---|---|---|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['concurrency']} | {r['requests']} | {r['stage_s']} | {r['requests_per_s']} | "
              f"{r['ideal_per_s']} | {r['ratio']} | {r['max_in_flight']} |")
    print(f"\nOrchestration overhead (instant server in this process, concurrency 1, {ov['records']} records, "
          f"{ov['requests']} requests; one-off startup {ov['startup_s']} s not counted):\n")
    print("| time | bare HTTP ms/record | + SDK client ms/record | + stage ms/record | overhead ms/record | " +
          " | ".join(f"% of backend time/record at c={c} ({2e3 * args.latency / c:.1f} ms)" for c in concurrencies)
          + " |")
    print("|---|---|---|---|---|" + "---|" * len(concurrencies))
    for kind in ("wall", "cpu"):
        o = ov[kind]
        print(f"| {kind} | {o['http_ms_per_record']} | {o['client_ms_per_record']} | {o['stage_ms_per_record']} | "
              f"{o['overhead_ms_per_record']} | " +
              " | ".join(f"{100 * o[f'fraction_of_backend_c{c}']:.1f}%" for c in concurrencies) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
