"""Reading twin caption-set rows (ours, the reference captions, the reference render input) into records.

The row formats and their rules are described in :mod:`cultureclip.curate.stages.importer`, which writes
the records this module reads into the ``pairs`` store.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from cultureclip import schema
from cultureclip.curate.runner import digest
from cultureclip.data.convert import _checked_row, _iter_rows
from cultureclip.data.pair_fields import SIDE_FIELDS, SIDES, category_field, side_extras, text_field
from cultureclip.data.shards import RecordError
from cultureclip.images import check_on_error

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_OURS, FORMAT_CAPTIONS, FORMAT_RENDER_INPUT = "pairs", "reference_captions", "reference_render_input"
# per side: (one caption, all captions, caption id) of the reference files
REF_SIDE_FIELDS = {
    schema.POS_PREFIX: (schema.POS_CAPTION, schema.REF_POS_ALL_CAPTIONS, schema.REF_POS_CAPTION_ID),
    schema.NEG_PREFIX: (schema.NEG_CAPTION, schema.REF_NEG_ALL_CAPTIONS, schema.REF_NEG_CAPTION_ID),
}


def twin_id(category: str, pos_concept: str, pos_country: Optional[str], neg_concept: str,
            neg_country: Optional[str]) -> str:
    """The key of a twin pair: a hash of its category, both concepts and both countries."""
    return digest({"twin": {schema.CATEGORY: category, schema.POS_CONCEPT: pos_concept,
                            schema.POS_COUNTRY: pos_country, schema.NEG_CONCEPT: neg_concept,
                            schema.NEG_COUNTRY: neg_country}})


def _captions(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RecordError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
    out = []
    for i, c in enumerate(value):
        if not c.strip():
            raise RecordError(f"{where}: field {name!r} item {i} is blank")
        if c.strip() not in out:
            out.append(c.strip())
    return out


def pair_record(category: str, sides: Mapping[str, Mapping[str, Any]]) -> dict:
    """Our *pairs* record from a category and per-side ``(concept, country, context, features, captions)``."""
    rec: dict[str, Any] = {schema.CATEGORY: category}
    for side in SIDES:
        for name, value in zip(SIDE_FIELDS[side], (sides[side][k] for k in range(5))):
            rec[name] = value
    rec[schema.TWIN_ID] = twin_id(category, rec[schema.POS_CONCEPT], rec[schema.POS_COUNTRY],
                                  rec[schema.NEG_CONCEPT], rec[schema.NEG_COUNTRY])
    return dict(sorted(rec.items()))


def detect_format(row: Mapping, where: str) -> str:
    """Which of the three formats a row is in (see the module docstring)."""
    if schema.POS_CAPTIONS in row:
        return FORMAT_OURS
    if schema.REF_POS_CAPTION_ID in row:
        return FORMAT_RENDER_INPUT
    if schema.REF_POS_ALL_CAPTIONS in row:
        return FORMAT_CAPTIONS
    raise RecordError(f"{where}: unknown row format: no field {schema.POS_CAPTIONS!r} (ours), "
                      f"{schema.REF_POS_ALL_CAPTIONS!r} (reference captions) or {schema.REF_POS_CAPTION_ID!r} "
                      f"(reference render input)")


def parse_row(row: Mapping, where: str) -> tuple[str, dict, dict]:
    """Map one row to ``(format, record, caption ids)``; caption ids ``{side: id}`` for render input."""
    fmt = detect_format(row, where)
    category = category_field(row, where)
    extras = side_extras(row, where)
    sides, ids = {}, {}
    for side in SIDES:
        concept, country, context, features, captions = SIDE_FIELDS[side]
        one, many, cid = REF_SIDE_FIELDS[side]
        if fmt == FORMAT_OURS:
            texts = _captions(row.get(captions), captions, where)
        elif fmt == FORMAT_CAPTIONS:
            texts = _captions(row.get(many), many, where)
            single = text_field(row, one, where, required=False)
            if single is not None and single not in texts:  # the chosen caption is normally one of all
                texts.append(single)
        else:
            texts = [text_field(row, one, where)]
            if isinstance(row.get(cid), bool) or not isinstance(row.get(cid), int):
                raise RecordError(f"{where}: field {cid!r} must be an integer, got {row.get(cid)!r}")
            ids[side] = row[cid]
        if not texts:
            field_name = captions if fmt == FORMAT_OURS else many
            raise RecordError(f"{where}: no captions for the {side} side (field {field_name!r})")
        sides[side] = (text_field(row, concept, where), text_field(row, country, where, required=False),
                       extras[context], extras[features], texts)
    if sides[schema.POS_PREFIX][:2] == sides[schema.NEG_PREFIX][:2]:  # same concept and country
        raise RecordError(f"{where}: {schema.POS_CONCEPT!r} and {schema.NEG_CONCEPT!r} are the same concept "
                          f"{sides[schema.POS_PREFIX][0]!r}: not a twin pair")
    rec = pair_record(category, sides)
    given = row.get(schema.TWIN_ID)
    if given is not None and given != rec[schema.TWIN_ID]:
        raise RecordError(f"{where}: field {schema.TWIN_ID!r} is {given!r} but its fields give "
                          f"{rec[schema.TWIN_ID]!r} (edited after it was made?)")
    return fmt, rec, ids


# ---------------------------------------------------------------------------------------------- merging
class _Merger:
    """Joins the rows of each twin pair into one record, checking that they agree."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.first_where: dict[str, str] = {}
        self.by_id: dict[tuple, tuple[str, str]] = {}  # (twin, side, caption id) -> (caption, where)

    def add(self, fmt: str, rec: dict, ids: dict, where: str) -> bool:
        """Add one parsed row; returns whether it joined an existing twin pair. Raises before changing
        anything when it conflicts with an earlier row."""
        tid = rec[schema.TWIN_ID]
        old = self.records.get(tid)
        for side, cid in ids.items():  # render input: one caption id means one caption
            caption = rec[SIDE_FIELDS[side][4]][0]
            prev = self.by_id.get((tid, side, cid))
            if prev is not None and prev[0] != caption:
                raise RecordError(f"{where}: field {REF_SIDE_FIELDS[side][0]!r} is {caption!r} but {prev[1]} gives "
                                  f"{prev[0]!r} for the same {REF_SIDE_FIELDS[side][2]} {cid}")
        if old is not None:
            for side in SIDES:
                for name in SIDE_FIELDS[side][2:4]:
                    if old[name] != rec[name]:
                        raise RecordError(f"{where}: field {name!r} is {rec[name]!r} but {self.first_where[tid]} "
                                          f"gives {old[name]!r} for the same twin pair")
        for side, cid in ids.items():
            self.by_id.setdefault((tid, side, cid), (rec[SIDE_FIELDS[side][4]][0], where))
        if old is None:
            self.records[tid] = {**rec, **{SIDE_FIELDS[s][4]: [] for s in ids}}  # render input: filled below
            self.first_where[tid] = where
        if not ids:
            for side in SIDES:
                captions = self.records[tid][SIDE_FIELDS[side][4]]
                captions += [c for c in rec[SIDE_FIELDS[side][4]] if c not in captions]
        return old is not None

    def finish(self) -> list[dict]:
        """The records sorted by twin_id; render-input captions appended in caption-id order."""
        by_id = sorted(self.by_id.items(), key=lambda kv: kv[0])
        for (tid, side, _), (caption, _) in by_id:
            captions = self.records[tid][SIDE_FIELDS[side][4]]
            if caption not in captions:
                captions.append(caption)
        return [self.records[t] for t in sorted(self.records)]


