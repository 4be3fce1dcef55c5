"""Exact length trimming of token batches for causal text towers with end-of-text pooling; text dedup.

A CLIP text tower pads every text to its context length (77 tokens), but captions are ~10-25 tokens
and concept names 2-8. When the tower has a causal attention mask and pools the end-of-text token
(open_clip's ``argmax``/``eos`` pooling), the pooled feature of a text depends only on the tokens up
to and including that EOT token: no position attends to a later one, and the positional embedding
of a position does not depend on the sequence length. So a batch can be cut after its longest
sequence (the largest pooled position + 1) and encoded with the token and positional embeddings and
the causal mask sliced to that length; the features are the same up to float rounding (different
matrix shapes sum in another order), and the text tower's cost falls with the length.

Where that argument does not hold, the full context is kept (:func:`trim_plan` returns None):

- no causal mask (``no_causal_mask``): every token attends to the padding;
- ``last`` / ``first`` / ``none`` pooling: ``last`` reads the final padding position, ``none``
  returns all positions; ``first`` under a causal mask would be exact but no released tower uses it;
- an appended class token (CoCa's ``embed_cls``) or a padding mask (``use_pad_mask``);
- Hugging Face text towers and any other module this file does not know.

The decision is read from the built modules (the mask buffer, the pool type), not from a name.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import open_clip
import torch
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

EXACT_POOL_TYPES = ("argmax", "eos")


def _text_parts(model: nn.Module) -> Optional[dict]:
    """The modules of a plain open_clip text transformer, from a ``CLIP`` or ``CustomTextCLIP``; else None."""
    if type(model) is open_clip.CLIP:  # the text tower's modules live on the model itself
        return {"token_embedding": model.token_embedding, "positional_embedding": model.positional_embedding,
                "transformer": model.transformer, "ln_final": model.ln_final, "proj": model.text_projection,
                "attn_mask": model.attn_mask, "pool_type": model.text_pool_type,
                "eos_id": getattr(model, "text_eos_id", None), "extra": False}
    text = getattr(model, "text", None)
    if type(model) is open_clip.CustomTextCLIP and type(text) is TextTransformer:
        return {"token_embedding": text.token_embedding, "positional_embedding": text.positional_embedding,
                "transformer": text.transformer, "ln_final": text.ln_final, "proj": text.text_projection,
                "attn_mask": text.attn_mask, "pool_type": text.pool_type, "eos_id": text.eos_id,
                "extra": text.cls_emb is not None or getattr(text, "use_pad_mask", False) or text.output_tokens}
    return None  # HF towers, CoCa, anything else: encode as the model does


def trim_plan(model: nn.Module) -> Optional[tuple[str, Optional[int]]]:
    """``(pool_type, eos_id)`` when trimming the token batch is exact for ``model``, else None."""
    parts = _text_parts(model)
    if parts is None or parts["extra"] or parts["attn_mask"] is None or parts["pool_type"] not in EXACT_POOL_TYPES:
        return None
    return parts["pool_type"], parts["eos_id"]


def pooled_positions(tokens: torch.Tensor, pool_type: str, eos_id: Optional[int]) -> torch.Tensor:
    """The position ``text_global_pool`` reads per row ``[N]`` (first maximum id / first ``eos_id``)."""
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == eos_id).int().argmax(dim=-1)  # no EOS in a row -> 0, as open_clip does


def trimmed_length(tokens: torch.Tensor, pool_type: str, eos_id: Optional[int], multiple: int = 1) -> int:
    """Largest pooled position + 1, rounded up to ``multiple``, at most the batch's length.

    A host read of one scalar: the length decides tensor shapes.
    """
    length = int(pooled_positions(tokens, pool_type, eos_id).max()) + 1 if tokens.numel() else 1
    if multiple > 1:
        length = -(-length // multiple) * multiple
    return min(length, tokens.shape[1])


def unique_texts(texts: Union[str, Sequence[str], torch.Tensor]) -> tuple[Union[list, torch.Tensor], torch.Tensor]:
    """``(unique, inverse)`` with ``unique[inverse] == texts``: distinct strings in first-seen order, or
    distinct token rows ``[U, L]`` (sorted, ``torch.unique``); ``inverse`` is int64 ``[N]``."""
    if isinstance(texts, torch.Tensor):
        return torch.unique(texts, dim=0, return_inverse=True)
    texts = [texts] if isinstance(texts, str) else list(texts)
    first: dict[str, int] = {}
    inverse = [first.setdefault(t, len(first)) for t in texts]
    return list(first), torch.tensor(inverse, dtype=torch.long)


def encode_prefix(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features ``[N, D]`` of token ids ``[N, L]`` with ``L`` <= the context length.

    The embeddings and causal mask are sliced to ``L``; only valid where :func:`trim_plan` is set.
    """
    p = _text_parts(model)
    length = tokens.shape[1]
    cast = p["transformer"].get_cast_dtype()
    x = p["token_embedding"](tokens).to(cast) + p["positional_embedding"][:length].to(cast)  # [N, L, W]
    x = p["transformer"](x, attn_mask=p["attn_mask"][:length, :length])
    x = p["ln_final"](x)
    x = text_global_pool(x, tokens, p["pool_type"], eos_token_id=p["eos_id"])  # [N, W]
    proj = p["proj"]
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # [N, D]
