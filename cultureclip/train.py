"""Fine-tune with Lightning + Hydra: ``python -m cultureclip.train [+experiment=cultwin] [key=value ...]``.

Composes ``conf/train.yaml``, instantiates model, data, loss, module, callbacks, loggers and trainer,
validates before and after fitting, and leaves ``model/`` and ``metrics.json`` in the run directory.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from cultureclip import app, callbacks, errors, logs, resolvers
from cultureclip.lit_module import CultureCLIPModule
from cultureclip.optim import schedule_length

resolvers.register()  # before @hydra.main composes the config


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one training job; returns ``(metrics, objects)``."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    app.check_train_config(cfg)  # shard paths, GPU, accumulation key: before anything is built or written
    lock, ckpt_path = app.start_run(cfg)  # lock the run dir, resolve ckpt_path=last, save the config
    encoder = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, spec=encoder.data_spec())
    trainer = instantiate(cfg.trainer, callbacks=app.instantiate_dict(cfg.callbacks),
                          logger=app.instantiate_dict(cfg.logger) or False, plugins=[app.AtomicCheckpointIO()])
    # the module's vocabulary and schedule length come from the data (Lightning's documented pattern);
    # building the toy set is safe on several ranks at once, and a no-op once it exists
    datamodule.prepare_data()
    datamodule.setup("fit")
    accum, per_epoch = cfg.optim.accum_freq, datamodule.batches_per_epoch(trainer.world_size)
    module = CultureCLIPModule(
        encoder, instantiate(cfg.loss), optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler), weight_decay=cfg.optim.weight_decay, accum_freq=accum,
        grad_clip_norm=cfg.optim.grad_clip_norm, val_concepts=datamodule.val_concepts, val_shards=datamodule.val_urls,
        total_steps=schedule_length(trainer.max_steps, trainer.max_epochs, per_epoch, accum), **cfg.module)
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
    logs.quiet(logs.hydra_verbose())  # third-party INFO noise off unless hydra.verbose asks for it
    with errors.exit_on_user_error(), callbacks.exit_on_sigterm():  # settings: one line; pre-empted: 143
        record, _ = train(cfg)
    return record["after"].get("val/twin_acc", float("nan"))


if __name__ == "__main__":
    main()
