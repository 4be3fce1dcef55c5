"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention projections (and optionally MLPs) of open_clip towers.

Native open_clip blocks are handled here; timm and Hugging Face towers, whose projections are
``nn.Linear`` modules, by :mod:`cultureclip.lora_linear`.

open_clip's transformer blocks use ``nn.MultiheadAttention``, which keeps q, k and v in one fused
``in_proj_weight [3D, D]``; PEFT can only adapt whole ``nn.Linear`` modules, so it cannot target q and
v alone there. We swap each attention module for a wrapper that:

- shares the original parameters under the *same names* (``in_proj_weight``, ``out_proj.weight``, or
  ``q_proj``/``k_proj``/``v_proj``/``c_proj`` for the ResNet attention pool), so a state dict taken
  while adapters are active still loads into plain open_clip once the ``lora_*`` keys are dropped;
- adds ``scale * B A dropout(x)`` to the chosen projections, with dropout on the adapter input as in
  PEFT (a weight-space parametrisation could not apply it there);
- runs attention with ``F.scaled_dot_product_attention``.

``merge_lora`` folds ``scale * B A`` into the base weights and puts the original module back, so the
merged model is a plain open_clip model with the same outputs.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.modified_resnet import AttentionPool2d

from cultureclip.lora_linear import LoRAAdapter, LoRALinear, LoRAWrapper, linear_sites, prepare_parent  # noqa: F401

TARGETS = "qkvo"


