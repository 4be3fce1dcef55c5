"""Fine-tune with Lightning + Hydra: ``python -m cultureclip.train [+experiment=cultwin] [key=value ...]``.

Composes ``conf/train.yaml``, instantiates data, model, loss, module, callbacks, loggers and trainer,
validates before and after fitting, and leaves ``model/`` and ``metrics.json`` in the run directory.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from cultureclip import app, callbacks
from cultureclip.lit_module import CultureCLIPModule

app.register_resolvers()


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one training job; returns ``(metrics, objects)``."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    lock, ckpt_path = app.start_run(cfg)  # lock the run dir, resolve ckpt_path=last, save the config
    datamodule = instantiate(cfg.data)  # checks the shard paths before any model is built
    encoder = instantiate(cfg.model)
    datamodule.encoder = encoder
    module = CultureCLIPModule(
        encoder, instantiate(cfg.loss), optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler), weight_decay=cfg.optim.weight_decay,
        accum_freq=cfg.trainer.accumulate_grad_batches, grad_clip_norm=cfg.optim.grad_clip_norm)
    trainer = instantiate(cfg.trainer, accumulate_grad_batches=1, callbacks=app.instantiate_dict(cfg.callbacks),
                          logger=app.instantiate_dict(cfg.logger) or False, plugins=[app.AtomicCheckpointIO()])
    before = app.before_metrics(run_dir, cfg, resuming=ckpt_path is not None, compute=lambda: app.metrics_of(
        trainer.validate(module, datamodule=datamodule, verbose=False)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    after = app.metrics_of(trainer.validate(module, datamodule=datamodule, verbose=False))
    record = app.write_run_outputs(run_dir, encoder, trainer, cfg, before, after)
    if lock is not None:
        lock.release()
    return record, {"trainer": trainer, "module": module, "datamodule": datamodule, "encoder": encoder}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with callbacks.exit_on_sigterm():  # pre-empted: exit status 143 and a "resume with" line
        record, _ = train(cfg)
    return record["after"].get("val/twin_acc", float("nan"))


if __name__ == "__main__":
    main()
