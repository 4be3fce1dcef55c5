"""The OmegaConf resolvers of the configs under ``cultureclip/conf``, registered in one place.

Every entry point (``cultureclip.train``, ``cultureclip.evaluate``) and the tests call :func:`register`
before composing a config, so any config group (e.g. ``trainer=gpu``) composes from anywhere.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

from omegaconf import ListConfig, OmegaConf


def bf16_or_fp32() -> str:
    """Lightning precision: ``bf16-mixed`` where the GPU supports it, else ``32-true``."""
    import torch
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def workers(n: int = 4) -> int:
    """``n`` data-loader workers, but never more processes than the machine has cores."""
    return max(0, min(int(n), os.cpu_count() or 1))


def model_slug(name: str, pretrained: Optional[str] = None) -> str:
    """A folder name for a model's results (:func:`cultureclip.eval.tasks.model_slug`)."""
    from cultureclip.eval.tasks import model_slug as slug  # imported on use: it pulls in the eval stack
    return slug(name, pretrained)


def data_file(name: str) -> str:
    """The path of a file shipped in ``cultureclip/data_files`` (e.g. the curation demo's caption pairs)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no packaged data file {name!r} ({path})")
    return path


# folder names that say which split or step a shard folder is, not which data it holds
GENERIC_PARTS = {"", ".", "..", "train", "training", "val", "valid", "validation", "test", "export", "shards", "data",
                 "webdataset", "wds"}


def task_name(train_shards: Any, default: str = "run") -> str:
    """A run's name for its data: the innermost folder of the training shards that is not a generic one.

    ``data/toy/train`` gives ``toy``, ``data/curate_demo/export/train`` gives ``curate_demo``,
    ``/data/cultwin/train/shard-{000000..000099}.tar`` gives ``cultwin``; a list uses its first entry.
    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
    """
    spec = train_shards[0] if isinstance(train_shards, (list, tuple, ListConfig)) and len(train_shards) else train_shards
    spec = str(spec or "").split("::")[0]  # a webdataset "a::b" list
    for part in reversed(spec.replace("\\", "/").split("/")):
        if any(c in part for c in "{}*?[") or part.endswith((".tar", ".tgz")) or part.lower() in GENERIC_PARTS:
            continue
        name = re.sub(r"[^A-Za-z0-9._-]", "_", part.split(":")[-1])
        if name.strip("._-"):
            return name
    return default


RESOLVERS = {"cc_bf16_or_fp32": bf16_or_fp32, "cc_workers": workers, "cc_model_slug": model_slug,
             "cc_data_file": data_file, "cc_task_name": task_name}


def register() -> None:
    """Register every ``cc_*`` resolver with OmegaConf (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