def _attend(q, k, v, num_heads: int, attn_mask: Optional[torch.Tensor], dropout_p: float):
    """Multi-head attention on batch-first ``[B, L, D]`` projections; returns ``[B, L, D]``."""
    b, lq, d = q.shape
    hd = d // num_heads
    q = q.view(b, lq, num_heads, hd).transpose(1, 2)  # [B, H, Lq, hd]
    k = k.view(b, k.shape[1], num_heads, hd).transpose(1, 2)  # [B, H, Lk, hd]
    v = v.view(b, v.shape[1], num_heads, hd).transpose(1, 2)
    if attn_mask is not None and attn_mask.dim() == 3:  # [B*H, Lq, Lk], as nn.MultiheadAttention takes it
        attn_mask = attn_mask.view(b, num_heads, lq, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(b, lq, d)  # [B, Lq, D]


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # nn.MultiheadAttention: a bool mask is True where attention is *not* allowed; SDPA reads bool the
    # other way round, so convert to an additive float mask to keep open_clip's meaning.
    if mask is None or mask.dtype != torch.bool:
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class LoRAMultiheadAttention(LoRAWrapper):
    """Drop-in for open_clip's ``nn.MultiheadAttention`` (self- or cross-attention, same embed dims)."""

    def __init__(self, mha: nn.MultiheadAttention, targets: str, r: int, alpha: float, dropout: float):
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("LoRA supports nn.MultiheadAttention with equal q/k/v dims, no bias_k/v, "
                             "no add_zero_attn (what open_clip's transformer blocks use)")
        d = mha.embed_dim
        super().__init__(mha, {t: (d, d) for t in TARGETS}, targets, r, alpha, dropout)
        self.in_proj_weight = mha.in_proj_weight  # [3D, D], shared
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.num_heads, self.embed_dim, self.batch_first = mha.num_heads, d, mha.batch_first
        self.attn_dropout = mha.dropout

    def _weight_slice(self, name: str):
        d = self.embed_dim
        if name == "o":
            return self.out_proj.weight, slice(None)
        i = "qkv".index(name)
        return self.in_proj_weight, slice(i * d, (i + 1) * d)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            raise NotImplementedError("LoRA attention does not return attention weights")
        if not self.batch_first:  # [L, B, D] -> [B, L, D]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)  # each [D, D]
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q = F.linear(query, w_q, b_q) + self._delta("q", query)
        k = F.linear(key, w_k, b_k) + self._delta("k", key)
        v = F.linear(value, w_v, b_v) + self._delta("v", value)
        mask = _additive_mask(attn_mask, q.dtype)
        if key_padding_mask is not None:  # [B, Lk] -> [B, 1, 1, Lk]
            pad = _additive_mask(key_padding_mask, q.dtype)[:, None, None, :]
            if mask is not None and mask.dim() == 3:
                mask = mask.view(q.shape[0], self.num_heads, q.shape[1], -1)
            mask = pad if mask is None else mask + pad
        if is_causal and mask is None:
            raise ValueError("is_causal=True needs an explicit attn_mask, as in nn.MultiheadAttention")
        x = _attend(q, k, v, self.num_heads, mask, self.attn_dropout if self.training else 0.0)
        x = self.out_proj(x) + self._delta("o", x)
        return (x if self.batch_first else x.transpose(0, 1)), None


class LoRAAttentionPool2d(LoRAWrapper):
    """LoRA version of the attention pool that ends open_clip's ModifiedResNet image tower."""

    def __init__(self, pool: AttentionPool2d, targets: str, r: int, alpha: float, dropout: float):
        d, out = pool.q_proj.in_features, pool.c_proj.out_features
        super().__init__(pool, {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, out)}, targets, r, alpha,
                         dropout)
        self.positional_embedding = pool.positional_embedding
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj
        self.num_heads = pool.num_heads

    def _weight_slice(self, name: str):
        proj = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.c_proj}[name]
        return proj.weight, slice(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        x = x + self.positional_embedding[None].to(x.dtype)
        q_in = x[:, :1]  # only the pooled (mean) token is a query: [B, 1, C]
        q = self.q_proj(q_in) + self._delta("q", q_in)
        k = self.k_proj(x) + self._delta("k", x)
        v = self.v_proj(x) + self._delta("v", x)
        out = _attend(q, k, v, self.num_heads, None, 0.0)  # [B, 1, C]
        out = self.c_proj(out) + self._delta("o", out)
        return out[:, 0]


def _attention_layers(tower: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(parent, attribute, layer index)`` of every attention module that LoRA can wrap."""
    found = []
    for name, module in tower.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, AttentionPool2d):
                found.append((module, attr, 0))
            elif isinstance(child, nn.MultiheadAttention) and name.split(".")[-2:-1] == ["resblocks"]:
                found.append((module, attr, int(name.split(".")[-1])))
    return found


def add_lora(towers: dict[str, nn.Module], r: int = 4, alpha: float = 16, dropout: float = 0.1,
             targets: str = "qv", layers: Union[str, Sequence[int]] = "all", mlp: bool = False) -> list[nn.Module]:
    """Wrap the attention (and with ``mlp`` the MLP layers) of each tower in ``towers`` with LoRA adapters.

    Args:
        towers: e.g. ``{"image": model.visual, "text": model.transformer}``.
        r, alpha, dropout: rank, scaling numerator (``scale = alpha / r``) and adapter input dropout.
        targets: any of ``"q"``, ``"k"``, ``"v"``, ``"o"`` (``"qv"`` = the paper's recipe).
        layers: ``"all"`` or block indices (the ResNet attention pool is layer 0; for timm and Hugging
            Face towers the first number in the module path).
        mlp: also adapt the two Linears of every MLP block (required for a tower without attention,
            such as ConvNeXt).

    Returns:
        The wrappers that were installed.

    Raises:
        ValueError: bad arguments, a tower without supported layers, or layers that don't exist.
    """
    targets = "".join(targets) if not isinstance(targets, str) else targets
    if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct letters from {TARGETS!r}, got {targets!r}")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    wrapped = []
    for tower_name, tower in towers.items():
        found = [(parent, attr, index, None) for parent, attr, index in _attention_layers(tower)]
        found += linear_sites(tower, targets, mlp, skip=(nn.MultiheadAttention, AttentionPool2d))
        if not found:
            hint = "" if mlp else "; set lora.mlp: true to adapt its MLP layers (e.g. a ConvNeXt tower)"
            raise ValueError(f"{tower_name} tower ({type(tower).__name__}) has no layer that LoRA can wrap "
                             f"(supported: open_clip transformer blocks, the ResNet attention pool, timm and "
                             f"Hugging Face attention projections, MLPs with mlp=true){hint}")
        available = sorted({i for _, _, i, _ in found})
        wanted = available if layers == "all" else list(layers)
        if layers != "all" and (isinstance(layers, str) or not set(wanted) <= set(available)):
            raise ValueError(f"{tower_name} tower: layers {layers!r} not in available {available}")
        for parent, attr, index, rows in found:
            if index not in wanted:
                continue
            child = getattr(parent, attr)
            if rows is not None:
                prepare_parent(parent, attr)
                wrapper = LoRALinear(child, rows, r, alpha, dropout)
            else:
                cls = LoRAAttentionPool2d if isinstance(child, AttentionPool2d) else LoRAMultiheadAttention
                wrapper = cls(child, targets, r, alpha, dropout)
            ref = next(child.parameters())
            wrapper.lora.to(device=ref.device, dtype=ref.dtype)
            setattr(parent, attr, wrapper)
            wrapped.append(wrapper)
    return wrapped


def lora_modules(model: nn.Module) -> Iterable[tuple[nn.Module, str, LoRAWrapper]]:
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRAWrapper):
                yield module, attr, child


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weights and restore plain open_clip modules; returns how many."""
    n = 0
    for parent, attr, wrapper in lora_modules(model):
        setattr(parent, attr, wrapper.merged_original())
        n += 1
    return n
