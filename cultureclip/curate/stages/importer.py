"""Import twin caption sets (the input of render, judge and export) into the ``pairs`` store.

Three row formats are accepted, detected per row, in JSONL files or JSON lists:

* **ours** (``pos_captions`` present): the *pairs* record of :func:`pair_record` (``twin_id``,
  ``category``, ``pos_concept``, ``pos_country``, ``pos_context``, ``pos_features``, ``pos_captions``
  and the same ``neg_`` fields);
* **reference captions** (``pos_all_captions`` present): the reference pipeline's caption file,
  ``category, pos_concept, pos_context, pos_features, neg_concept, neg_context, neg_features,
  pos_caption, pos_all_captions, neg_caption, neg_all_captions``;
* **reference render input** (``pos_caption_id`` present): one row per caption combination,
  ``sample_id, pos_caption_id, neg_caption_id, pos_concept, pos_context, pos_caption, neg_concept,
  neg_context, neg_caption, metadata{category, pos_features, neg_features}``. The rows of one twin
  pair are grouped back into one record, each side's captions unique by caption id, in id order.

In every format ``category`` may sit at the top level or under ``metadata``, features may be a list
of strings or one string (kept whole as a one-element list: the reference files hold free text and
any split would be a guess), and countries may be absent (the reference files have none).

Rows of the same twin pair (same ``twin_id``) are merged: captions are joined in first-seen order;
contexts, features and countries must agree. A row that cannot be used raises a
:class:`~cultureclip.data.shards.RecordError` naming ``file:line`` and the field, or with
``on_error="skip"`` is skipped and counted by reason in ``pairs/import_report.json``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

from cultureclip import schema
from cultureclip.curate.runner import Job, Outcome, Store, run_stage, write_atomic
from cultureclip.curate.stages.pair_rows import (FORMAT_CAPTIONS, FORMAT_OURS, FORMAT_RENDER_INPUT,  # noqa: F401
                                                 ImportReport, detect_format, pair_record, parse_row, read_pairs,
                                                 twin_id)

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
STAGE = "pairs"
CAPTIONS_STAGE = "captions"  # the captions stage writes the same records
REPORT_FILE = "import_report.json"
SOURCE_FILE = "pairs_source.json"  # in out_dir: which store holds the current twin caption sets


def import_pairs(paths: Sequence[PathLike], out_dir: PathLike, on_error: str = "raise") -> ImportReport:
    """Read twin caption sets and make them the current ``pairs`` view of ``out_dir`` (one job per pair).

    An import always wins: its pairs become the view that render, judge and export read (over a
    ``captions`` store of an earlier upstream run too, see :func:`load_pairs`); records of an earlier
    import stay on disk as a cache, so importing a file again costs nothing.
    ``pairs/import_report.json`` holds the report.

    Raises:
        RecordError, FileNotFoundError: see :func:`read_pairs`. ValueError: no usable twin pair.
    """
    records, report = read_pairs(paths, on_error)
    if not records:
        raise ValueError(f"no usable twin pair in {[str(p) for p in paths]} ({report.skipped} rows skipped)")
    store = Store(Path(out_dir) / STAGE, STAGE)
    stage_report = run_stage(store, [Job(inputs=rec) for rec in records], _as_records)
    write_atomic(store.root / REPORT_FILE, json.dumps(asdict(report), indent=1, ensure_ascii=False))
    set_pairs_source(out_dir, STAGE)
    log.info("imported %d twin pairs from %d rows (%d skipped, %d new) into %s", report.pairs, report.rows,
             report.skipped, stage_report.ok, store.root)
    return report


def _as_records(todo):
    for job in todo:
        yield Outcome(job[schema.REC_KEY], record={k: v for k, v in job.items() if k != schema.REC_KEY})


def set_pairs_source(out_dir: PathLike, stage: str) -> None:
    """Record which store holds the current twin caption sets: ``pairs`` (an import) or ``captions``."""
    write_atomic(Path(out_dir) / SOURCE_FILE, json.dumps({"pairs": stage}))


def pairs_store(out_dir: PathLike) -> Store:
    """The store of the current twin caption sets: the one the latest import or captions run named.

    Raises:
        FileNotFoundError: neither an import nor a captions run happened in ``out_dir``.
    """
    path = Path(out_dir) / SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no twin caption sets in {out_dir}: import them (input=...) or run "
                                f"stage={CAPTIONS_STAGE}")
    name = json.loads(path.read_text())["pairs"]
    return Store(Path(out_dir) / name, name)


def load_pairs(out_dir: PathLike, consumer: str = "render") -> list[dict]:
    """The current twin caption sets of a run, sorted by twin id; refused while that view is incomplete.

    Raises:
        FileNotFoundError: no caption sets. ValueError: the view has jobs neither done nor rejected, or is empty.
    """
    store = pairs_store(out_dir)
    store.require_complete(consumer)
    records = sorted(store.records(), key=lambda r: r[schema.TWIN_ID])
    if not records:
        raise ValueError(f"{store.root} holds no current twin pairs")
    return records


def card_section(out_dir: PathLike) -> Optional[dict]:
    """The dataset card's section on the imported files (None when nothing was imported)."""
    path = Path(out_dir) / STAGE / REPORT_FILE
    if not path.is_file() or pairs_store(out_dir).stage != STAGE:
        return None
    rep = json.loads(path.read_text())
    lines = [f"{rep['pairs']} twin pairs from {rep['rows']} rows of {len(rep['inputs'])} file(s); "
             f"{rep['skipped']} rows skipped."]
    lines += [f"- {fmt}: {n} rows" for fmt, n in rep["rows_by_format"].items()]
    lines += [f"- skipped ({reason}): {n}" for reason, n in rep["skipped_by_reason"].items()]
    return {"title": "Imported caption pairs", "markdown": "\n".join(lines),
            "data": {k: rep[k] for k in ("rows", "pairs", "rows_by_format", "merged_rows", "skipped",
                                         "skipped_by_reason")}}
