"""LightningModule: one contrastive step over twin-pair batches, validation metrics, optimizers. No I/O.

Gradient accumulation keeps the full pool of in-batch negatives (open_clip's ``accum_freq``): the
micro-batches of one optimizer step are first encoded without gradient and cached; then each is
re-encoded with gradient, put back into the cached features, and the loss over *all* micro-batches
is back-propagated. Lightning's ``accumulate_grad_batches`` would instead add up per-micro-batch
losses, each with only its own negatives (the reference code's defect), so this module optimises
manually and the trainer's accumulation stays at 1.

Validation logs the twin metrics of :mod:`cultureclip.metrics` as ``val/<name>`` (the names
``cultureclip.eval.twins`` reports), plus ``val/loss`` and ``val/skipped_samples``.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import MeanMetric

from cultureclip import metrics, schema
from cultureclip.loss import CultureCLIPLoss
from cultureclip.model import TRAINING_CKPT_KEY, CultureCLIP
from cultureclip.optim import param_groups

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so that s <= 100
VAL_METRICS = (metrics.TWIN_ACC, metrics.CONCEPT_TOP1, metrics.TWIN_CONFUSION)


class CultureCLIPModule(L.LightningModule):
    """Fine-tunes a :class:`CultureCLIP` encoder with :class:`CultureCLIPLoss`.

    Args:
        encoder: the model (LoRA or tower locks already applied).
        loss: the training loss.
        optimizer: partial ``torch.optim`` class taking ``params`` (Hydra ``_partial_: true``).
        scheduler: partial taking ``optimizer`` and ``total_steps`` (e.g. ``cultureclip.optim.warmup_schedule``).
        weight_decay: applied to matrices only (see ``cultureclip.optim.param_groups``).
        accum_freq: micro-batches per optimizer step, all sharing one negative pool.
        grad_clip_norm: max gradient norm, or None.
        total_steps: optimizer steps of the whole run, the lr schedule's length (required with a
            scheduler; see :func:`cultureclip.optim.schedule_length`).
        val_concepts: the concept vocabulary of the validation split (``img2concept_recall@1`` ranks
            every validation image against all of it); required when validating.
        val_shards: the validation split's shards, named when it yields no pair.
    """

    def __init__(self, encoder: CultureCLIP, loss: CultureCLIPLoss, optimizer, scheduler=None,
                 weight_decay: float = 0.1, accum_freq: int = 1, grad_clip_norm: Optional[float] = None,
                 total_steps: Optional[int] = None, val_concepts: Sequence[str] = (),
                 val_shards: Sequence[str] = ()):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["encoder", "loss", "optimizer", "scheduler",
                                                        "val_concepts", "val_shards"])
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        if scheduler is not None and (total_steps is None or total_steps < 1):
            raise ValueError(f"a scheduler needs total_steps >= 1 (the schedule length), got {total_steps}")
        self.total_steps, self.val_concepts, self.val_shards = total_steps, list(val_concepts), list(val_shards)
        self.automatic_optimization = False
        self.encoder, self.loss = encoder, loss
        self.val_loss_fn = copy.copy(loss)
        self.val_loss_fn.gather = False  # eval batches may be uneven across ranks; metrics sync instead
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.accum_freq, self.grad_clip_norm = weight_decay, accum_freq, grad_clip_norm
        self.val_loss = MeanMetric()
        self.val_metrics = torch.nn.ModuleDict({k.replace("@", "_at_"): MeanMetric() for k in VAL_METRICS})
        self._micro: list[dict] = []
        self._vocab_feats: Optional[torch.Tensor] = None
        self._vocab_index = {n: i for i, n in enumerate(self.val_concepts)}
        self._timer = {"window_start": None, "batch_end": None, "wait": 0.0, "pairs": 0}
        self._skipped_total = 0
        self._val_skipped = 0
        self._val_pairs = 0

    # ------------------------------------------------------------------ encoding
    def encode(self, batch: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode the requested inputs; images of both twins in one tower call, texts per kind.

        Concept names repeat within a batch: each distinct token row is encoded once and its features
        gathered back, whose backward adds the duplicates' gradients (the gradient of encoding each).
        """
        feats: dict[str, torch.Tensor] = {}
        for group, fn in ((schema.IMAGE_KEYS, self.encoder.encode_image),
                          (schema.CAPTION_KEYS, self.encoder.encode_text),
                          (schema.CONCEPT_KEYS, lambda t: self.encoder.encode_text(t, dedup=True))):
            wanted = [k for k in group if k in keys]
            if not wanted:
                continue
            out = fn(torch.cat([batch[k] for k in wanted]))  # [len(wanted) * B, D]
            feats.update(zip(wanted, out.chunk(len(wanted))))
        return feats

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        t = self._timer
        if t["window_start"] is None:
            t["window_start"] = now
        elif t["batch_end"] is not None:
            t["wait"] += now - t["batch_end"]  # time spent waiting for this batch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._timer["batch_end"] = time.perf_counter()

    def _check_finite(self, out: dict[str, torch.Tensor]) -> None:
        if not torch.isfinite(out["loss"]):
            terms = {k: float(v.detach()) for k, v in out.items()}
            raise FloatingPointError(f"non-finite loss at global step {self.global_step}: {terms}")

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        self._skipped_total += int(batch.get(schema.N_SKIPPED, 0))
        if schema.is_skip_report(batch):  # counted above, nothing to train on
            return None
        self._timer["pairs"] += batch[schema.POS_IMAGE].shape[0]
        self._micro.append(batch)
        if len(self._micro) < self.accum_freq:
            return None
        micro, self._micro = self._micro, []
        opt = self.optimizers()
        out = self.backward_over(micro)
        if self.grad_clip_norm:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            self.encoder.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self._log_train(out, opt)
        return out["loss"].detach()

    def backward_over(self, micro: list[dict], backward=None) -> dict[str, torch.Tensor]:
        """Back-propagate the loss over all micro-batches as one batch; returns the loss terms.

        One micro-batch: a plain step. Several: encode all without gradient, then re-encode each with
        gradient inside the cached features, so every micro-batch sees the negatives of all of them
        and the summed gradients equal those of the full batch.
        """
        backward = backward or self.manual_backward
        keys = self.loss.required_keys
        if len(micro) == 1:
            out = self.loss(self.encode(micro[0], keys), self.encoder.logit_scale.exp())
            self._check_finite(out)
            backward(out["loss"])
            return out
        with torch.no_grad():
            cache = [self.encode(mb, keys) for mb in micro]
        for j, mb in enumerate(micro):
            fresh = self.encode(mb, keys)
            feats = {k: torch.cat([fresh[k] if i == j else cache[i][k] for i in range(len(micro))])
                     for k in keys}  # [accum * B, D]
            # the temperature gets its gradient once, not once per micro-batch
            scale = self.encoder.logit_scale.exp()
            out = self.loss(feats, scale if j == 0 else scale.detach())
            self._check_finite(out)
            # skip DDP's gradient all-reduce until the last micro-batch of the step
            with contextlib.nullcontext() if j == len(micro) - 1 else self._no_sync():
                backward(out["loss"])
        return out

    def _no_sync(self):
        if self._trainer is None:  # called outside a Trainer (tests, custom loops)
            return contextlib.nullcontext()
        strategy = self.trainer.strategy
        block = getattr(strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _log_train(self, out: dict[str, torch.Tensor], opt) -> None:
        now, t = time.perf_counter(), self._timer
        dt = max(now - t["window_start"], 1e-9)
        world = self.trainer.world_size
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, on_step=True)
        self.log("train/loss", out["loss"].detach(), on_step=True, prog_bar=True)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True)
        self.log("train/logit_scale", self.encoder.logit_scale.exp().detach(), on_step=True)
        self.log("train/pairs_per_s", t["pairs"] * world / dt, on_step=True, prog_bar=True)
        self.log("train/data_wait_frac", t["wait"] / dt, on_step=True)
        self.log("train/skipped_samples", float(self._skipped_total), on_step=True, reduce_fx="sum",
                 sync_dist=world > 1)
        self._timer = {"window_start": now, "batch_end": None, "wait": 0.0, "pairs": 0}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        if not self.val_concepts:
            raise RuntimeError("CultureCLIPModule needs val_concepts (the concept names of the validation "
                               "split) to validate; TwinDataModule.val_concepts holds them after setup()")
        self._val_skipped = self._val_pairs = 0
        names = self.val_concepts
        feats = [self.encoder.encode_text(list(names[i:i + 256])) for i in range(0, len(names), 256)]
        self._vocab_feats = torch.cat(feats)  # [V, D]

    def _vocab_ids(self, names: Sequence[str]) -> torch.Tensor:
        try:
            return torch.tensor([self._vocab_index[n] for n in names], device=self.device)
        except KeyError as e:
            raise KeyError(f"validation concept {e.args[0]!r} is not in val_concepts ({len(self.val_concepts)} "
                           f"names): pass the vocabulary of this split") from None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_skipped += int(batch.get(schema.N_SKIPPED, 0))
        if schema.is_skip_report(batch):
            return
        f = self.encode(batch, schema.FEATURE_KEYS)
        out = self.val_loss_fn(f, self.encoder.logit_scale.exp())
        b = f[schema.POS_IMAGE].shape[0]
        self._val_pairs += b
        self.val_loss.update(out["loss"], weight=b)
        # every image of every pair is a query: pos images, then their twins
        images = torch.cat([f[schema.POS_IMAGE], f[schema.NEG_IMAGE]])  # [2B, D]
        own = self._vocab_ids(batch[schema.POS_CONCEPT + schema.TEXT_SUFFIX]
                              + batch[schema.NEG_CONCEPT + schema.TEXT_SUFFIX])  # [2B]
        twin = torch.cat([own[b:], own[:b]])  # the pos image's twin is the neg concept and vice versa
        for name, hits in metrics.twin_outcomes(images, self._vocab_feats, own, twin).items():
            self.val_metrics[name.replace("@", "_at_")].update(hits)

    def on_validation_epoch_end(self) -> None:
        world = self.trainer.world_size
        pairs = int(self.trainer.strategy.reduce(torch.tensor(float(self._val_pairs), device=self.device),
                                                 reduce_op="sum")) if world > 1 else self._val_pairs
        if pairs == 0:
            shards = ", ".join(map(str, self.val_shards[:5])) + (" ..." if len(self.val_shards) > 5 else "")
            raise RuntimeError(f"the validation split yielded no pair ({self._val_skipped} samples skipped on "
                               f"rank {self.global_rank}); shards: {shards or 'unknown'}")
        self.log("val/loss", self.val_loss.compute(), sync_dist=False)
        for name in VAL_METRICS:
            metric = self.val_metrics[name.replace("@", "_at_")]
            self.log(f"val/{name}", metric.compute(), prog_bar=name != metrics.TWIN_CONFUSION)
            metric.reset()
        self.log("val/skipped_samples", float(self._val_skipped), reduce_fx="sum", sync_dist=world > 1)
        self.val_loss.reset()
        self._vocab_feats = None

    # ------------------------------------------------------------------ optimizers and state
    def configure_optimizers(self):
        opt = self.optimizer_factory(params=param_groups(self.encoder, self.weight_decay))
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # lets CultureCLIP.from_pretrained("....ckpt") rebuild the encoder without the run's config
        checkpoint[TRAINING_CKPT_KEY] = self.encoder.checkpoint_metadata(prefix="encoder.")
        # RNG states as tensors and plain tuples, so the checkpoint loads with weights_only=True
        np_state = np.random.get_state()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }
        # this rank's running skip count (rank 0's is the one saved), so train/skipped_samples goes on counting
        checkpoint["skipped_samples"] = self._skipped_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.global_rank == 0:  # the other ranks' shares were not saved: they restart from 0
            self._skipped_total = int(checkpoint.get("skipped_samples", 0))
        rng = checkpoint.get("rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` with this module's manual optimisation.

    Lightning (2.6) assumes a manually optimised module may want the state *before* its last optimizer
    step and warns on every run when no ``saved_models`` snapshot exists. Here ``training_step`` finishes
    whole optimizer steps, so the state at ``global_step`` N is exactly the state after N steps, which is
    what a resume needs; this callback saves it, as Lightning does for automatic optimisation.
    Step-based only: ``train_time_interval`` is refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._train_time_interval is not None:
            raise ValueError("StepCheckpoint saves every_n_train_steps; use ModelCheckpoint for train_time_interval")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps:
            return
        if self._should_skip_saving_checkpoint(trainer):  # e.g. this step was saved at the previous micro-batch
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_time_checked = time.monotonic()
