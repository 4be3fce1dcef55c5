#!/usr/bin/env python
"""Benchmark the checked tar reader against webdataset's own: samples per second reading one shard.

Example::

    python benchmarks/bench_shard_read.py --pairs 2000 --member-kb 16 --repeats 5

Writes one shard of ``--pairs`` twin samples (two random image-sized members and a json each) to a
temporary folder, then reads it alternately with ``webdataset.tarfile_samples`` (no end-of-archive
check) and with ``cultureclip.data.stages.TarSamples`` (the check this package adds), ``--repeats``
times each, and prints the median times and their ratio. The shard is in the page cache, so this
measures the reader, not the disk.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import webdataset as wds

from cultureclip.data.stages import SkipCounter, TarSamples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--member-kb", type=int, default=16, help="size of each image member")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "shard-000000.tar")
        blob = os.urandom(args.member_kb * 1024)
        with wds.TarWriter(shard) as w:
            for i in range(args.pairs):
                w.write({"__key__": f"pair{i:06d}", "pos.jpg": blob, "neg.jpg": blob, "json": b'{"k": 1}'})
        readers = {"webdataset.tarfile_samples": lambda: wds.tarfile_samples([{"url": shard}]),
                   "TarSamples (checked)": lambda: TarSamples(SkipCounter())([{"url": shard}])}
        times = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, read in readers.items():  # alternating, so drift affects both alike
                start = time.perf_counter()
                n = sum(1 for _ in read())
                times[name].append(time.perf_counter() - start)
                assert n == args.pairs, (name, n)
        size = os.path.getsize(shard) / 2**20
    print(f"one shard: {args.pairs} pairs, {size:.0f} MiB, median of {args.repeats}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in medians.items():
        print(f"  {name:28s} {t * 1000:8.1f} ms  {args.pairs / t:10.0f} pairs/s")
    base, checked = medians.values()
    print(f"  ratio checked / webdataset: {checked / base:.3f}")


if __name__ == "__main__":
    main()
