#!/usr/bin/env python
"""Make a push_to_hub-ready folder (model files + model card from metrics.json) for a training run.

Examples::

    # write the folder only (inspect README.md before publishing)
    python tools/push_to_hub.py outputs/toy-cultureclip-s0 --out hub/cultureclip-b32 --repo-id me/cultureclip-b32
    # write it and upload it (needs a Hugging Face token: `huggingface-cli login` or HF_TOKEN)
    python tools/push_to_hub.py outputs/cultwin-cultureclip-s0 --out hub/cc --repo-id me/cc --push

RUN_DIR is a finished `python -m cultureclip.train` run directory (model/ and metrics.json). Nothing is
uploaded without --push; a new repository is private unless --public. Only the files written here
(weights, config, README.md) are uploaded, whatever else sits in --out. Exit status 1 on a missing
file (named). Needs the ``hf`` extra for --push.
"""
from __future__ import annotations

import argparse
import sys

from cultureclip import errors


def main(argv=None) -> int:
    """Parse arguments, write the folder, optionally upload it; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run directory holding model/ and metrics.json")
    parser.add_argument("--out", required=True, help="folder to write (model files + README.md)")
    parser.add_argument("--repo-id", default=None,
                        help="Hub repository, e.g. me/cultureclip-b32 (required with --push)")
    parser.add_argument("--model-dir", default=None, help="model folder if not RUN_DIR/model")
    parser.add_argument("--license", default="mit", help="license in the card's front matter (default: mit)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the starting weights (default: from the run's model name/pretrained tag)")
    parser.add_argument("--tag", action="append", default=[], help="extra card tag (repeatable)")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo-id")
    parser.add_argument("--public", action="store_true",
                        help="create the repository as public (default: private; with --push)")
    args = parser.parse_args(argv)
    if args.push and not args.repo_id:
        parser.error("--push needs --repo-id")
    from cultureclip.interop.hub import HUB_FILES, folder_files, push_folder, write_hub_folder
    try:
        out = write_hub_folder(args.run_dir, args.out, repo_id=args.repo_id, license=args.license,
                               base_model=args.base_model, tags=args.tag, model_dir=args.model_dir)
    except (OSError, ValueError) as exc:
        return errors.report(exc)
    print(f"wrote {out} (model files + README.md)")
    if args.push:
        files = folder_files(out, HUB_FILES)
        others = sorted(p.name for p in out.iterdir() if p.name not in HUB_FILES)
        if others:
            print(f"not uploading {len(others)} other entries of {out}: {', '.join(others[:5])}")
        url = push_folder(out, args.repo_id, files, private=not args.public)
        print(f"uploaded {', '.join(files)} to {'a public' if args.public else 'a private (unless it existed)'} "
              f"repository: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
