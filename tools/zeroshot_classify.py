#!/usr/bin/env python
"""Zero-shot classify a folder or CSV of images into the classes of a text file.

Examples::

    # labelled (class folders or CSV path,label): prints metrics, writes predictions + confusion matrix
    python tools/zeroshot_classify.py --model ViT-B-32-quickgelu --pretrained openai \\
        --images val/ --classes classes.txt --out out/predictions.csv
    # unlabelled (flat folder or CSV with only path): writes per-image top-k with probabilities
    python tools/zeroshot_classify.py --model runs/cultwin/final --images photos/ --classes classes.txt

With labels, the confusion matrix goes next to --out as <stem>_confusion.csv. Exit status 1 on an
unusable input (the message names the file and line). See cultureclip.eval.zeroshot.
"""
from __future__ import annotations

import argparse
import sys

import torch

from cultureclip import errors
from cultureclip.eval.zeroshot import (DEFAULT_TEMPLATES, classify, load_classnames, load_templates,
                                       write_confusion, write_predictions)
from cultureclip.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from cultureclip.model import CultureCLIP


def main(argv=None) -> int:
    """Parse arguments, classify, print a summary; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="open_clip architecture, hf-hub: id or save_pretrained dir")
    parser.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file (with an architecture)")
    parser.add_argument("--images", required=True, help="class-folder tree, flat image folder or CSV path[,label]")
    parser.add_argument("--classes", required=True, help="class names, one per line")
    parser.add_argument("--templates", default=None, help=f"templates with {{c}}, one per line "
                                                          f"(default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--out", default="predictions.csv", help="per-image predictions CSV")
    parser.add_argument("--topk", type=int, default=5, help="predictions kept per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for decoding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="skip and list images that do not decode or are too large (default), "
                             "or stop at the first")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels, read from the header before decoding "
                             "(0: only Pillow's own limit; default %(default)s)")
    args = parser.parse_args(argv)
    try:
        classnames = load_classnames(args.classes)
        templates = load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
        model = CultureCLIP.from_pretrained(args.model, pretrained=args.pretrained, device=args.device)
        result = classify(model, args.images, classnames, templates, k=args.topk, batch_size=args.batch_size,
                          num_workers=args.workers, amp=not args.no_amp, on_error=args.on_error,
                          max_pixels=args.max_pixels or None)
    except (ValueError, OSError, ImageDecodeError) as exc:
        return errors.report(exc)
    out = write_predictions(result, args.out)
    m = result.metrics
    print(f"classified {m['n']} images into {len(classnames)} classes; predictions in {out}")
    for path, err in result.skipped:
        print(f"skipped: {path}: {err}", file=sys.stderr)
    if result.skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in result.skipped_by_reason.items())
        print(f"skipped {len(result.skipped)} images ({reasons})", file=sys.stderr)
    if result.labels is not None:
        cm_path = write_confusion(result, out.with_name(f"{out.stem}_confusion.csv"))
        print(f"top-1 {m['acc1']:.4f}  top-5 {m['acc5']:.4f}  mean per-class recall "
              f"{m['mean_per_class_recall']:.4f}; confusion matrix in {cm_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
