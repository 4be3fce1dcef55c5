"""LightningModule: one contrastive step over twin-pair batches, validation metrics, optimizers. No I/O.

Gradient accumulation keeps the full pool of in-batch negatives (open_clip's ``accum_freq``): the
micro-batches of one optimizer step are first encoded without gradient and cached; then each is
re-encoded with gradient, put back into the cached features, and the loss over *all* micro-batches
is back-propagated. Lightning's ``accumulate_grad_batches`` would instead add up per-micro-batch
losses, each with only its own negatives (the reference code's defect), so this module optimises
manually and the trainer's accumulation stays at 1.

With general-data replay (:mod:`cultureclip.data.replay`) every batch also carries a replay batch; the
loss adds its CLIP term and, optionally, a distillation term towards a frozen copy of the starting image
tower (:class:`cultureclip.loss.FrozenImageTower`), logged as ``train/loss_replay``/``train/loss_distill``.

Validation logs the twin metrics of :mod:`cultureclip.metrics` as ``val/<name>`` (the names
``cultureclip.eval.twins`` reports), plus ``val/loss`` and ``val/skipped_samples``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from cultureclip import flops, metrics, schema
from cultureclip.data.resumable import restore_rng_states, rng_states
from cultureclip.family_setup import MAX_LOGIT_SCALE, check_gradients_reached, prepare_for_loss  # noqa: F401
from cultureclip.loss import CultureCLIPLoss, FrozenImageTower
from cultureclip.model import TRAINING_CKPT_KEY, CultureCLIP
from cultureclip.optim import param_groups
from cultureclip.step_stats import FiniteWatch, Throughput, tune_towers

log = logging.getLogger("cultureclip")
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
        check_finite_every: check the loss for NaN/inf every this many optimizer steps (and before any
            checkpoint is saved, and at the end of training). Each check reads the losses of the steps
            since the last one from the device at once: a check every step would stop a GPU for the
            host every step. The error names the first bad step and its loss terms.
        compile: ``torch.compile`` the image and text towers (in place, state-dict keys unchanged) at the
            start of fit. CUDA only: on a CPU it is ignored with a warning.
        channels_last: convert a convolutional image tower (ResNet) to channels-last memory on CUDA
            (``"auto"``/True; faster cuDNN convolutions with bf16); ViTs keep their layout.
        count_flops: count the FLOPs of one step on the first micro-batch (``torch.utils.flop_counter``)
            and log ``train/tflops`` and, on a GPU of :mod:`cultureclip.flops`'s table, ``train/mfu``.
    """

    def __init__(self, encoder: CultureCLIP, loss: CultureCLIPLoss, optimizer, scheduler=None,
                 weight_decay: float = 0.1, accum_freq: int = 1, grad_clip_norm: Optional[float] = None,
                 total_steps: Optional[int] = None, val_concepts: Sequence[str] = (),
                 val_shards: Sequence[str] = (), check_finite_every: int = 1, compile: bool = False,
                 channels_last: Any = "auto", count_flops: bool = True):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["encoder", "loss", "optimizer", "scheduler",
                                                        "val_concepts", "val_shards"])
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be true, false or 'auto', got {channels_last!r}")
        if scheduler is not None and (total_steps is None or total_steps < 1):
            raise ValueError(f"a scheduler needs total_steps >= 1 (the schedule length), got {total_steps}")
        self.total_steps, self.val_concepts, self.val_shards = total_steps, list(val_concepts), list(val_shards)
        self.automatic_optimization = False
        self.encoder, self.loss = encoder, loss
        self.max_logit_scale = prepare_for_loss(encoder, loss)  # family, frozen parts, temperature cap
        self.val_loss_fn = loss.twin_only()  # validation batches hold twins only
        self.val_loss_fn.gather = False  # eval batches may be uneven across ranks; metrics sync instead
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.accum_freq, self.grad_clip_norm = weight_decay, accum_freq, grad_clip_norm
        self.val_loss = MeanMetric()
        self.val_metrics = torch.nn.ModuleDict({k.replace("@", "_at_"): MeanMetric() for k in VAL_METRICS})
        self._micro: list[dict] = []
        self._vocab_feats: Optional[torch.Tensor] = None
        self._vocab_index = {n: i for i, n in enumerate(self.val_concepts)}
        self.finite, self.speed = FiniteWatch(check_finite_every), Throughput()
        self.compile_towers, self.channels_last, self.count_step_flops = compile, channels_last, count_flops
        self._step_flops: Optional[int] = None  # FLOPs of one optimizer step on this device
        self._peak: Optional[float] = None  # the device's peak FLOP/s for the run's precision
        self._skipped_total = 0
        self._grads_checked = False
        self._replay_skipped_total = 0
        # distillation target: the starting weights, copied now, before any checkpoint is restored
        self._teacher = FrozenImageTower(encoder.model.visual) if loss.lambda_distill > 0 else None
        self._val_skipped = 0
        self._val_pairs = 0

    def check_gradients_reached(self) -> None:
        """Raise naming every trainable parameter that the loss gave no gradient (after the first backward)."""
        check_gradients_reached(self.encoder, f"loss {self.loss.variant!r} (family {self.loss.family})")

    def log_trainable(self) -> None:
        """Log the trainable parameter count per tower (start of fit)."""
        counts = self.encoder.trainable_by_tower()
        log.info("trainable parameters: %s (loss family %s)",
                 ", ".join(f"{k} {v:,}" for k, v in counts.items()), self.loss.family)

    def clamp_temperature(self) -> None:
        """After an optimizer step: keep a trained ``logit_scale`` in ``[0, max_logit_scale]``; a frozen one
        (LoRA, or locked) is never touched, so its value stays exactly the model's."""
        if self.encoder.logit_scale.requires_grad:
            with torch.no_grad():
                self.encoder.logit_scale.clamp_(0, self.max_logit_scale)

    def temperature(self, detach: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(s, b)``: the exponentiated logit scale and the logit bias (None without one)."""
        scale, bias = self.encoder.logit_scale.exp(), self.encoder.logit_bias
        if detach:
            return scale.detach(), None if bias is None else bias.detach()
        return scale, bias

    def _flop_temperature(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # the bias detached: torch.autograd.grad under the FLOP counter's module hooks fails on a parameter
        # that enters the graph as a bare leaf outside any module; adding a scalar costs no counted FLOPs
        scale, bias = self.temperature()
        return scale, None if bias is None else bias.detach()

    # ------------------------------------------------------------------ encoding
    def encode(self, batch: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode the requested inputs; images of both twins in one tower call, texts per kind.

        Concept names repeat within a batch: each distinct token row is encoded once and its features
        gathered back, whose backward adds the duplicates' gradients (the gradient of encoding each).
        Replay images and captions share the tower calls of the twin images and captions; the replay
        images' features under the frozen starting model come from its copy.
        """
        feats: dict[str, torch.Tensor] = {}
        for group, fn in ((schema.IMAGE_KEYS + (schema.REPLAY_IMAGE,), self.encoder.encode_image),
                          (schema.CAPTION_KEYS + (schema.REPLAY_TEXT,), self.encoder.encode_text),
                          (schema.CONCEPT_KEYS, lambda t: self.encoder.encode_text(t, dedup=True))):
            wanted = [k for k in group if k in keys]
            if not wanted:
                continue
            inputs = [batch[k] for k in wanted]
            if all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
                out = fn(torch.cat(inputs))  # [sum of the batch sizes, D]
                feats.update(zip(wanted, out.split([len(x) for x in inputs])))
            else:  # e.g. replay captions tokenised to another length: one call each
                feats.update((k, fn(x)) for k, x in zip(wanted, inputs))
        if schema.REPLAY_TEACHER_IMAGE in keys:
            feats[schema.REPLAY_TEACHER_IMAGE] = self._teacher(batch[schema.REPLAY_IMAGE].to(self.device))
        return feats

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.global_rank == 0:
            self.log_trainable()
        if self._teacher is not None:
            self._teacher.to(self.device)
        cuda = self.device.type == "cuda"
        for message in tune_towers(self.encoder.model, cuda, self.channels_last, self.compile_towers):
            rank_zero_warn(message)
        if cuda:
            dtype = flops.compute_dtype(str(self.trainer.precision)) if self._trainer is not None else "fp32"
            self._peak = flops.peak_flops(torch.cuda.get_device_name(self.device), dtype) if dtype else None

    def on_fit_end(self) -> None:
        # safetensors (save_pretrained) stores contiguous tensors only; channels-last was for speed
        self.encoder.model.visual.to(memory_format=torch.contiguous_format)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.speed.batch_start()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.speed.batch_end()

    def _record_finite(self, out: dict[str, torch.Tensor]) -> None:
        self.finite.record(self.global_step, out)  # checked (one sync) every check_finite_every steps

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first unchecked step whose loss is NaN/inf."""
        self.finite.check()

    def _count_flops(self, mb: dict) -> None:
        """FLOPs of one optimizer step on this device, from the first micro-batch (model left untouched)."""
        keys = self.loss.required_keys
        try:
            fwd, fwd_bwd = flops.count_train_flops(
                self.encoder, lambda: self.loss(self.encode(mb, keys), *self._flop_temperature())["loss"])
        except (RuntimeError, AssertionError) as e:
            # torch's FLOP counter cannot take the gradient through a module that receives a parameter as
            # its input (e.g. timm's attention-pool latent); the count is telemetry, training goes on
            self.count_step_flops = False
            rank_zero_warn(f"FLOP count skipped (torch's FLOP counter failed on this model: {e}); "
                           f"train/tflops and train/mfu are not logged")
            return
        # with accumulation every micro-batch is encoded twice: once without gradient, once with
        self._step_flops = fwd_bwd if self.accum_freq == 1 else self.accum_freq * (fwd + fwd_bwd)

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        self._skipped_total += int(batch.get(schema.N_SKIPPED, 0))
        self._replay_skipped_total += int(batch.get(schema.REPLAY_N_SKIPPED, 0))
        if schema.is_skip_report(batch):  # counted above, nothing to train on
            return None
        if self.loss.uses_replay and schema.REPLAY_IMAGE not in batch:
            raise ValueError("loss.lambda_replay or loss.lambda_distill is > 0 but the training batches carry no "
                             "replay data: set data.replay.shards (or set both lambdas to 0)")
        self.speed.window["pairs"] += batch[schema.POS_IMAGE].shape[0]
        self._micro.append(batch)
        if len(self._micro) < self.accum_freq:
            return None
        micro, self._micro = self._micro, []
        if self.count_step_flops and self._step_flops is None:
            self._count_flops(micro[0])
        opt = self.optimizers()
        out = self.backward_over(micro)
        if self.grad_clip_norm:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        if not self._grads_checked:  # the first step: before DDP would fail on the second with its own message
            self.check_gradients_reached()
            self._grads_checked = True
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.clamp_temperature()
        self._log_train(out, opt)
        return out["loss"].detach()

    def backward_over(self, micro: list[dict], backward=None) -> dict[str, torch.Tensor]:
        """Back-propagate the loss over all micro-batches as one batch; returns the loss terms.

        One micro-batch: a plain step. Several: encode all without gradient, then re-encode each with
        gradient inside the cached features, so every micro-batch sees the negatives of all of them
        and the summed gradients equal those of the full batch. The loss is checked for NaN/inf every
        ``check_finite_every`` steps (:meth:`check_finite`).
        """
        backward = backward or self.manual_backward
        keys = self.loss.required_keys
        if len(micro) == 1:
            out = self.loss(self.encode(micro[0], keys), *self.temperature())
            self._record_finite(out)
            backward(out["loss"])
            return out
        with torch.no_grad():
            cache = [self.encode(mb, keys) for mb in micro]
        for j, mb in enumerate(micro):
            fresh = self.encode(mb, keys)
            feats = {k: torch.cat([fresh[k] if i == j else cache[i][k] for i in range(len(micro))])
                     for k in keys}  # [accum * B, D]
            # the temperature and bias get their gradient once, not once per micro-batch
            out = self.loss(feats, *self.temperature(detach=j > 0))
            if j == len(micro) - 1:
                self._record_finite(out)  # the same loss value for every j: record (and check) it once
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
        """Log without waiting for the device: loss terms stay device tensors (Lightning converts them only
        when a logger writes, every ``trainer.log_every_n_steps``); host numbers are logged as CPU tensors
        (a Python float would be copied to the device, and the progress bar would copy it back each step).
        Rates are measured between finite checks, which wait for the device, so they time its work."""
        world = self.trainer.world_size
        self.speed.window["steps"] += 1
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, on_step=True)
        self.log("train/logit_scale", self.encoder.logit_scale.exp().detach(), on_step=True)
        if self.encoder.logit_bias is not None:
            self.log("train/logit_bias", self.encoder.logit_bias.detach().reshape(()), on_step=True)
        self.log("train/lr", _host(opt.param_groups[0]["lr"]), on_step=True)
        skipped = _host(self._skipped_total)
        if world > 1:  # all-reduced on the device; a non-blocking copy does not wait for the device
            skipped = skipped.to(self.device, non_blocking=True)
        self.log("train/skipped_samples", skipped, on_step=True, reduce_fx="sum", sync_dist=world > 1)
        if self.loss.uses_replay:
            replay_skipped = _host(self._replay_skipped_total)
            if world > 1:
                replay_skipped = replay_skipped.to(self.device, non_blocking=True)
            self.log("train/replay_skipped_samples", replay_skipped, on_step=True, reduce_fx="sum",
                     sync_dist=world > 1)
        if self.finite.pending:  # no check this step: the device may still be working, no rates to measure
            return
        self.log("loss", _host(self.finite.last_loss), prog_bar=True, logger=False)
        rates = self.speed.close_window(world, self._step_flops, self._peak)
        for name, value in rates.items():
            self.log(f"train/{name}", _host(value), on_step=True, prog_bar=name == "pairs_per_s")

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def throughput_summary(self) -> dict[str, float]:
        """Run averages of this process (:meth:`cultureclip.step_stats.Throughput.summary`): ``images_per_s``
        (all ranks) and, with a FLOP count, ``step_tflop``, ``tflops`` (per device) and on a known GPU ``mfu``."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.speed.summary(world, self._step_flops, self._peak)

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
        out = self.val_loss_fn(f, *self.temperature())
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
        self.check_finite()  # never save a NaN state over the last good checkpoint
        # lets CultureCLIP.from_pretrained("....ckpt") rebuild the encoder without the run's config
        checkpoint[TRAINING_CKPT_KEY] = self.encoder.checkpoint_metadata(prefix="encoder.")
        checkpoint["rng"] = rng_states()
        # this rank's running skip count (rank 0's is the one saved), so train/skipped_samples goes on counting
        checkpoint["skipped_samples"] = self._skipped_total
        checkpoint["replay_skipped_samples"] = self._replay_skipped_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.finite.pending = []
        if self.global_rank == 0:  # the other ranks' shares were not saved: they restart from 0
            self._skipped_total = int(checkpoint.get("skipped_samples", 0))
            self._replay_skipped_total = int(checkpoint.get("replay_skipped_samples", 0))
        if checkpoint.get("rng") is not None:
            restore_rng_states(checkpoint["rng"])


def _host(x: float) -> torch.Tensor:
    """A CPU scalar tensor for ``self.log``: Lightning keeps its device, so neither logging it nor the
    progress bar's reading of it waits for the accelerator."""
    return torch.tensor(float(x), dtype=torch.float32)

