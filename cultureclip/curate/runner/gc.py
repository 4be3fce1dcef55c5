"""``stage=gc``: remove what no current view reaches (old records kept as a cache, their images).

Records of earlier plans stay on disk so that switching an input back costs nothing. ``gc`` removes
them once that cache is no longer wanted: for every store under ``out_dir`` it keeps the done records
and rejections whose keys are in the store's view and the errors of view keys that are not finished;
parts with nothing to keep are deleted, parts with some are rewritten, and the manifests are rewritten
to match. Files named by their key under a store's ``images/`` folder go with their records.
``dry_run=True`` only lists what would be removed. Every job range of a store is locked meanwhile.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

from cultureclip.curate.runner.store import ERRORS, MANIFESTS, STAGE_FILE, Store, line_key, write_atomic
from cultureclip.rundir import RunDirLock

IMAGES = "images"


def stores(out_dir: Union[str, os.PathLike]) -> list[Store]:
    """Every store under ``out_dir`` (folders holding a ``stage.json``, two levels deep at most)."""
    found = sorted({p.parent for p in Path(out_dir).glob(f"*/{STAGE_FILE}")}
                   | {p.parent for p in Path(out_dir).glob(f"*/*/{STAGE_FILE}")})
    out = []
    for root in found:
        if root.name.startswith("."):
            continue
        out.append(Store(root, json.loads((root / STAGE_FILE).read_text()).get("stage", root.name)))
    return out


def _collect(store: Store) -> dict:
    """What to keep and remove in one store."""
    view = set(store.view())
    index = store.index()
    plan: dict[str, Any] = {"store": str(store.root), "keep": defaultdict(list), "remove_records": 0,
                            "remove_parts": [], "rewrite_parts": [], "remove_files": []}
    for entry in store.manifest_entries():
        keys = entry["keys"]
        if entry["kind"] == ERRORS:
            keep = [k for k in keys if k in view and not index.finished(k) and index.errors.get(k) is not None
                    and index.parts[index.errors[k]] == f"{ERRORS}/{entry['part']}"]
        else:
            keep = [k for k in keys if k in view]
        plan["remove_records"] += len(keys) - len(keep)
        if not keep:
            plan["remove_parts"].append(entry)
        elif len(keep) < len(keys):
            plan["rewrite_parts"].append((entry, set(keep)))
    done_in_view = {k for k in view if k in index.done}
    images = store.root / IMAGES
    if images.is_dir():
        plan["remove_files"] = sorted(str(p) for p in images.glob("*/*") if p.stem not in done_in_view)
    return plan


def gc(out_dir: Union[str, os.PathLike], dry_run: bool = True, echo=print) -> list[dict]:
    """Remove (or with ``dry_run`` only list) what no current view reaches; returns one summary per store."""
    summaries = []
    for store in stores(out_dir):
        if not store.has_view():
            continue
        locks = [RunDirLock(p) for p in sorted((store.root / ".jobs").glob("*")) if p.is_dir()]
        with contextlib.ExitStack() as stack:
            for lock in locks:  # refuses while any job range of the store is being run
                lock.acquire()
                stack.callback(lock.release)
            plan = _collect(store)
            summary = {"store": str(store.root), "records": plan["remove_records"],
                       "parts_removed": len(plan["remove_parts"]), "parts_rewritten": len(plan["rewrite_parts"]),
                       "files": len(plan["remove_files"]), "dry_run": dry_run}
            summaries.append(summary)
            verb = "would remove" if dry_run else "removed"
            echo(f"gc {store.root}: {verb} {summary['records']} records ({summary['parts_removed']} parts, "
                 f"{summary['parts_rewritten']} rewritten) and {summary['files']} files")
            if dry_run:
                for entry in plan["remove_parts"]:
                    echo(f"  {store.root / entry['kind'] / entry['part']}")
                for path in plan["remove_files"]:
                    echo(f"  {path}")
                continue
            _apply(store, plan)
    return summaries


def _apply(store: Store, plan: dict) -> None:
    by_job: dict[str, list[dict]] = defaultdict(list)
    removed = {(e["kind"], e["part"]) for e in plan["remove_parts"]}
    rewrite = {(e["kind"], e["part"]): keep for e, keep in plan["rewrite_parts"]}
    import hashlib
    for entry in store.manifest_entries():
        ident = (entry["kind"], entry["part"])
        job = entry["part"][len("part-"):].rsplit("-", 1)[0]
        if ident in removed:
            continue
        if ident in rewrite:
            path = store.root / entry["kind"] / entry["part"]
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if line_key(ln) in rewrite[ident]]
            data = "".join(lines).encode("utf-8")
            write_atomic(path, data)
            entry = {**entry, "records": len(lines), "sha256": hashlib.sha256(data).hexdigest(),
                     "keys": [line_key(ln) for ln in lines]}
        by_job[job].append(entry)
    folder = store.root / MANIFESTS
    for path in folder.glob("*.jsonl"):  # rewritten whole: the one place a manifest is not appended to
        if path.stem not in by_job:
            path.unlink()
    for job, entries in by_job.items():
        write_atomic(folder / f"{job}.jsonl", "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
    for entry in plan["remove_parts"]:
        (store.root / entry["kind"] / entry["part"]).unlink(missing_ok=True)
    for path in plan["remove_files"]:
        Path(path).unlink(missing_ok=True)
