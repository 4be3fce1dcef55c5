"""Result files: one JSON per (model, task) with a header that makes the number reproducible."""
from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

RESULT_KEYS = ("model", "pretrained", "task", "dataset", "split", "revision", "seed", "n")
_PACKAGES = ("cultureclip", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "webdataset", "numpy")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide an evaluation number (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "none"


def write_result(out_dir: os.PathLike | str, *, model: str, pretrained: Optional[str], task: str, dataset: str,
                 split: Optional[str], revision: Optional[str], seed: Optional[int], n: int,
                 metrics: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``{header..., "versions", "metrics"}`` to ``out_dir/<model>__<pretrained>__<task>.json``,
    or ``out_dir/<model>__<task>.json`` when ``pretrained`` is None (a local model, random weights).

    ``metrics`` must be flat (``{"acc1": 0.71, "i2t_recall@5": ...}``); nested values are refused so
    the aggregator can turn every file into one CSV row.
    """
    for k, v in metrics.items():
        if isinstance(v, (dict, list, tuple)):
            raise ValueError(f"metric {k!r} is not a scalar; put tables in `extra`")
    record = {"model": model, "pretrained": pretrained, "task": task, "dataset": dataset, "split": split,
              "revision": revision, "seed": seed, "n": int(n), "versions": package_versions(),
              "metrics": dict(metrics)}
    if extra:
        record["extra"] = dict(extra)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [model] + ([] if pretrained is None else [pretrained]) + [task]
    path = out_dir / ("__".join(map(_slug, parts)) + ".json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=float))
    os.replace(tmp, path)
    return path
