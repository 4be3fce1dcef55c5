"""Batched, no-grad embedding of images and texts with a ``CultureCLIP`` model.

Shared by every evaluation task so that batching, autocast and device handling live in one place.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch

from cultureclip.model import CultureCLIP
from cultureclip.progress import Progress
from cultureclip.text_length import pooled_positions, trim_plan, unique_texts

SORT_CHUNK = 65536  # texts tokenised and length-sorted together by embed_texts


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked (and supported); a no-op context otherwise."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_texts(model: CultureCLIP, texts: Sequence[str], batch_size: int = 256, amp: bool = True,
                context_length: Optional[int] = None, progress: Optional[str] = None) -> torch.Tensor:
    """L2-normalised features ``[N, D]`` (float32, on CPU) for a list of strings, in order.

    Each distinct string is encoded once. Where the text tower allows exact length trimming
    (:mod:`cultureclip.text_length`), the texts are batched shortest first, so that each batch is
    trimmed to a length close to that of all its texts rather than to the longest text of a random mix.
    ``progress``: a description to show progress under (:mod:`cultureclip.progress`); None shows none.
    """
    model.eval()
    unique, inverse = unique_texts(list(texts))
    if not unique:
        return _concat(model, [])
    plan = trim_plan(model.model) if model.trim_text else None
    feats = torch.empty(len(unique), int(model.model_cfg["embed_dim"]))  # [U, D]
    bar = Progress(progress or "", total=len(unique), unit="texts", summary=False, mode=None if progress else "off")
    for start in range(0, len(unique), SORT_CHUNK):  # bounded token memory for millions of captions
        tokens = model.tokenize(unique[start:start + SORT_CHUNK], context_length=context_length)  # [u, L]
        # stable sort: equal lengths keep their order, so the batches do not depend on the sort's ties
        order = torch.argsort(pooled_positions(tokens, *plan), stable=True) if plan else torch.arange(len(tokens))
        for i in range(0, len(tokens), batch_size):
            idx = order[i:i + batch_size]
            with autocast(model.device, amp):
                feats[start + idx] = model.encode_text(tokens[idx]).float().cpu()  # back from length order
            bar.update(len(idx))
    bar.close()
    return feats[inverse]  # [N, D]


@torch.no_grad()
def embed_image_batches(model: CultureCLIP, batches: Iterable[torch.Tensor], amp: bool = True) -> torch.Tensor:
    """L2-normalised features ``[N, D]`` (float32, on CPU) for an iterable of pixel batches ``[b, 3, H, W]``."""
    model.eval()
    out = []
    for pixels in batches:
        with autocast(model.device, amp):
            out.append(model.encode_image(pixels.to(model.device, non_blocking=True)).float().cpu())
    return _concat(model, out)


def _concat(model: CultureCLIP, chunks: list) -> torch.Tensor:
    """``[N, D]`` from feature chunks; ``[0, D]`` when there were none (an empty split)."""
    if not chunks:
        return torch.empty(0, int(model.model_cfg["embed_dim"]))
    return torch.cat(chunks)


@torch.no_grad()
def zero_shot_classifier(model: CultureCLIP, classnames: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256, amp: bool = True) -> torch.Tensor:
    """CLIP's zero-shot weights ``[C, D]``: the normalised mean of each class's template embeddings.

    Templates use ``{c}`` for the class name (CLIP_benchmark's file format) or are callables. All
    class x template texts go through :func:`embed_texts` at once: identical prompts (a template
    without ``{c}``, a class name given twice) are encoded once, and batches are length-sorted.
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    texts = [t(c) if callable(t) else t.format(c=c) for c in classnames for t in templates]
    feats = embed_texts(model, texts, batch_size=batch_size, amp=amp)  # [C*T, D]
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return torch.nn.functional.normalize(feats, dim=-1)
