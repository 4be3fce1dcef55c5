"""The twin metrics, one definition for validation during training and for offline evaluation.

Every image of a twin pair is a query, the positive image and its twin alike. It is labelled with its
own concept; its *twin concept* is the other concept of its pair. Per image (all features L2-normalised):

- ``twin_acc``: the image scores its own concept name strictly above its twin's (a tie is wrong);
- ``img2concept_recall@1``: the top-1 concept over the whole vocabulary is its own;
- ``twin_confusion_rate``: the top-1 concept over the whole vocabulary is exactly its twin.

A split's metric is the mean over its images. Training logs them as ``val/<name>``;
``cultureclip.eval.twins`` reports them (plus recall@k, caption metrics and per-group breakdowns) under
the same names. Pure torch: no Lightning, no FAISS.
"""
from __future__ import annotations

from typing import Optional

import torch

TWIN_ACC = "twin_acc"
CONCEPT_TOP1 = "img2concept_recall@1"
TWIN_CONFUSION = "twin_confusion_rate"


def twin_margin(image_feats: torch.Tensor, own_feats: torch.Tensor, twin_feats: torch.Tensor) -> torch.Tensor:
    """Own-minus-twin score per image, float [N].

    Args:
        image_feats: [N, D] image features.
        own_feats: [N, D] features of each image's own text (concept name or caption).
        twin_feats: [N, D] features of each image's twin text.
    """
    return (image_feats * own_feats).sum(-1) - (image_feats * twin_feats).sum(-1)


def twin_outcomes(image_feats: torch.Tensor, concept_feats: torch.Tensor, image_concept: torch.Tensor,
                  twin_concept: torch.Tensor, top1: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-image outcomes of the twin metrics (their means are the split's metrics).

    Args:
        image_feats: [N, D] image features.
        concept_feats: [C, D] features of the concept vocabulary.
        image_concept: int64 [N], vocabulary index of each image's concept.
        twin_concept: int64 [N], vocabulary index of each image's twin concept.
        top1: int64 [N], each image's top-1 concept if already searched (e.g. by a FAISS index);
            None: found here by a dense ``image_feats @ concept_feats.T``.

    Returns:
        ``{TWIN_ACC, CONCEPT_TOP1, TWIN_CONFUSION}``, each float [N] of 0/1.
    """
    concept_feats = concept_feats.to(image_feats.dtype)
    image_concept, twin_concept = image_concept.to(image_feats.device), twin_concept.to(image_feats.device)
    margin = twin_margin(image_feats, concept_feats[image_concept], concept_feats[twin_concept])
    if top1 is None:
        top1 = (image_feats @ concept_feats.T).argmax(dim=-1)  # [N, C] -> [N]
    top1 = top1.to(image_feats.device)
    return {TWIN_ACC: (margin > 0).float(), CONCEPT_TOP1: (top1 == image_concept).float(),
            TWIN_CONFUSION: (top1 == twin_concept).float()}
