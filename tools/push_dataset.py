#!/usr/bin/env python
"""Upload a Hugging Face dataset folder (an export's ``hf/``) to the Hub, private unless --public.

Examples::

    # check what would go up (nothing is uploaded without --push)
    python tools/push_dataset.py data/curate_demo/export/hf --repo-id me/my-twins
    # upload (needs a Hugging Face token: `huggingface-cli login` or HF_TOKEN)
    python tools/push_dataset.py /data/run/export/hf --repo-id me/my-twins --push

DIR is made by ``python -m cultureclip.curate stage=export 'export.formats=[wds,hf]'``. Only the
dataset's own files go up: README.md (the card), data/*.parquet and the card's card/ assets; anything
else in DIR stays local. A new repository is private unless --public. Exit status 1 on a folder that
is not a dataset folder (named). Needs the ``hf`` extra.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cultureclip import schema

DATASET_ENTRIES = (schema.HF_CARD, schema.HF_DATA_DIR, "card")  # the card, the Parquet files, the card's assets


def dataset_files(folder: Path) -> list[str]:
    """The files of the dataset folder that belong to the dataset (relative paths)."""
    from cultureclip.interop.hub import folder_files
    if not (folder / schema.HF_CARD).is_file() or not list((folder / schema.HF_DATA_DIR).glob("*.parquet")):
        raise FileNotFoundError(f"{folder} is not a dataset folder: it needs {schema.HF_CARD} and "
                                f"{schema.HF_DATA_DIR}/*.parquet (export with 'export.formats=[wds,hf]')")
    present = [e for e in DATASET_ENTRIES if (folder / e).exists()]
    return [f for f in folder_files(folder, present) if not f.startswith(f"{schema.HF_DATA_DIR}/")
            or f.endswith(".parquet")]


def main(argv=None) -> int:
    """Parse arguments, list the dataset's files, optionally upload them; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the dataset folder (export/hf)")
    parser.add_argument("--repo-id", required=True, help="Hub dataset repository, e.g. me/my-twins")
    parser.add_argument("--push", action="store_true", help="upload (without it, only list what would go up)")
    parser.add_argument("--public", action="store_true", help="create the repository as public (default: private)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        files = dataset_files(folder)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(files)} files of {folder}: {', '.join(files[:6])}{', ...' if len(files) > 6 else ''}")
    if not args.push:
        print("not uploaded (add --push)")
        return 0
    from cultureclip.interop.hub import push_folder
    url = push_folder(folder, args.repo_id, files, private=not args.public, repo_type="dataset",
                      commit_message="Upload twin-pair dataset")
    print(f"uploaded to {'a public' if args.public else 'a private (unless it existed)'} dataset repository: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
