"""What trains, per model family, before and right after the first training step (no Lightning here).

- :func:`prepare_for_loss`: fixes the loss family from the model (sigmoid when it has a ``logit_bias``),
  freezes what the twin loss never reaches (CoCa's captioning decoder; a ``logit_bias`` under the softmax
  family, where it cancels), each with a log line, and returns the cap for a trained ``logit_scale``:
  the larger of ln 100 (CLIP's cap) and the model's own starting value (SigLIP starts near 4.72).
- :func:`unreached_parameters` / :func:`check_gradients_reached`: the trainable parameters that got no
  gradient, named in an error after the first backward (DDP would fail one step later naming none).
"""
from __future__ import annotations

import logging
import math

from torch import nn

from cultureclip.errors import ConfigError

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so that s <= 100
log = logging.getLogger("cultureclip")


def prepare_for_loss(encoder, loss) -> float:
    """Resolve ``loss.family`` for ``encoder`` (a ``CultureCLIP``), freeze the parameters the loss cannot
    train, and return the upper clamp of a trained ``logit_scale``."""
    decoder = getattr(encoder.model, "text_decoder", None)  # CoCa's captioning decoder
    if decoder is not None and any(p.requires_grad for p in decoder.parameters()):
        decoder.requires_grad_(False)
        log.info("CoCa: the text decoder is frozen (the twin loss is contrastive and never runs it)")
    family = loss.resolve_family(encoder.logit_bias is not None)
    bias = encoder.logit_bias
    if family == "softmax" and bias is not None and bias.requires_grad:
        bias.requires_grad_(False)
        log.info("loss.family=softmax: the model's logit_bias cancels in a softmax and is frozen")
    return max(MAX_LOGIT_SCALE, float(encoder.logit_scale.detach()))


def unreached_parameters(module: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``module`` whose ``.grad`` is None (call after a backward)."""
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


def check_gradients_reached(module: nn.Module, what: str) -> None:
    """Raise :class:`~cultureclip.errors.ConfigError` (the entry points print it as one line) naming every
    trainable parameter of ``module`` without a gradient; ``what`` names the loss."""
    missing = unreached_parameters(module)
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ConfigError(f"{len(missing)} trainable parameters got no gradient from {what}: {shown}. Freeze them "
                           f"(requires_grad_(False)) or pick a loss/config that uses them.")
