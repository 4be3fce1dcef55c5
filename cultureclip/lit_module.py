"""LightningModule: one contrastive step over twin-pair batches, validation metrics, optimizers. No I/O.

Gradient accumulation keeps the full pool of in-batch negatives (open_clip's ``accum_freq``): the
micro-batches of one optimizer step are first encoded without gradient and cached; then each is
re-encoded with gradient, put back into the cached features, and the loss over *all* micro-batches
is back-propagated. Lightning's ``accumulate_grad_batches`` would instead add up per-micro-batch
losses, each with only its own negatives (the reference code's defect), so this module optimises
manually and the trainer's accumulation stays at 1.
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
from torchmetrics import MeanMetric

from cultureclip import schema
from cultureclip.loss import CultureCLIPLoss
from cultureclip.model import TRAINING_CKPT_KEY, CultureCLIP
from cultureclip.optim import param_groups

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so that s <= 100


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
    """

    def __init__(self, encoder: CultureCLIP, loss: CultureCLIPLoss, optimizer, scheduler=None,
                 weight_decay: float = 0.1, accum_freq: int = 1, grad_clip_norm: Optional[float] = None):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["encoder", "loss", "optimizer", "scheduler"])
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        self.automatic_optimization = False
        self.encoder, self.loss = encoder, loss
        self.val_loss_fn = copy.copy(loss)
        self.val_loss_fn.gather = False  # eval batches may be uneven across ranks; metrics sync instead
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.accum_freq, self.grad_clip_norm = weight_decay, accum_freq, grad_clip_norm
        self.val_loss, self.val_twin_acc, self.val_concept_top1 = MeanMetric(), MeanMetric(), MeanMetric()
        self._micro: list[dict] = []
        self._vocab_feats: Optional[torch.Tensor] = None
        self._vocab_index: dict[str, int] = {}
        self._timer = {"window_start": None, "batch_end": None, "wait": 0.0, "pairs": 0}
        self._skipped_total = 0
        self._val_skipped = 0

    # ------------------------------------------------------------------ encoding
    def encode(self, batch: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode the requested inputs; images of both twins in one tower call, texts per kind."""
        feats: dict[str, torch.Tensor] = {}
        for group, fn in ((schema.IMAGE_KEYS, self.encoder.encode_image),
                          (schema.CAPTION_KEYS, self.encoder.encode_text),
                          (schema.CONCEPT_KEYS, self.encoder.encode_text)):
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
        names = getattr(self.trainer.datamodule, "val_concepts", None)
        if not names:
            raise RuntimeError("the datamodule must expose val_concepts (the concept names of the "
                               "validation split) for val/concept_top1")
        self._vocab_index = {n: i for i, n in enumerate(names)}
        self._val_skipped = 0
        feats = [self.encoder.encode_text(list(names[i:i + 256])) for i in range(0, len(names), 256)]
        self._vocab_feats = torch.cat(feats)  # [V, D]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        f = self.encode(batch, schema.FEATURE_KEYS)
        out = self.val_loss_fn(f, self.encoder.logit_scale.exp())
        b = f[schema.POS_IMAGE].shape[0]
        self.val_loss.update(out["loss"], weight=b)
        # twin accuracy: every image must score its own concept name above its twin's
        pos_ok = (f[schema.POS_IMAGE] * f[schema.POS_CONCEPT]).sum(-1) > (f[schema.POS_IMAGE] * f[schema.NEG_CONCEPT]).sum(-1)
        neg_ok = (f[schema.NEG_IMAGE] * f[schema.NEG_CONCEPT]).sum(-1) > (f[schema.NEG_IMAGE] * f[schema.POS_CONCEPT]).sum(-1)
        self.val_twin_acc.update(torch.cat([pos_ok, neg_ok]).float())
        # concept top-1: every image against every concept name of the split
        images = torch.cat([f[schema.POS_IMAGE], f[schema.NEG_IMAGE]])  # [2B, D]
        names = batch[schema.POS_CONCEPT + schema.TEXT_SUFFIX] + batch[schema.NEG_CONCEPT + schema.TEXT_SUFFIX]
        target = torch.tensor([self._vocab_index[n] for n in names], device=images.device)
        pred = (images @ self._vocab_feats.to(images.dtype).T).argmax(dim=-1)  # [2B]
        self.val_concept_top1.update((pred == target).float())
        self._val_skipped += int(batch.get(schema.N_SKIPPED, 0))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), sync_dist=False)
        self.log("val/twin_acc", self.val_twin_acc.compute(), prog_bar=True)
        self.log("val/concept_top1", self.val_concept_top1.compute(), prog_bar=True)
        self.log("val/skipped_samples", float(self._val_skipped), reduce_fx="sum", sync_dist=self.trainer.world_size > 1)
        for m in (self.val_loss, self.val_twin_acc, self.val_concept_top1):
            m.reset()
        self._vocab_feats = None

    # ------------------------------------------------------------------ optimizers and state
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (for the lr schedule): ``max_steps``, else epochs x steps per epoch."""
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        # Lightning cannot size an IterableDataset epoch; the datamodule knows it (micro-batches per device)
        per_epoch = getattr(self.trainer.datamodule, "batches_per_epoch", None)
        epochs = self.trainer.max_epochs
        if per_epoch is None or epochs is None or epochs < 1:
            raise ValueError("cannot size the lr schedule: set trainer.max_steps, or trainer.max_epochs with a "
                             "datamodule that has batches_per_epoch")
        return max(1, epochs * int(per_epoch) // self.accum_freq)

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=param_groups(self.encoder, self.weight_decay))
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt, total_steps=self.total_steps())
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
