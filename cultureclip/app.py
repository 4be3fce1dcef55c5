"""Glue for the Hydra/Lightning entry points: config checks, callbacks, run-directory safety,
atomic checkpoints and the end-of-run outputs. Library modules never import this one.
(Config resolvers: :mod:`cultureclip.resolvers`.)"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from cultureclip.data.datamodule import check_shard_specs
from cultureclip.eval.results import package_versions

log = logging.getLogger("cultureclip")


def check_train_config(cfg: DictConfig) -> None:
    """Refuse settings that would silently do something else, before any model is built or data read."""
    accum = cfg.trainer.get("accumulate_grad_batches", 1)
    if accum != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accum} is not used: set optim.accum_freq={accum} instead (and leave "
            f"the trainer's at 1). Lightning's accumulation gives each micro-batch only its own negatives; "
            f"optim.accum_freq keeps one negative pool over all micro-batches of an optimizer step.")
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("this config trains on a GPU (trainer=gpu, which +experiment=cultwin selects) but no CUDA "
                           "GPU is available here; add trainer=cpu to run the same recipe on the CPU")
    check_shard_specs(cfg.data.train_shards, cfg.data.get("val_shards"), cfg.data.get("toy_dir"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync, then rename over the target.

    A kill during the write leaves the previous ``last.ckpt`` intact (a rename within a folder is atomic
    on POSIX); Lightning's own writer may go through a temporary file elsewhere and copy it across
    file systems, which is not atomic.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def instantiate_dict(cfg: Optional[DictConfig]) -> list:
    """Instantiate every entry of a callbacks/logger group (a dict of configs with ``_target_``)."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def check_run_dir(run_dir: Path, ckpt_path: Optional[str]) -> None:
    """Refuse to start a fresh run over a run directory that already holds checkpoints."""
    existing = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    if existing and ckpt_path is None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints ({existing[-1].name}, ...). Resume with ckpt_path=last, "
            f"or start a new run with run_name=<new name>; nothing was overwritten.")


def metrics_of(results: Optional[list[dict]]) -> dict[str, float]:
    """``trainer.validate`` output (a list with one dict) as plain floats."""
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    keys = sorted(set(before) | set(after))
    rows = ["| metric | before | after |", "|---|---|---|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        rows.append(f"| {k} | {'' if b is None else f'{b:.4f}'} | {'' if a is None else f'{a:.4f}'} |")
    return "\n".join(rows)


def write_run_outputs(run_dir: Path, encoder, trainer, cfg: DictConfig, before: dict, after: dict) -> dict:
    """Export ``model/`` (LoRA merged, open_clip layout) and ``metrics.json``; rank 0 only."""
    best = [c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    record = {"before": before, "after": after, "global_step": int(trainer.global_step),
              "best_checkpoint": best[0] if best else None,
              "config": OmegaConf.to_container(cfg, resolve=True), "versions": package_versions()}
    if trainer.is_global_zero:
        encoder.save_pretrained(run_dir / "model")
        tmp = run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, run_dir / "metrics.json")
        print(f"\nheld-out metrics ({run_dir}):\n{format_table(before, after)}\n")
    return record
