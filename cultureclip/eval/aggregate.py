"""Read result JSONs (``cultureclip.eval.results.write_result``) and combine them into one table.

One row per (model, pretrained, task), as CLIP_benchmark's ``build`` does: the header fields first,
then every metric of every file (the union of columns; a metric a task does not report is blank).
A metric whose name equals a header field (the cultural benchmarks' ``n``) is written as ``metric.n``, so the
header value is never overwritten. ``tools/aggregate_results.py`` is the command line.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from cultureclip.eval.results import RESULT_KEYS

KEY_FIELDS = ("model", "pretrained", "task")  # what makes a row unique
HEADER_COLUMNS = RESULT_KEYS  # model, pretrained, task, dataset, split, revision, seed, n
PathLike = Union[str, os.PathLike]


class ResultFileError(ValueError):
    """A file is not a result JSON; the message names the file and what is wrong."""


def load_result(path: PathLike) -> dict:
    """One result file as a dict, with ``"path"`` added.

    Raises:
        ResultFileError: not JSON, not an object, a header key or ``metrics`` missing, or a
            non-scalar metric.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultFileError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(record, dict):
        raise ResultFileError(f"{path}: not a result file (a JSON {type(record).__name__}, not an object)")
    missing = [k for k in (*RESULT_KEYS, "metrics") if k not in record]
    if missing:
        raise ResultFileError(f"{path}: not a result file (missing header keys {missing})")
    if not isinstance(record["metrics"], dict):
        raise ResultFileError(f"{path}: 'metrics' must be an object")
    nested = [k for k, v in record["metrics"].items() if isinstance(v, (dict, list))]
    if nested:
        raise ResultFileError(f"{path}: metrics {nested[:3]} are not scalars")
    return {**record, "path": str(path)}


def result_files(folders: Iterable[PathLike], recursive: bool = False) -> list[Path]:
    """The ``*.json`` files of each folder (sorted; a file argument is taken as is)."""
    files = []
    for folder in map(Path, folders):
        if folder.is_file():
            files.append(folder)
        elif folder.is_dir():
            files += sorted(folder.rglob("*.json") if recursive else folder.glob("*.json"))
        else:
            raise FileNotFoundError(f"{folder}: no such results folder")
    return files


def load_results(folders: Union[PathLike, Iterable[PathLike]], skip_bad: bool = False,
                 recursive: bool = False) -> tuple[list[dict], list[str]]:
    """Every result of the given folders, checked for duplicates.

    Args:
        folders: one folder (or file), or several.
        skip_bad: leave out files that are not results and report them, instead of raising.
        recursive: also read subfolders (e.g. ``outputs/eval`` with one folder per model).

    Returns:
        ``(results, skipped)``: the results in file order and one message per skipped file.

    Raises:
        ResultFileError: a bad file (without ``skip_bad``), or the same (model, pretrained, task)
            in two files (always; the message names both).
    """
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    results, skipped, seen = [], [], {}
    for path in result_files(folders, recursive):
        try:
            record = load_result(path)
        except ResultFileError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        key = tuple(record[k] for k in KEY_FIELDS)
        if key in seen:
            raise ResultFileError(f"duplicate result for (model, pretrained, task) = {key}: {seen[key]} and {path}")
        seen[key] = path
        results.append(record)
    return results, skipped


def metric_column(name: str) -> str:
    return f"metric.{name}" if name in HEADER_COLUMNS else name


def table(results: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: header columns, then the sorted union of metric columns; rows as dicts."""
    metric_cols = sorted({metric_column(k) for r in results for k in r["metrics"]})
    rows = []
    for r in results:
        row = {k: r[k] for k in HEADER_COLUMNS}
        row.update({metric_column(k): v for k, v in r["metrics"].items()})
        rows.append(row)
    return [*HEADER_COLUMNS, *metric_cols], rows


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and digits is not None and math.isfinite(value):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(results: Sequence[dict], path: PathLike) -> Path:
    """One CSV row per result, all columns; absent values are blank."""
    columns, rows = table(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(row.get(c)) for c in columns] for row in rows])
    return path


def to_markdown(results: Sequence[dict], digits: int = 4, grouped: bool = False) -> str:
    """A Markdown table; without ``grouped``, only overall metrics (no ``acc/country=...`` breakdowns,
    which would make hundreds of columns)."""
    columns, rows = table(results)
    if not grouped:
        columns = [c for c in columns if c in HEADER_COLUMNS or "/" not in c]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
