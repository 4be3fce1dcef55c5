#!/usr/bin/env python
"""Combine result JSONs of ``python -m cultureclip.evaluate`` into one CSV (and optionally Markdown).

Examples::

    python tools/aggregate_results.py outputs/eval/ViT-B-32-quickgelu_openai outputs/eval/run_model --out results.csv
    python tools/aggregate_results.py outputs/eval --recursive --out results.csv --md results.md --skip-bad

One row per (model, pretrained, task) with every metric column (blank where a task lacks it). A file
that is not a result stops the run naming the file, unless --skip-bad (then it is counted and listed);
the same (model, pretrained, task) in two files always stops the run, naming both. Exit status 1 on
such an error. See cultureclip.eval.aggregate.
"""
from __future__ import annotations

import argparse
import sys

from cultureclip import errors
from cultureclip.eval.aggregate import ResultFileError, load_results, to_markdown, write_csv


def main(argv=None) -> int:
    """Parse arguments, aggregate, write; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR", help="folders of result JSONs (or files)")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--md", default=None, help="also write a Markdown table of the overall metrics")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count files that are not results")
    parser.add_argument("--recursive", action="store_true", help="also read subfolders")
    args = parser.parse_args(argv)
    try:
        results, skipped = load_results(args.results_dirs, skip_bad=args.skip_bad, recursive=args.recursive)
    except (ResultFileError, FileNotFoundError) as e:
        return errors.report(e)
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not results:
        print("error: no result files found", file=sys.stderr)
        return 1
    write_csv(results, args.out)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(to_markdown(results))
    print(f"{len(results)} results -> {args.out}" + (f", {args.md}" if args.md else "")
          + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
