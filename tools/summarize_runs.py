"""Mean and spread of held-out metrics over training runs: reads each run's metrics.json.

    python tools/summarize_runs.py outputs/multirun --group loss.variant

prints one markdown row per group (e.g. per loss variant) with before/after mean ± std over seeds.
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def dig(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="folder searched recursively for metrics.json")
    ap.add_argument("--group", default="loss.variant", help="config key that groups runs (dotted)")
    ap.add_argument("--metrics", default="val/twin_acc,val/img2concept_recall@1")
    args = ap.parse_args(argv)
    files = sorted(args.root.rglob("metrics.json"))
    if not files:
        print(f"no metrics.json under {args.root}", file=sys.stderr)
        return 1
    groups = defaultdict(list)
    for f in files:
        rec = json.loads(f.read_text())
        groups[str(dig(rec["config"], args.group))].append(rec)
    names = args.metrics.split(",")
    head = ["group", "runs", "steps"] + [f"{m} {s}" for m in names for s in ("before", "after")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for g, recs in sorted(groups.items()):
        cells = [g, str(len(recs)), ",".join(sorted({str(r["global_step"]) for r in recs}))]
        for m in names:
            for stage in ("before", "after"):
                vals = [r[stage][m] for r in recs if m in r.get(stage, {})]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
