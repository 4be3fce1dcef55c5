"""Cultural benchmarks as zero-shot multiple choice: the registry, and the row sources they share.

``EVALUATORS`` maps a benchmark name to ``"module:function"``; :func:`get_evaluator` imports it on
first use (lazily, so the benchmark modules can import the helpers below without an import cycle).
Every benchmark function has the signature
``evaluate(model, source, split, revision, seeds, protocol, batch_size, num_workers, ...) -> (metrics, header)``
and ``write_result(out_dir, model=..., pretrained=..., metrics=metrics, **header)`` stores the result.

Rows come from :func:`read_rows`, in one of these forms:

- a Hugging Face dataset id (``"UBC-VL/GlobalRG-Retrieval"``): ``datasets.load_dataset(id, split=...,
  revision=...)`` with image columns cast to ``Image(decode=False)``, so images stay encoded bytes and
  are decoded (and counted when broken) by the scoring workers. Needs the optional ``datasets`` package.
- a local file: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or an
  ``{id: object}`` mapping), or ``.parquet`` (needs ``pyarrow``; the layout ``datasets`` exports, with
  images as ``{"bytes": ..., "path": ...}`` structs). Field names are the hub dataset's; nested fields
  (CROPE's ``metadata``) stay nested objects. An image field given as a string (or as ``{"path": ...}``
  without bytes) is a file path, relative to ``images_dir`` if given, else to the row file's folder.
- a local folder: ``{split}.jsonl``/``{split}.json``/``{split}.parquet``, else the hub's parquet
  layouts ``**/{split}-*.parquet`` and ``**/{split}/*.parquet`` (a ``huggingface-cli download`` of
  the dataset repo); with ``split=None``, every ``.json``/``.jsonl``/``.parquet`` file directly inside.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EVALUATORS: dict[str, str] = {
    "globalrg_retrieval": "cultureclip.eval.cultural.globalrg:evaluate_retrieval",
    "globalrg_grounding": "cultureclip.eval.cultural.globalrg:evaluate_grounding",
    "crope": "cultureclip.eval.cultural.crope:evaluate",
    "cultureverse": "cultureclip.eval.cultural.cultureverse:evaluate",
}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def get_evaluator(name: str) -> Callable:
    """The ``evaluate`` function registered under ``name``."""
    if name not in EVALUATORS:
        raise KeyError(f"unknown benchmark {name!r}; registered: {sorted(EVALUATORS)}")
    module, func = EVALUATORS[name].split(":")
    return getattr(importlib.import_module(module), func)


class RowError(ValueError):
    """A benchmark row lacks a field or has an unusable value; the message names the row and field."""


@dataclass(frozen=True)
class SourceRow:
    """One raw row and where it came from (a file path or ``hf:<id>@<revision>[<split>]``)."""
    origin: str
    index: int
    data: dict

    @property
    def where(self) -> str:
        return f"{self.origin}: row {self.index}"


def is_file_list(source: Any) -> bool:
    """A list of files (also an OmegaConf ``ListConfig``), as opposed to one path or a hub id."""
    return isinstance(source, SequenceABC) and not isinstance(source, (str, bytes))


def is_local(source: Any) -> bool:
    return is_file_list(source) or os.path.exists(os.fspath(source))


def read_rows(source: Any, split: Optional[str] = "test", revision: Optional[str] = None,
              image_fields: Sequence[str] = ("image",), images_dir: Optional[os.PathLike] = None) -> list[SourceRow]:
    """All rows of a benchmark split, in dataset order.

    Args:
        source: a hub dataset id, a local file or folder (see the module docstring), or a list of files.
        split: the split to read from a hub id or a folder (``None`` with a folder: every data file
            in it); a file is read whole, whatever the split (the header still records it).
        revision: hub revision (commit, tag or branch); recorded only for local sources.
        image_fields: top-level fields holding an image or a list of images; local string paths in
            them are made absolute.
        images_dir: folder that relative image paths refer to (default: the row file's folder).
    """
    if not is_local(source):
        # a missing "dir/x.jsonl" also looks like org/name: a data suffix means a local file
        if not _HF_ID.match(str(source)) or Path(str(source)).suffix in DATA_SUFFIXES:
            raise FileNotFoundError(f"{str(source)!r} is neither an existing path nor a hub dataset id (org/name)")
        return load_hf_rows(str(source), split, revision)
    files = [Path(f) for f in source] if is_file_list(source) else _local_files(Path(source), split)
    rows = []
    for path in files:
        base = Path(images_dir) if images_dir is not None else path.parent
        for i, data in enumerate(_read_file(path)):
            if not isinstance(data, dict):
                raise RowError(f"{path}: row {i}: expected an object, got {type(data).__name__}")
            for f in image_fields:
                if f in data:
                    data[f] = _resolve_images(data[f], base)
            rows.append(SourceRow(str(path), i, data))
    return rows


def _local_files(path: Path, split: Optional[str]) -> list[Path]:
    if path.is_file():
        return [path]
    if split is None:
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    else:
        files = next(([path / f"{split}{s}"] for s in DATA_SUFFIXES if (path / f"{split}{s}").is_file()), None) \
            or sorted(path.glob(f"**/{split}-*.parquet")) or sorted(path.glob(f"**/{split}/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no data file for split {split!r} in {path} (tried {split}.jsonl/.json/.parquet, "
                                f"**/{split}-*.parquet, **/{split}/*.parquet)")
    return files


def _read_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RowError(f"{path}: line {line_no}: invalid JSON ({e})") from e
        return rows
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            return list(data.values())
        if not isinstance(data, list):
            raise RowError(f"{path}: expected a JSON list of rows or an {{id: row}} object")
        return data
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {DATA_SUFFIXES}")


def _resolve_images(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_images(v, base) for v in value]
    if isinstance(value, str):
        return str(base / value)  # an absolute value stays absolute (pathlib join)
    if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
        return {**value, "path": str(base / value["path"])}
    return value


def load_hf_rows(dataset_id: str, split: Optional[str], revision: Optional[str]) -> list[SourceRow]:
    """Rows of a hub dataset with images left encoded (needs network and the ``datasets`` package)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading {dataset_id!r} from the hub needs the optional `datasets` package "
                          f"(pip install datasets), or pass a local copy (see cultureclip.eval.cultural)") from e
    ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    ds = ds.cast(datasets.Features({k: _undecoded(v, datasets) for k, v in ds.features.items()}))
    origin = f"hf:{dataset_id}@{revision or 'default'}[{split}]"
    return [SourceRow(origin, i, row) for i, row in enumerate(ds)]


