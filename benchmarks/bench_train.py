"""Training throughput benchmark: our Lightning step vs open_clip's ``train_one_epoch`` on the same
images, model and batch, plus the data pipeline alone per worker count (``train_harness.py`` beside this script).

    python benchmarks/bench_train.py --model cultureclip-tiny --batch-size 32 --steps 20 --workers 2 --repeats 3
    python benchmarks/bench_train.py --model ViT-B-32-quickgelu --batch-size 8 --steps 5 --warmup 2 --device auto

Prints markdown tables and writes the figures as JSON (``--out``). On a shared machine trust the
ours/open_clip ratio more than the absolute rates.
"""
import argparse
import json
from pathlib import Path

from train_harness import BenchConfig, prepare_shards, resolve_device, run_benchmark


def format_table(res: dict) -> str:
    """Markdown tables and verdicts of a :func:`run_benchmark` result."""
    o = res["ours"]
    lines = [f"`{res['model']}`, {res['device_name']}, {res['precision']}, {res['steps']} timed steps after "
             f"{res['warmup']} warm-up, {res['workers']} loader workers, {o['torch_threads']} torch thread(s) "
             f"per side, median run of {res['repeats']}", "",
             "| side | batch | pairs/s | images/s | texts/s | ms/step | data wait | peak MiB |", "|---" * 8 + "|"]
    sides = ((f"ours: Lightning, `{res['variant']}` loss", o), ("open_clip: `train_one_epoch`", res["open_clip"]))
    for name, r in sides:
        pairs = "" if r["pairs_per_s"] is None else f"{r['pairs_per_s']:.3g}"
        lines.append(f"| {name} | {r['batch']} | {pairs} | {r['images_per_s']:.3g} | {r['texts_per_s']:.3g} | "
                     f"{r['ms_per_step']:.0f} | {100 * r['wait_frac']:.0f}% | {r['peak_mem_mib']:.0f} |")
    each = ", ".join(f"{x:.2f}" for x in res["ratios_images_per_s"])
    lines += ["", f"images/s ours / open_clip: **{res['ratio_images_per_s']:.2f}** (target >= 1; per repeat: {each}). "
              f"Ours encodes {o['texts_per_pair']} texts per pair, open_clip 2 (one caption per image); peak memory is "
              f"{o['mem_kind'].replace('_', ' ')}.", "",
              flop_line(res), "",
              "| loader workers | pairs/s (pipeline alone) | per worker |", "|---|---|---|"]
    lines += [f"| {r['workers']} | {r['pairs_per_s']:.3g} | {r['pairs_per_s_per_worker']:.3g} |"
              for r in res["pipeline"]]
    if res["pipeline_is_bottleneck"] is not None:
        lines.append(f"\nThe data pipeline {'IS' if res['pipeline_is_bottleneck'] else 'is not'} the bottleneck at "
                     f"{res['workers']} workers ({o['pairs_per_s']:.3g} pairs/s trained).")
    return "\n".join(lines)


def flop_line(res: dict) -> str:
    """The FLOP-ratio limit and how much of it the measured speed-up reaches."""
    f = res["flops"]
    lengths = "" if f["trimmed_caption_len"] is None else (
        f"; trimmed batch lengths: captions {f['trimmed_caption_len']:.1f}, concepts {f['trimmed_concept_len']:.1f} "
        f"tokens (open_clip: {f['open_clip_context']})")
    each = ", ".join(f"{x:.2f}" for x in res["fractions_of_limit"])
    return (f"FLOP-ratio limit (open_clip FLOPs per image / ours, torch flop counter, forward + backward): "
            f"{f['open_clip_per_image'] / 1e9:.3g} / {f['ours_per_image'] / 1e9:.3g} GFLOP = **{f['limit']:.2f}**; "
            f"achieved **{res['fraction_of_limit']:.2f}** of it (per repeat: {each}){lengths}; "
            f"{100 * f['distinct_concept_frac']:.0f}% of concept rows distinct.")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cultureclip-tiny", help="open_clip architecture, random weights")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (open_clip gets 2x images)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--workers", type=int, default=2, help="loader workers of both training sides")
    p.add_argument("--pipeline-workers", type=int, nargs="+", default=[0, 1, 2],
                   help="worker counts for the data-pipeline-only run")
    p.add_argument("--pipeline-batches", type=int, default=50, help="timed batches per pipeline-only setting")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--variant", default="cultureclip", help="CultureCLIPLoss variant of our side")
    p.add_argument("--repeats", type=int, default=1, help="ours/open_clip alternations; medians reported")
    p.add_argument("--shards", default=None, help="twin shard folder with sizes.json (default: the toy set)")
    p.add_argument("--cache-dir", default="data/bench", help="toy set and plain open_clip shards")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per side (default torch's); 1 steadies a CPU shared with other jobs")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    twin_dir, plain_dir = prepare_shards(args.shards, args.cache_dir)
    cfg = BenchConfig(twin_dir=twin_dir, plain_dir=plain_dir, model=args.model, batch_size=args.batch_size,
                      steps=args.steps, warmup=args.warmup, workers=args.workers, precision=args.precision,
                      device=resolve_device(args.device), variant=args.variant, lr=args.lr, seed=args.seed,
                      pipeline_workers=tuple(args.pipeline_workers), pipeline_batches=args.pipeline_batches,
                      threads=args.threads)
    result = run_benchmark(cfg, repeats=args.repeats)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
