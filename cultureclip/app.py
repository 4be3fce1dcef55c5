"""Glue for the Hydra/Lightning entry points: config checks, callbacks, run-directory safety,
atomic checkpoints and the end-of-run outputs. Library modules never import this one.
(Config resolvers: :mod:`cultureclip.resolvers`.)"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from cultureclip import rundir
from cultureclip.errors import ConfigError
from cultureclip.data.datamodule import check_replay, check_shard_specs
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
        raise ConfigError("this config trains on a GPU (trainer=gpu, which +experiment=cultwin selects) but no CUDA "
                           "GPU is available here; add trainer=cpu to run the same recipe on the CPU")
    check_shard_specs(cfg.data.train_shards, cfg.data.get("val_shards"), cfg.data.get("toy_dir"))
    replay_on = (cfg.data.get("replay") or {}).get("shards") is not None
    weights = {k: float(cfg.loss.get(k) or 0.0) for k in ("lambda_replay", "lambda_distill")}
    if replay_on != any(w > 0 for w in weights.values()):
        raise ValueError(f"data.replay.shards is {'set' if replay_on else 'null'} but loss.lambda_replay="
                         f"{weights['lambda_replay']} and loss.lambda_distill={weights['lambda_distill']}: replay "
                         f"data needs a weight > 0 to be used, and a replay weight needs data.replay.shards")
    check_replay(cfg.data.get("replay"), cfg.data.batch_size)  # keys, batch size, shard patterns


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync, then rename over the target.

    A kill during the write leaves the previous ``last.ckpt`` intact (a rename within a folder is atomic
    on POSIX); Lightning's own writer may go through a temporary file elsewhere and copy it across
    file systems, which is not atomic. A failed write removes its temporary file, and a full disk says
    so in the error's last line (:func:`cultureclip.rundir.save_atomic`).

    Args:
        opener: opens the temporary file for binary writing (a test can pass one whose writes fail).
    """

    def __init__(self, opener: Optional[Callable[[Path], Any]] = None) -> None:
        super().__init__()
        self.opener = opener

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        kwargs = {} if self.opener is None else {"opener": self.opener}
        rundir.save_atomic(lambda f: torch.save(checkpoint, f), path, **kwargs)


def instantiate_dict(cfg: Optional[DictConfig]) -> list:
    """Instantiate every entry of a callbacks/logger group (a dict of configs with ``_target_``)."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def _csv_log_dirs(cfg: DictConfig) -> list[Path]:
    dirs = []
    for c in (cfg.get("logger") or {}).values():
        if c is not None and str(c.get("_target_", "")).endswith("CSVLogger"):
            dirs.append(Path(c.save_dir) / str(c.get("name") or "") / str(c.get("version") or ""))
    return dirs


def _save_hydra_config(run_dir: Path, cfg: DictConfig, resuming: bool) -> None:
    """Hydra's saved config, written only once this process owns the run directory.

    ``hydra.output_subdir`` is null in train.yaml, so Hydra itself writes nothing into the run
    directory before the lock is taken. A resumed attempt writes ``.hydra/resume-N/``, leaving the
    first run's files as they were.
    """
    from hydra.core.hydra_config import HydraConfig
    folder = run_dir / ".hydra"
    if resuming:
        n = 1 + sum(1 for _ in folder.glob("resume-*"))
        folder = folder / f"resume-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
        files["overrides.yaml"] = OmegaConf.create(list(hydra_cfg.overrides.task))
    for name, content in files.items():
        (folder / name).write_text(OmegaConf.to_yaml(content))


def start_run(cfg: DictConfig) -> tuple[Optional[rundir.RunDirLock], Optional[Path]]:
    """Claim the run directory before anything is written into it: lock (rank 0 of a launch only),
    resolve ``ckpt_path``, refuse a fresh run over checkpoints, clear partial checkpoint writes, save
    the config, and move an earlier attempt's CSV log aside. Returns ``(lock, checkpoint to resume)``.
    """
    run_dir = Path(cfg.paths.run_dir)
    if not rundir.is_launch_owner():  # other DDP ranks: the launch's rank 0 holds the lock
        return None, rundir.resolve_ckpt_path(run_dir, cfg.ckpt_path)
    lock = rundir.RunDirLock(run_dir).acquire()
    atexit.register(lock.release)
    ckpt = rundir.resolve_ckpt_path(run_dir, cfg.ckpt_path)
    rundir.check_fresh_or_resuming(run_dir, ckpt)
    rundir.remove_tmp_leftovers(run_dir / "checkpoints")
    _save_hydra_config(run_dir, cfg, resuming=ckpt is not None)
    if ckpt is not None:
        for d in _csv_log_dirs(cfg):
            rundir.archive_metrics_log(d)
    return lock, ckpt


def before_metrics(run_dir: Path, cfg: DictConfig, resuming: bool, compute: Callable[[], dict]) -> dict:
    """Held-out metrics of the untrained model: measured at the start, saved, reused on resume."""
    return rundir.load_or_compute_before(run_dir, compute, resuming=resuming, enabled=bool(cfg.heldout.before_after))


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


def throughput(trainer) -> dict[str, float]:
    """The module's run averages (images/s, TFLOP/s, MFU; :meth:`CultureCLIPModule.throughput_summary`)."""
    summary = getattr(trainer.lightning_module, "throughput_summary", None)
    return summary() if summary is not None else {}


def write_run_outputs(run_dir: Path, encoder, trainer, cfg: DictConfig, before: dict, after: dict) -> dict:
    """Export ``model/`` (LoRA merged, open_clip layout) and ``metrics.json``, merge the CSV logs of
    all attempts; rank 0 only."""
    best = [c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    record = {"before": before, "after": after, "global_step": int(trainer.global_step),
              "best_checkpoint": best[0] if best else None, "throughput": throughput(trainer),
              "config": OmegaConf.to_container(cfg, resolve=True), "versions": package_versions()}
    if trainer.is_global_zero:
        for d in _csv_log_dirs(cfg):  # one log over all attempts of a resumed run
            rundir.merge_metrics_logs(d)
        encoder.save_pretrained(run_dir / "model")
        tmp = run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, run_dir / "metrics.json")
        speed = ", ".join(f"{k} {v:.4g}" for k, v in record["throughput"].items()) or "not measured"
        print(f"\nheld-out metrics ({run_dir}):\n{format_table(before, after)}\ntraining throughput: {speed}\n")
    return record
