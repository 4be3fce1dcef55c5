#!/usr/bin/env python
"""Benchmark evaluation throughput: embedding vs CLIP_benchmark's loop, FAISS search vs torch top-k.

Examples::

    python benchmarks/bench_eval.py --model cultureclip-tiny --images 2000 --texts 2000 --sizes 10000,100000
    python benchmarks/bench_eval.py --model ViT-B-32-quickgelu --images 256 --skip-search --out bench.json
    python benchmarks/bench_eval.py --skip-embed --sizes 1000000 --ivf-max-size 100000
    python benchmarks/bench_eval.py --skip-embed --sizes 1000000 --clusters 1000 --out search.json

Synthetic JPEGs are written to a temporary folder and deleted afterwards. CLIP_benchmark's own loop is
imported when ``clip_benchmark`` (and the scikit-learn it imports) is installed, and re-implemented
otherwise; the output says which. See eval_harness.py beside this script.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # CLIP_benchmark's progress bars; read when tqdm is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

import eval_harness as bench  # noqa: E402  (beside this script)
from cultureclip.model import CultureCLIP  # noqa: E402


def main(argv=None) -> int:
    """Parse arguments, run the selected benchmarks, print markdown and write JSON; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cultureclip-tiny", help="open_clip architecture, hf-hub: id or saved dir")
    p.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint (default: random weights)")
    p.add_argument("--images", type=int, default=1000, help="synthetic JPEGs to embed")
    p.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEGs before preprocessing")
    p.add_argument("--texts", type=int, default=2000, help="texts to embed (classes x templates, rounded down)")
    p.add_argument("--templates", type=int, default=8, help=f"templates per class (1..{len(bench.TEMPLATES)}); "
                                                            "CLIP_benchmark encodes one class per call")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both paths)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA (both paths)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes, comma-separated")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF lists probed (default: tuned at build time to --target-recall against flat)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 * sqrt(N), capped by N / 39 "
                                                           "and 2048)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@k against flat the IVF is tuned to")
    p.add_argument("--clusters", type=int, default=0, help="draw features from this many Gaussian clusters "
                                                           "(0: uniform on the sphere)")
    p.add_argument("--spread", type=float, default=1.0, help="cluster noise norm (1.0: cosine ~0.7 to the centre)")
    p.add_argument("--ivf-max-size", type=int, default=None, help="skip IVF for larger galleries (k-means cost)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per method; medians reported")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    result = {"command": " ".join(["python", "benchmarks/bench_eval.py"] + (sys.argv[1:] if argv is None else argv)),
              "environment": bench.environment(args.device)}
    if not args.skip_embed:
        model = CultureCLIP.from_pretrained(args.model, pretrained=args.pretrained, device=args.device)
        classnames, templates = bench.synthetic_classes(args.texts, args.templates)
        with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
            bench.write_synthetic_images(tmp, args.images, size=args.image_size)
            result["embed"] = bench.bench_embedding(model, tmp, classnames, templates, args.batch_size,
                                                    args.workers, args.repeats, amp=not args.no_amp)
        result["embed"].update(model=args.model, pretrained=args.pretrained)
        del model
    if not args.skip_search:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        result["search"] = bench.bench_search(sizes, args.dim, args.queries, args.k, args.nprobe, args.nlist,
                                              args.repeats, args.device, args.ivf_max_size,
                                              clusters=args.clusters, spread=args.spread,
                                              target_recall=args.target_recall)
    print(bench.format_markdown(result.get("embed"), result.get("search")))
    env = result["environment"]
    print(f"\n{env['device']}, torch {env['torch']} ({env['torch_threads']} threads), faiss {env['faiss']} "
          f"({env['faiss_threads']} threads), open_clip {env['open_clip']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
