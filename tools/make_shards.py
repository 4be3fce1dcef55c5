#!/usr/bin/env python
"""Convert twin-pair records (authors' JSON/JSONL or generic JSONL) into twin WebDataset shards.

Example::

    python tools/make_shards.py data/train.jsonl --out shards/train --image-root data/images \\
        --maxcount 1000 --resize 256 --on-error skip
    # a Hugging Face dataset folder (an export's hf/, or a Hub snapshot): one shard folder per split
    python tools/make_shards.py data/curate_demo/export/hf --out shards/   # -> shards/train, shards/val
    python tools/make_shards.py --check shards/train        # check shards already written (or copied)

Exit status: 0 on success, 1 on a bad record (with --on-error raise), an unusable input, existing
shards without --overwrite, or when no pair at all was written. See cultureclip.data.convert.
With --check: 0 when every shard reads to its end and every pair is complete, 1 otherwise (a
truncated or damaged shard, a pair without its members or texts; see cultureclip.data.validate).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from cultureclip import errors
from cultureclip.data.convert import REPORT_FILE, convert_to_shards
from cultureclip.data.hf_dataset import hf_to_shards, is_hf_dataset
from cultureclip.data.shards import RecordError
from cultureclip.data.tarcheck import ShardDamage
from cultureclip.data.validate import check_shards
from cultureclip.images import DEFAULT_MAX_PIXELS


def main(argv=None) -> int:
    """Parse arguments, convert, print a summary; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="JSONL or JSON-list files, or one Hugging Face dataset folder "
                                                  "(cultureclip.data.hf_dataset)")
    parser.add_argument("--out", help="output folder for the shards")
    parser.add_argument("--check", metavar="SHARDS", default=None,
                        help="only check existing shards (a folder, brace pattern, glob or pipe:/URL), write nothing")
    parser.add_argument("--image-root", default=None,
                        help="folder for relative image paths (default: each input file's folder)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="accept image paths that leave --image-root ('..', absolute paths elsewhere); by "
                             "default such a row is a bad record (symlinks inside the root are always followed)")
    parser.add_argument("--maxcount", type=int, default=1000, help="pairs per shard")
    parser.add_argument("--resize", type=int, default=None, help="shrink the shorter image side to N px")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="stop at the first bad record (default) or skip and count it; with --check: "
                             "stop at the first damaged shard or count every problem")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (read from the header, before decoding); "
                             "0: no cap beyond Pillow's own limit (default %(default)s)")
    args = parser.parse_args(argv)
    if args.check is not None and (args.inputs or args.out):
        parser.error("--check reads existing shards: give no inputs and no --out")
    if args.check is None and (not args.inputs or not args.out):
        parser.error("give the input files and --out (or --check SHARDS)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.check is not None:
        return check(args.check, args.on_error)
    if len(args.inputs) == 1 and is_hf_dataset(args.inputs[0]):
        try:
            counts = hf_to_shards(args.inputs[0], args.out, maxcount=args.maxcount, overwrite=args.overwrite)
        except (RecordError, FileExistsError, OSError, ValueError) as exc:
            return errors.report(exc)
        print("wrote " + ", ".join(f"{n} {split} pairs to {os.path.join(args.out, split)}" for split, n in counts.items()))
        return 0 if sum(counts.values()) else 1
    try:
        report = convert_to_shards(args.inputs, args.out, image_root=args.image_root,
                                   maxcount=args.maxcount, resize=args.resize,
                                   on_error=args.on_error, overwrite=args.overwrite,
                                   max_pixels=args.max_pixels or None,
                                   allow_outside_root=args.allow_outside_root)
    except (RecordError, FileExistsError, OSError, ValueError) as exc:
        # the message names file:line and field; a traceback would add nothing for the user
        return errors.report(exc)
    reasons = ", ".join(f"{k} {v}" for k, v in report.skipped_by_reason.items())
    print(f"wrote {report.written} pairs in {len(report.sizes)} shards to {args.out}; "
          f"skipped {report.skipped}{f' ({reasons})' if reasons else ''} (details in {REPORT_FILE})")
    if report.written == 0:
        print("error: no pair was written", file=sys.stderr)
        return 1
    return 0


def check(spec: str, on_error: str) -> int:
    """``--check``: read every shard of ``spec`` to its end; print a summary; returns the exit status."""
    try:
        report = check_shards(spec, on_error=on_error)
    except (ShardDamage, FileNotFoundError) as exc:  # one line naming the shard or the pattern
        return errors.report(exc)
    reasons = ", ".join(f"{k} {v}" for k, v in report.skipped_by_reason.items())
    print(f"checked {report.shards} shard(s): {report.pairs} usable pairs; "
          f"{'no problem found' if report.ok else 'skipped ' + reasons}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
