"""Bookkeeping of the training step that must not stall an accelerator: a lazy NaN/inf check of the
loss and throughput windows. Plain torch; :class:`cultureclip.lit_module.CultureCLIPModule` uses both.

Reading a CUDA tensor on the host (``bool(t)``, ``float(t)``, ``t.item()``) waits for every kernel
queued before it. Checking the loss that way after every step keeps the GPU idle while the host
prepares the next one; here the losses of ``every`` steps are read at once, and the throughput is
measured between those reads, where host and device time agree.
"""
from __future__ import annotations

import time
from typing import Optional

import torch


class FiniteWatch:
    """Keeps each step's detached loss terms on the device and checks them every ``every`` steps.

    Args:
        every: optimizer steps between checks (1: every step, as an eager check).
    """

    def __init__(self, every: int = 1):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"check_finite_every must be an int >= 1, got {every!r}")
        self.every = every
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, loss terms) not yet checked
        self.last_loss = float("nan")  # the loss of the last checked step, on the host

    def record(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Keep ``terms`` (no sync); check once ``every`` steps are pending."""
        self.pending.append((step, {k: v.detach() for k, v in terms.items()}))
        if step - self.pending[0][0] + 1 >= self.every:
            self.check()

    def check(self) -> None:
        """Raise ``FloatingPointError`` naming the first pending step whose loss is NaN/inf, its loss terms
        and the steps this check covered; one device-to-host copy for all of them."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        losses = torch.stack([terms["loss"].float() for _, terms in pending]).cpu()  # [P]: the one sync
        self.last_loss = float(losses[-1])
        bad = (~torch.isfinite(losses)).nonzero().flatten()
        if bad.numel():
            step, terms = pending[int(bad[0])]
            values = {k: float(v.float().cpu()) for k, v in terms.items()}
            raise FloatingPointError(
                f"non-finite loss at global step {step} (checked every {self.every} steps; this check covered "
                f"steps {pending[0][0]}..{pending[-1][0]}): {values}")


class Throughput:
    """Pairs, steps and data-wait time per window (between two host syncs), and run totals."""

    def __init__(self):
        self.window = {"start": None, "batch_end": None, "wait": 0.0, "pairs": 0, "steps": 0}
        self.totals = {"seconds": 0.0, "images": 0, "steps": 0}

    def batch_start(self) -> None:
        now, w = time.perf_counter(), self.window
        if w["start"] is None:
            w["start"] = now
        elif w["batch_end"] is not None:
            w["wait"] += now - w["batch_end"]  # time spent waiting for this batch

    def batch_end(self) -> None:
        self.window["batch_end"] = time.perf_counter()

    def close_window(self, world: int, step_flops: Optional[int], peak: Optional[float]) -> dict[str, float]:
        """End the window (call right after a host sync): its rates, added to the totals.

        Returns ``pairs_per_s``, ``images_per_s`` (all ``world`` ranks, two images per pair),
        ``data_wait_frac`` and, with ``step_flops`` (one optimizer step on this device), ``tflops``
        and, with a known ``peak`` FLOP/s, ``mfu``.
        """
        now, w = time.perf_counter(), self.window
        dt = max(now - (w["start"] if w["start"] is not None else now), 1e-9)
        out = {"pairs_per_s": w["pairs"] * world / dt, "images_per_s": 2 * w["pairs"] * world / dt,
               "data_wait_frac": w["wait"] / dt}
        if step_flops:
            rate = step_flops * w["steps"] / dt  # this device's FLOP/s
            out["tflops"] = rate / 1e12
            if peak:
                out["mfu"] = rate / peak
        t = self.totals
        t["seconds"], t["images"], t["steps"] = t["seconds"] + dt, t["images"] + 2 * w["pairs"], t["steps"] + w["steps"]
        self.window = {"start": now, "batch_end": None, "wait": 0.0, "pairs": 0, "steps": 0}
        return out

    def summary(self, world: int, step_flops: Optional[int], peak: Optional[float]) -> dict[str, float]:
        """Run averages over the closed windows (see :meth:`close_window`); empty before the first."""
        t = self.totals
        if t["seconds"] <= 0:
            return {}
        out = {"images_per_s": t["images"] * world / t["seconds"], "steps_timed": float(t["steps"])}
        if step_flops:
            rate = step_flops * t["steps"] / t["seconds"]
            out.update(step_tflop=step_flops / 1e12, tflops=rate / 1e12)
            if peak:
                out["mfu"] = rate / peak
        return out


def tune_towers(model: torch.nn.Module, cuda: bool, channels_last, compile: bool) -> list[str]:
    """GPU speed settings of an open_clip model's towers, in place; returns warnings for the caller.

    Args:
        model: the open_clip model (``CultureCLIP.model``).
        cuda: whether it trains on a CUDA device.
        channels_last: True, False or ``"auto"`` (CUDA and a convolutional image tower).
        compile: ``torch.compile`` each tower in place (parameter names, so checkpoints, unchanged); CUDA only.
    """
    visual = model.visual
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    # a ViT's only convolution is its patch embedding: channels-last buys nothing there
    if channels_last is True or (channels_last == "auto" and cuda and convs > 1):
        visual.to(memory_format=torch.channels_last)
    if not compile:
        return []
    if not cuda:
        return ["compile=true is ignored on cpu (no CUDA device): torch.compile of the towers is for GPUs "
                "(on a CPU it adds minutes of compilation for little gain)"]
    text = getattr(model, "text", None) or getattr(model, "transformer", None)  # CustomTextCLIP / CLIP
    for tower in (visual, text):
        if tower is not None:
            tower.compile()
    return []
