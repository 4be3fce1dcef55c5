"""The twin hard-negative contrastive loss of CultureCLIP, all nine ablation variants in one module.

Notation (docs/method.md): features are L2-normalised ``[B, D]`` tensors, ``s`` is the exponentiated logit
scale, ``CE`` is the mean cross-entropy against the diagonal.

    clip(I, T)       = ( CE(s I Tᵀ) + CE(s T Iᵀ) ) / 2
    negclip(I, T, H) = ( CE(s I [T; H]ᵀ) + CE(s T Iᵀ) ) / 2       # H: the twins' texts, extra negatives
    caption_neg      = negclip(I⁺, C⁺, C⁻) + negclip(I⁻, C⁻, C⁺)     # both twins act as anchors
    concept_neg      = negclip(I⁺, K⁺, K⁻) + negclip(I⁻, K⁻, K⁺)

A variant is a weighting of at most one caption term and one concept term (``VARIANTS``), not a
function of its own; the reference code had one function per ablation and silently fell back to
another loss (and finally to zero) on any error. Here a bad input raises.

General-data replay (:mod:`cultureclip.data.replay`) adds two optional terms on the replay batch
(``R`` image-text samples, batch size independent of the twins')::

    loss_replay  = clip(I_r, T_r)                 # plain symmetric InfoNCE, open_clip's ClipLoss
    loss_distill = mean_i || f(I_r)_i - f0(I_r)_i ||²   # f0: the frozen starting model's image tower
    loss = twin loss + lambda_replay * loss_replay + lambda_distill * loss_distill

Both features of ``loss_distill`` are L2-normalised, so it equals ``2 * mean(1 - cos)``: the L2 and
the cosine forms are one term up to that factor.

Sigmoid family (``family="sigmoid"``, SigLIP-style models with a learned bias ``b``): every image-text
score is an independent binary decision, ``σ(y (s I·T + b))`` with ``y = +1`` for the image's own text
and ``-1`` for every other text in the (gathered) batch; ``LS`` sums ``-log σ`` over the texts and
averages over the images (open_clip's ``SigLipLoss``)::

    sigclip(I, T)       = LS(I, T, Y)                          # Y = 2·eye − 1
    signegclip(I, T, H) = LS(I, [T; H], [Y, −1])                # the twins' texts: explicit −1 labels
    caption_neg         = signegclip(I⁺, C⁺, C⁻) + signegclip(I⁻, C⁻, C⁺)

and the variants weight these terms as in the softmax family; the replay term is ``sigclip`` too.
A sigmoid term has no text-to-image direction (the sigmoid loss is one sum over all pairs), so only
the texts are gathered across ranks.

Multi-GPU (both families): the features are gathered across ranks with gradient (``torch.distributed.nn.all_gather``),
and each rank scores its local rows against the global columns (open_clip's ``local_loss=True,
gather_with_grad=True``). The mean of the per-rank losses equals the single-process loss on the
global batch, and after DDP's gradient averaging so does the gradient.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cultureclip import schema

# variant -> (caption term, concept term); a term is "clip", "neg" (negclip on both twins) or None
VARIANTS: dict[str, tuple[Optional[str], Optional[str]]] = {
    "clip": ("clip", None),
    "caption_clip": ("clip", None),
    "concept_clip": (None, "clip"),
    "caption_negclip": ("neg", None),
    "concept_negclip": (None, "neg"),
    "caption_concept_clip": ("clip", "clip"),
    "caption_neg_concept_clip": ("neg", "clip"),
    "caption_concept_neg": ("clip", "neg"),
    "cultureclip": ("neg", "neg"),
}
FAMILIES = ("softmax", "sigmoid")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate each ``[B, D]`` feature over all ranks into ``[world*B, D]``, keeping gradients.

    Reads rank and world size from ``torch.distributed`` at call time, so the loss can be built
    before the process group exists. Without an initialised group it returns the inputs.
    ``torch.distributed.nn.all_gather`` is autograd-aware: its backward sums the gradient that every
    rank computed for a slice back onto the rank that owns it, so no rank loses the gradient of its
    own features to other ranks' logits.
    """
    _, world = _dist_info()
    if world == 1:
        return dict(features)
    from torch.distributed.nn.functional import all_gather  # imported late: not needed single-process
    return {k: torch.cat(all_gather(v.contiguous()), dim=0) for k, v in features.items()}


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def _sigmoid_terms(logits: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum -log σ(y · logits) / rows`` for logits ``[b, N]``; ``y`` is +1 at ``(i, labels[i])``, else -1.

    ``labels=None``: every entry is a negative (the twins' texts)."""
    signs = -torch.ones_like(logits)
    if labels is not None:
        signs[torch.arange(logits.shape[0], device=logits.device), labels] = 1.0
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


class CultureCLIPLoss(nn.Module):
    """CLIP / NegCLIP loss with twin hard negatives on captions and concept names, softmax or sigmoid.

    Args:
        variant: one of ``VARIANTS`` (the paper's ablation grid).
        lambda_caption: weight of the caption term of a two-term variant (default 0.7).
        lambda_concept: weight of the concept term of a two-term variant (default 0.3).
        gather: gather features across ranks when ``torch.distributed`` is initialised.
        lambda_replay: weight of the CLIP loss on the replay batch (0: off).
        lambda_distill: weight of the feature-distillation term on the replay images (0: off).
        family: ``"softmax"`` (CLIP/NegCLIP cross-entropy), ``"sigmoid"`` (SigLIP's pairwise sigmoid with
            the learned bias) or None: decided by the model, sigmoid when it has a ``logit_bias``
            (:meth:`resolve_family`, or per call from whether ``forward`` gets a bias).

    Single-term variants use weight 1 and refuse a ``lambda_*`` (it would be silently ignored).
    ``forward`` returns ``{"loss": total, "<term>_loss": ...}``
    where the named terms are unweighted (so they stay comparable across weightings) and ``loss`` is
    their weighted sum. With replay terms, ``loss_replay`` and ``loss_distill`` are returned too.
    """

    def __init__(self, variant: str = "cultureclip", lambda_caption: Optional[float] = None,
                 lambda_concept: Optional[float] = None, gather: bool = True, lambda_replay: float = 0.0,
                 lambda_distill: float = 0.0, family: Optional[str] = None):
        super().__init__()
        for name, value in (("lambda_replay", lambda_replay), ("lambda_distill", lambda_distill)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        if family is not None and family not in FAMILIES:
            raise ValueError(f"loss.family must be one of {FAMILIES} or null (from the model), got {family!r}")
        self.family = family
        self.lambda_replay, self.lambda_distill = float(lambda_replay), float(lambda_distill)
        if variant not in VARIANTS:
            raise ValueError(f"unknown loss variant {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self.gather = gather
        caption, concept = VARIANTS[variant]
        both = caption is not None and concept is not None
        if not both and (lambda_caption is not None or lambda_concept is not None):
            raise ValueError(f"loss variant {variant!r} has a single term and takes no lambda_caption/"
                             f"lambda_concept (got {lambda_caption}, {lambda_concept}); pick it with loss={variant}")
        lambda_caption = 0.7 if lambda_caption is None else lambda_caption
        lambda_concept = 0.3 if lambda_concept is None else lambda_concept
        # (kind, which texts, weight)
        self.terms: list[tuple[str, str, float]] = []
        if caption is not None:
            self.terms.append((caption, "caption", float(lambda_caption) if both else 1.0))
        if concept is not None:
            self.terms.append((concept, "concept", float(lambda_concept) if both else 1.0))

    def resolve_family(self, has_logit_bias: bool) -> str:
        """Fix ``family`` for a model (sigmoid when it has a ``logit_bias``, unless set); returns it."""
        if self.family is None:
            self.family = "sigmoid" if has_logit_bias else "softmax"
        return self.family

    @property
    def required_keys(self) -> tuple[str, ...]:
        """Feature keys this variant reads; a trainer can skip encoding the others."""
        keys = [schema.POS_IMAGE]
        for kind, texts, _ in self.terms:
            pos, neg = (schema.POS_CAPTION, schema.NEG_CAPTION) if texts == "caption" else \
                (schema.POS_CONCEPT, schema.NEG_CONCEPT)
            keys.append(pos)
            if kind == "neg":
                keys += [schema.NEG_IMAGE, neg]
        return tuple(dict.fromkeys(keys + list(self.replay_keys)))

    @property
    def replay_keys(self) -> tuple[str, ...]:
        """Replay feature keys the active replay terms read (empty without replay)."""
        keys = []
        if self.lambda_replay > 0:
            keys += [schema.REPLAY_IMAGE, schema.REPLAY_TEXT]
        if self.lambda_distill > 0:
            keys += [schema.REPLAY_IMAGE, schema.REPLAY_TEACHER_IMAGE]
        return tuple(dict.fromkeys(keys))

    @property
    def uses_replay(self) -> bool:
        """Whether a replay term is on (the batches must then carry a replay batch)."""
        return bool(self.replay_keys)

    def twin_only(self) -> "CultureCLIPLoss":
        """A copy without the replay terms (validation batches hold twins only)."""
        loss = copy.copy(self)
        loss.lambda_replay = loss.lambda_distill = 0.0
        return loss

    def _check(self, features: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
               logit_bias: Optional[torch.Tensor]) -> None:
        missing = [k for k in self.required_keys if k not in features]
        if missing:
            raise KeyError(f"CultureCLIPLoss(variant={self.variant!r}) needs features {missing}; "
                           f"got {sorted(features)}")
        replay = self.replay_keys
        for kind, group in (("twin", [k for k in self.required_keys if k not in replay]), ("replay", replay)):
            shapes = {k: tuple(features[k].shape) for k in group}
            first = next(iter(shapes.values()), None)
            if first is not None and (len(first) != 2 or any(s != first for s in shapes.values())):
                raise ValueError(f"all {kind} features must share one [B, D] shape, got {shapes}")
        for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
            if value is not None and torch.as_tensor(value).numel() != 1:
                raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")

    @staticmethod
    def _clip(img, txt, all_img, all_txt, scale, bias, labels):
        """Local rows ``[b, D]`` against global columns ``[N, D]``; labels point at this rank's slice.

        ``bias`` None: softmax family; else sigmoid (a sigmoid loss without a learned bias gets 0)."""
        if bias is not None:
            return _sigmoid_terms(_logits(img, all_txt, scale, bias), labels)
        return (_ce(scale * img @ all_txt.T, labels) + _ce(scale * txt @ all_img.T, labels)) / 2

    @staticmethod
    def _negclip(img, txt, all_img, all_txt, all_hard, scale, bias, labels):
        if bias is not None:  # own text +1, other texts -1, every twin text an explicit -1
            return _sigmoid_terms(_logits(img, all_txt, scale, bias), labels) \
                + _sigmoid_terms(_logits(img, all_hard, scale, bias), None)
        # image -> [T; H]: [b, 2N] logits, the twins' texts are the extra negatives
        i2t = scale * img @ torch.cat([all_txt, all_hard], dim=0).T
        t2i = scale * txt @ all_img.T  # text -> image as in CLIP: twin images are not negatives
        return (_ce(i2t, labels) + _ce(t2i, labels)) / 2

    def _global(self, local: Mapping[str, torch.Tensor], image_keys: tuple[str, ...], sigmoid: bool):
        """``(features over all ranks, labels [b])``; the sigmoid family never needs other ranks' images."""
        rank, world = _dist_info() if self.gather else (0, 1)
        glob = dict(local)
        if world > 1:
            wanted = {k: v for k, v in local.items() if not sigmoid or k not in image_keys}
            glob.update(gather_features(wanted))
        b = next(iter(local.values())).shape[0]
        labels = torch.arange(b, device=next(iter(local.values())).device) + rank * b
        return glob, labels

    def forward(self, features: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            features: L2-normalised ``[B, D]`` tensors under ``schema.FEATURE_KEYS`` (only the keys
                of ``required_keys`` are read).
            logit_scale: the already-exponentiated scale ``s`` (a scalar tensor).
            logit_bias: the model's learned bias ``b`` (a scalar tensor) or None. The sigmoid family
                adds it to every logit; the softmax family ignores it (a constant added to every logit
                of a row leaves a softmax unchanged).

        Returns:
            ``{"loss": weighted total, "<caption|concept>_<clip|negclip>_loss": unweighted term}``.
        """
        self._check(features, logit_scale, logit_bias)
        # family None (not fixed by the trainer): decided by the model this call scores
        sigmoid = self.family == "sigmoid" or (self.family is None and logit_bias is not None)
        # the terms read "bias is not None" as "sigmoid"; a sigmoid loss on a model without bias uses 0
        bias = (torch.zeros((), device=torch.as_tensor(logit_scale).device) if logit_bias is None else logit_bias) if sigmoid else None
        local = {k: features[k] for k in self.required_keys if k not in self.replay_keys}
        glob, labels = self._global(local, schema.IMAGE_KEYS, sigmoid)

        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for kind, texts, weight in self.terms:
            pos_t, neg_t = (schema.POS_CAPTION, schema.NEG_CAPTION) if texts == "caption" else \
                (schema.POS_CONCEPT, schema.NEG_CONCEPT)
            if kind == "clip":
                term = self._clip(local[schema.POS_IMAGE], local[pos_t], glob[schema.POS_IMAGE],
                                  glob[pos_t], logit_scale, bias, labels)
                name = f"{texts}_clip_loss"
            else:
                pos, neg = schema.POS_IMAGE, schema.NEG_IMAGE
                term = self._negclip(local[pos], local[pos_t], glob[pos], glob[pos_t], glob[neg_t],
                                     logit_scale, bias, labels) \
                    + self._negclip(local[neg], local[neg_t], glob[neg], glob[neg_t], glob[pos_t],
                                    logit_scale, bias, labels)
                name = f"{texts}_negclip_loss"
            out[name] = term
            total = total + weight * term
        if self.uses_replay:
            for name, term, weight in self._replay_terms(features, logit_scale, bias):
                out[name] = term
                total = total + weight * term
        out["loss"] = total
        return out

    def _replay_terms(self, features: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                      bias: Optional[torch.Tensor]):
        """``(name, unweighted term, weight)`` of the replay CLIP loss and the distillation term."""
        terms = []
        if self.lambda_replay > 0:
            local = {k: features[k] for k in (schema.REPLAY_IMAGE, schema.REPLAY_TEXT)}
            glob, labels = self._global(local, (schema.REPLAY_IMAGE,), bias is not None)
            term = self._clip(local[schema.REPLAY_IMAGE], local[schema.REPLAY_TEXT], glob[schema.REPLAY_IMAGE],
                              glob[schema.REPLAY_TEXT], logit_scale, bias, labels)
            terms.append(("loss_replay", term, self.lambda_replay))
        if self.lambda_distill > 0:
            student = features[schema.REPLAY_IMAGE]
            teacher = features[schema.REPLAY_TEACHER_IMAGE].detach().to(student.dtype)  # [R, D], a constant
            term = (student - teacher).pow(2).sum(dim=1).mean()
            terms.append(("loss_distill", term, self.lambda_distill))
        return terms


def _logits(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    logits = scale * img @ txt.T  # [b, N]
    return logits if bias is None else logits + bias


class FrozenImageTower:
    """The starting model's image tower, frozen: the target of the feature-distillation term.

    A plain object, not an ``nn.Module`` attribute of the training module, so the copy is in no
    optimizer, no ``state_dict`` and no checkpoint (checkpoints keep their size). It is copied when
    the training module is built, before a checkpoint is restored, so a resumed run distils towards
    the same starting weights. Calling it returns L2-normalised features ``[N, D]`` without gradient.

    Args:
        visual: the image tower to copy (``CultureCLIP.model.visual``; LoRA adapters, if any, are
            copied as they are and frozen with the rest).
    """

    def __init__(self, visual: nn.Module) -> None:
        self.visual = copy.deepcopy(visual).eval()
        self.visual.requires_grad_(False)

    def to(self, device) -> "FrozenImageTower":
        self.visual.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)
