"""LoRA on ``nn.Linear`` projections: timm and Hugging Face attention, and MLPs.

timm's ``Attention`` (SigLIP, SigLIP2, PE-Core, EVA02, MobileCLIP2 image towers) computes q, k and v
with one fused ``qkv`` Linear ``[3A, D]``; Hugging Face attention (XLM-R, RoBERTa, mT5-style text towers)
uses separate ``q_proj``/``k_proj``/``v_proj`` (or ``query``/``key``/``value``) Linears. Both are
adapted by swapping the Linear for :class:`LoRALinear`, which

- keeps the original ``weight`` and ``bias`` under the same names (state-dict keys unchanged),
- adds ``scale * B A dropout(x)`` to chosen row slices of the output: the q and v thirds of a fused
  ``qkv`` (or q/k/v as configured), or all rows of a separate projection or an MLP layer,
- folds the adapters into the weight slices on merge and puts the plain Linear back.

Which Linear plays which role is read from the module tree (:func:`linear_sites`), by attribute name:
``qkv`` (fused), ``q_proj``/``query`` -> q, ``k_proj``/``key`` -> k, ``v_proj``/``value`` -> v,
``o_proj``/``out_proj``, ``proj`` beside a ``qkv``/``q_proj``, or ``dense`` in ``attention.output`` -> o;
T5's ``q``/``k``/``v``/``o``; with ``mlp``: ``fc1``/``fc2``, ``c_fc``/``c_proj`` inside an ``mlp``, BERT-style
``intermediate.dense`` / ``output.dense`` and T5's ``wi``/``wo``. The layer index of a site is the first number in its module path
(``trunk.blocks.3.attn.qkv`` -> 3).
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ROLE_BY_NAME = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
                "o_proj": "o", "out_proj": "o"}
MLP_NAMES = ("fc1", "fc2", "wi", "wi_0", "wi_1", "wo")  # timm/CLIP-style, T5-style
MLP_ROLE = "mlp"


class LoRAAdapter(nn.Module):
    """``x -> scale * B A dropout(x)`` with ``A [r, in]`` (Kaiming init) and ``B [out, r]`` (zeros)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # zero: the wrapped model starts unchanged
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # [out, in]


class LoRAWrapper(nn.Module):
    """Shared bookkeeping: which projections carry adapters, and the module to restore on merge."""

    def __init__(self, original: nn.Module, dims: dict, targets, r: int, alpha: float, dropout: float):
        super().__init__()
        # kept out of the module tree (plain __dict__ entry): its parameters are shared with this
        # wrapper, and registering it would list every base weight twice in state_dict().
        self.__dict__["_original"] = original
        self.lora = nn.ModuleDict({t: LoRAAdapter(*dims[t], r, alpha, dropout) for t in targets})

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor | float:
        return self.lora[name](x) if name in self.lora else 0.0

    def _weight_slice(self, name: str):
        raise NotImplementedError

    def merged_original(self) -> nn.Module:
        """Fold the adapters into the base weights and return the original module (now merged)."""
        with torch.no_grad():
            for name, adapter in self.lora.items():
                weight, rows = self._weight_slice(name)
                weight[rows] += adapter.delta_weight().to(weight.dtype)
        return self._original


class LoRALinear(LoRAWrapper):
    """A Linear with adapters on row slices of its output (``rows``: role -> slice of output features)."""

    def __init__(self, linear: nn.Linear, rows: dict[str, slice], r: int, alpha: float, dropout: float):
        dims = {name: (linear.in_features, s.stop - s.start) for name, s in rows.items()}
        super().__init__(linear, dims, list(rows), r, alpha, dropout)
        self.weight, self.bias = linear.weight, linear.bias  # shared, same state-dict keys
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = dict(sorted(rows.items(), key=lambda kv: kv[1].start))

    def _weight_slice(self, name: str):
        return self.weight, self.rows[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out]
        parts, pos = [], 0
        for name, rows in self.rows.items():  # the untouched rows get zeros
            if rows.start > pos:
                parts.append(out.new_zeros(*out.shape[:-1], rows.start - pos))
            parts.append(self.lora[name](x))
            pos = rows.stop
        if pos < self.out_features:
            parts.append(out.new_zeros(*out.shape[:-1], self.out_features - pos))
        return out + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))


def _layer_index(path: str) -> Optional[int]:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _roles(parent_name: str, parent: nn.Module, attr: str, linear: nn.Linear, targets: str,
           mlp: bool) -> dict[str, slice]:
    """Role -> output rows of one Linear (empty: not a LoRA site)."""
    if attr == "qkv" and linear.out_features % 3 == 0:
        third = linear.out_features // 3
        return {t: slice(i * third, (i + 1) * third) for i, t in enumerate("qkv") if t in targets}
    role = ROLE_BY_NAME.get(attr)
    if attr in ("q", "k", "v", "o") and all(hasattr(parent, n) for n in "qkvo"):  # T5/mT5 attention
        role = attr
    if attr == "proj" and (hasattr(parent, "qkv") or hasattr(parent, "q_proj")):
        role = "o"
    if attr == "dense" and parent_name.endswith("attention.output"):
        role = "o"
    if role is not None:
        return {role: slice(0, linear.out_features)} if role in targets else {}
    is_mlp = attr in MLP_NAMES or (attr in ("c_fc", "c_proj") and parent_name.split(".")[-1] == "mlp") or \
        (attr == "dense" and parent_name.split(".")[-1] in ("intermediate", "output"))
    return {MLP_ROLE: slice(0, linear.out_features)} if mlp and is_mlp else {}


def linear_sites(tower: nn.Module, targets: str, mlp: bool,
                 skip: tuple[type, ...] = ()) -> list[tuple[nn.Module, str, int, dict[str, slice]]]:
    """``(parent, attribute, layer index, rows)`` of every Linear that takes adapters in ``tower``.

    Linears inside modules of the types ``skip`` (wrapped as a whole elsewhere) and outside any
    numbered block (projection heads, attention pooling) are left alone.
    """
    skipped: list[str] = []
    found = []
    for name, module in tower.named_modules():
        if isinstance(module, skip + (LoRAWrapper,)):
            skipped.append(name + ".")
            continue
        if any(name.startswith(s) for s in skipped):
            continue
        for attr, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            index = _layer_index(f"{name}.{attr}")
            rows = _roles(name, module, attr, child, targets, mlp) if index is not None else {}
            if rows:
                found.append((module, attr, index, rows))
    return found


def prepare_parent(parent: nn.Module, attr: str) -> None:
    """Make the attention call its ``qkv`` Linear as a module, so the adapter is on its path.

    timm's ``EvaAttention`` with separate q/v biases calls ``F.linear(x, self.qkv.weight, bias)``, which
    would bypass the wrapper; its ``qkv_bias_separate`` mode computes ``self.qkv(x) + bias``, the same
    sum in another order.
    """
    if attr == "qkv" and getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
        parent.qkv_bias_separate = True
