#!/usr/bin/env python
"""Convert a transformers CLIP model (and optionally a PEFT LoRA adapter for it) into a CultureCLIP folder.

Examples::

    # the reference setting: a LoRA adapter on openai/clip-vit-base-patch32, merged exactly
    python tools/import_hf.py openai/clip-vit-base-patch32 path/to/adapter --out models/cultureclip-b32
    # a plain transformers CLIP (fine-tuned or not), no adapter
    python tools/import_hf.py path/to/clip-dir --out models/clip

The output is ``save_pretrained``'s open_clip layout: ``CultureCLIP.from_pretrained(OUT)`` and plain
open_clip (``create_model_and_transforms("local-dir:OUT")``) load it. Exit status 1 on a model or
adapter that does not convert (the message names the field, module or base model that differs).
Needs the ``hf`` extra: pip install 'cultureclip[hf]'.
"""
from __future__ import annotations

import argparse
import sys

from cultureclip import errors


def main(argv=None) -> int:
    """Parse arguments, convert, merge, save; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="transformers CLIPModel: model id or local directory")
    parser.add_argument("adapter", nargs="?", default=None, help="PEFT LoRA adapter directory (optional)")
    parser.add_argument("--out", required=True, help="output directory (open_clip layout)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="merge even if the adapter records another base model name (shapes are still checked)")
    parser.add_argument("--cache-dir", default=None, help="transformers cache directory for model ids")
    args = parser.parse_args(argv)
    from cultureclip.interop.hf_convert import ConversionError
    from cultureclip.interop.peft_merge import AdapterMismatchError
    from cultureclip.model import CultureCLIP
    try:
        model = CultureCLIP.from_pretrained("hf-transformers:" + args.base, adapter=args.adapter,
                                            allow_other_base=args.allow_other_base, cache_dir=args.cache_dir)
        out = model.save_pretrained(args.out)
    except (ConversionError, AdapterMismatchError, OSError, ValueError) as exc:
        return errors.report(exc)
    merged = f" with adapter {args.adapter} merged" if args.adapter else ""
    print(f"wrote {out} from {args.base}{merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
