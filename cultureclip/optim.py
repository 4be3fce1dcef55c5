"""Optimizer parameter groups and learning-rate schedules (plain torch; the Lightning module uses them).

Following CLIP practice (open_clip_train/main.py, nanoGPT's ``configure_optimizers``): gains, biases,
the logit scale and embeddings get no weight decay; matrices do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

# parameters named like these are never decayed, whatever their shape
_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding",
                   "token_embedding", "cls_emb")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the *trainable* parameters into a decayed group (matrices) and a no-decay group.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``,
        empty groups left out. Raises if nothing is trainable (a frozen model would silently not train).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES) or "bn" in name.split(".")[-2:-1] \
                or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check lora / lock settings")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
          impl: str = "auto") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its implementation chosen for where the parameters live.

    Args:
        params: parameters or parameter groups (:func:`param_groups`).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (groups may set their own weight decay).
        impl: ``"auto"``: ``fused`` (one CUDA kernel for all parameters) when every parameter is a
            floating-point CUDA tensor, else ``foreach`` (a few multi-tensor ops instead of a Python loop
            over parameters); or ``"fused"``, ``"foreach"``, ``"for_loop"`` explicitly. All compute the
            same update up to float rounding; a checkpoint of one resumes with another.
    """
    if impl not in ("auto", "fused", "foreach", "for_loop"):
        raise ValueError(f"impl must be 'auto', 'fused', 'foreach' or 'for_loop', got {impl!r}")
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if impl == "auto":
        on_cuda = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
        impl = "fused" if on_cuda else "foreach"
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=impl == "fused", foreach=impl == "foreach")


class _Schedule:
    """The lr factor; a class, not a closure, so LambdaLR's state_dict can keep it."""

    def __init__(self, decay: str, warmup_steps: int, total_steps: int, min_ratio: float):
        self.decay, self.warmup_steps, self.total_steps, self.min_ratio = decay, warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        # 1) linear warmup from 1/warmup to 1
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        # 2) after the schedule ends, stay at the floor
        if step >= self.total_steps:
            return self.min_ratio
        # 3) in between, decay linearly or along a cosine to min_ratio
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100,
                    decay: str = "linear", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_steps`` optimizer steps, then ``decay`` ("linear" or "cosine") to
    ``min_ratio * lr`` at ``total_steps``. Step it once per optimizer step."""
    if decay not in ("linear", "cosine"):
        raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(decay, warmup_steps, total_steps, min_ratio))


def schedule_length(max_steps: int, max_epochs: Optional[int], batches_per_epoch: int, accum_freq: int = 1) -> int:
    """Optimizer steps of a whole run, what ``warmup_schedule`` needs as ``total_steps``.

    Args:
        max_steps: the trainer's step limit; used when > 0.
        max_epochs: else the epochs of the run.
        batches_per_epoch: micro-batches per device per epoch.
        accum_freq: micro-batches per optimizer step.
    """
    if max_steps and max_steps > 0:
        return int(max_steps)
    if max_epochs is None or max_epochs < 1:
        raise ValueError("cannot size the lr schedule: set trainer.max_steps or trainer.max_epochs")
    return max(1, max_epochs * int(batches_per_epoch) // accum_freq)