@dataclass
class ImportReport:
    """What :func:`read_pairs` / :func:`import_pairs` made of the input files.

    Attributes:
        rows: rows read (skipped ones included). pairs: twin pairs (records) made of them.
        rows_by_format: ``{format: rows}``. merged_rows: rows that joined an earlier row's twin pair.
        skipped, skipped_by_reason, skips: rows skipped with ``on_error="skip"``: count, by reason,
            and ``(where, message)`` each, in input order.
        inputs: ``[{file, sha256}]`` of the input files.
    """

    rows: int = 0
    pairs: int = 0
    rows_by_format: dict = field(default_factory=dict)
    merged_rows: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    skips: list = field(default_factory=list)
    inputs: list = field(default_factory=list)


def read_pairs(paths: Sequence[PathLike], on_error: str = "raise") -> tuple[list[dict], ImportReport]:
    """Read twin caption sets from files in any of the three formats (see the module docstring).

    Args:
        paths: JSONL or JSON-list files; formats may be mixed, even within one file.
        on_error: ``"raise"`` stops at the first unusable row; ``"skip"`` skips and counts it.

    Returns:
        ``(records sorted by twin_id, report)``.

    Raises:
        RecordError: an unusable row (with ``on_error="raise"``) or a file that is not JSON at all.
        FileNotFoundError: an input file does not exist.
    """
    check_on_error(on_error)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:  # fail before reading anything
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file {str(path)!r} not found")
    report, merger, formats, reasons = ImportReport(), _Merger(), Counter(), Counter()
    for path in paths:
        report.inputs.append({"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()})
        for where, row in _iter_rows(path):
            report.rows += 1
            try:
                fmt, rec, ids = parse_row(_checked_row(where, row), where)
                report.merged_rows += merger.add(fmt, rec, ids, where)
                formats[fmt] += 1
            except RecordError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipped %s", exc)
                reasons[exc.reason] += 1
                report.skips.append((where, str(exc)))
    records = merger.finish()
    report.pairs, report.skipped = len(records), len(report.skips)
    report.rows_by_format, report.skipped_by_reason = dict(sorted(formats.items())), dict(sorted(reasons.items()))
    return records, report