def _undecoded(feature: Any, datasets) -> Any:
    """The same feature with every ``Image`` set to ``decode=False`` (also inside lists and structs)."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, dict):
        return {k: _undecoded(v, datasets) for k, v in feature.items()}
    if isinstance(feature, list):
        return [_undecoded(v, datasets) for v in feature]
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # Sequence / List / LargeList
        return dataclasses.replace(feature, feature=_undecoded(feature.feature, datasets))
    return feature


def get_field(row: SourceRow, name: str, allow_empty: bool = False) -> Any:
    """``row.data[name]``; a dotted name looks into nested objects (``metadata.definition_concept``)
    and falls back to a flat key of that name (pandas ``json_normalize`` output)."""
    value, found = row.data, True
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            found = False
            break
    if not found and name in row.data:
        value, found = row.data[name], True
    if not found:
        raise RowError(f"{row.where}: missing field {name!r}")
    if not allow_empty and (value is None or value == ""):
        raise RowError(f"{row.where}: field {name!r} is empty")
    return value


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")


def select_fields(rows: Sequence[SourceRow], fields: Sequence[str], on_bad_row: str = "raise",
                  allow_empty: Sequence[str] = ()) -> tuple[list[dict], list[str]]:
    """``({field: value, ..., "_where": ...} per good row, [error message per bad row])``.

    With ``on_bad_row="raise"`` the first bad row raises :class:`RowError`; with ``"skip"`` it is
    left out and its message returned, so the caller can count and report it.
    """
    check_on_bad_row(on_bad_row)
    good, bad = [], []
    for row in rows:
        try:
            values = {f: get_field(row, f, allow_empty=f in allow_empty) for f in fields}
        except RowError as e:
            keep_bad_row(e, on_bad_row, bad)
            continue
        good.append({**values, "_where": row.where})
    return good, bad


def keep_bad_row(error: RowError, on_bad_row: str, bad: list) -> None:
    """The one bad-row policy: re-raise ``error`` with ``on_bad_row="raise"``, else keep its message in ``bad``."""
    if on_bad_row == "raise":
        raise error
    bad.append(str(error))
