"""Merge a PEFT LoRA adapter made for a ``transformers`` CLIPModel into its base weights, exactly.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with ``weights_only``). For every adapted linear layer PEFT's merged weight is

    W' = W + (B @ A) * s,   s = lora_alpha / r   (s = lora_alpha / sqrt(r) with ``use_rslora``),

with ``r``/``lora_alpha`` overridden per module by ``rank_pattern``/``alpha_pattern``. The update is
applied to the ``transformers`` state dict *before* conversion, so a ``q_proj``/``k_proj``/``v_proj``
update lands in its own third of open_clip's fused ``in_proj_weight`` through the conversion rule
itself, and ``out_proj``/``fc1``/``fc2``/projection updates map like their weights. The update is
computed as PEFT computes it (``(B @ A) * s`` in float32, added to the float32 weight), so the merged
tensors are PEFT's own to the last bit on the same machine.

Refused, with the difference named (:class:`AdapterMismatchError`): another base model
(``base_model_name_or_path``), a module the base does not have, shapes that do not fit, targets the
file does not match, and adapter kinds whose merge is not ``W + s B A`` (DoRA, trained biases,
``modules_to_save``, embedding or convolution LoRA, PiSSA-style initialisations that rewrite the base).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Union

import torch

log = logging.getLogger("cultureclip")
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names
# config fields that must be empty/false: each one changes what merging means
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                "target_parameters", "use_qalora", "alora_invocation_tokens", "fan_in_fan_out")
_PLAIN_INIT = (True, False, "gaussian", None)  # other initialisations (pissa, olora, ...) rewrite the base weights


class AdapterMismatchError(ValueError):
    """The adapter does not belong to the given base model, or cannot be merged exactly."""


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json contents, adapter tensors)`` of a PEFT adapter directory."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a PEFT adapter directory")
    config = json.loads(config_file.read_text())
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return config, load_file(str(path / "adapter_model.safetensors"))
    if (path / "adapter_model.bin").is_file():
        from cultureclip.checkpoint_io import torch_load
        return config, torch_load(path / "adapter_model.bin")
    raise FileNotFoundError(f"{path} has no adapter_model.safetensors or adapter_model.bin")


def _names_match(recorded: str, given: str) -> bool:
    """Same model: equal ids, the same existing path, or the same last component (a local copy of
    ``openai/clip-vit-base-patch32`` in ``.../clip-vit-base-patch32``)."""
    if recorded == given:
        return True
    if os.path.exists(recorded) and os.path.exists(given) and os.path.samefile(recorded, given):
        return True
    last = lambda s: Path(s.rstrip("/")).name.lower()  # noqa: E731
    return last(recorded) == last(given)


def check_base(config: Mapping[str, Any], base_name: str, allow_other_base: bool = False) -> None:
    """Refuse an adapter recorded for another base model (unless ``allow_other_base``)."""
    recorded = config.get("base_model_name_or_path")
    if not recorded:
        log.warning("adapter records no base_model_name_or_path; only the tensor shapes are checked")
    elif not _names_match(str(recorded), str(base_name)) and not allow_other_base:
        raise AdapterMismatchError(f"adapter was made for base model {recorded!r}, not {base_name!r} "
                                   f"(pass allow_other_base / --allow-other-base if it is the same model)")


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse adapter kinds whose merge is not ``W + s * B @ A``, naming the field."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters merge here")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise AdapterMismatchError(f"adapter_config.json sets {field}={config[field]!r}, which is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterMismatchError(f"adapter_config.json sets bias={config['bias']!r}; only 'none' is supported")
    if config.get("init_lora_weights", True) not in _PLAIN_INIT:
        raise AdapterMismatchError(f"adapter_config.json sets init_lora_weights={config['init_lora_weights']!r}, "
                                   f"which changes the base weights; convert it to a plain LoRA first")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _target_matches(targets: Any, module: str) -> bool:
    """PEFT's rule (``peft.tuners.tuners_utils.check_target_module_exists``): a string is a regular
    expression over the full module name; a list entry matches a module named exactly so or ending in
    ``"." + entry``, so dotted entries (``"self_attn.out_proj"``) match a suffix of whole components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in (targets or ()))


def adapter_deltas(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module name: (A [r, in], B [out, r], scale)}`` from an adapter's tensors."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise AdapterMismatchError(f"adapter tensor {key!r} is not a LoRA A/B weight of a linear layer "
                                       f"(embedding, convolution and magnitude adapters are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterMismatchError(f"adapter holds only lora_{''.join(ab)} for {module}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a "
                                       f"linear layer's low-rank pair")
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        if a.shape[0] != r:
            raise AdapterMismatchError(f"{module}: lora_A has rank {a.shape[0]} but adapter_config.json gives r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = (a, b, scale)
    return out


def merge_adapter(state: dict[str, torch.Tensor], adapter: Union[str, os.PathLike], base_name: str,
                  allow_other_base: bool = False) -> dict[str, torch.Tensor]:
    """A copy of a ``CLIPModel`` state dict with the adapter in ``adapter`` merged (``W + s * B @ A``).

    Args:
        state: the base model's ``transformers`` state dict.
        adapter: PEFT adapter directory.
        base_name: the base model's id or directory, compared with ``base_model_name_or_path``.
        allow_other_base: merge even if ``base_model_name_or_path`` names another model (shapes are
            still checked).

    Raises:
        AdapterMismatchError: naming the base model, module, shape or config field that differs.
    """
    config, tensors = read_adapter(adapter)
    check_config(config)
    check_base(config, base_name, allow_other_base)
    deltas = adapter_deltas(config, tensors)
    if not deltas:
        raise AdapterMismatchError(f"{adapter} holds no LoRA weights")
    targets = config.get("target_modules")
    unmatched = [m for m in deltas if targets is not None and not _target_matches(targets, m)]
    if unmatched:
        raise AdapterMismatchError(f"adapter weights for {unmatched[:4]} are not covered by target_modules {targets}")
    if isinstance(targets, (list, tuple, set)):
        base_modules = [k[:-len(".weight")] for k in state if k.endswith(".weight")]
        missing = sorted(t for t in targets if not any(_target_matches([t], m) for m in base_modules))
        if missing:
            raise AdapterMismatchError(f"target_modules {missing} match no module of the base model {base_name!r}")
        unused = sorted(t for t in targets if not any(_target_matches([t], m) for m in deltas))
        if unused:
            raise AdapterMismatchError(f"target_modules lists {unused} but {adapter} holds no weights for them")
    merged = dict(state)
    for module, (a, b, scale) in deltas.items():
        key = f"{module}.weight"
        if key not in state:
            raise AdapterMismatchError(f"adapter module {module!r} does not exist in the base model {base_name!r}")
        w = state[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterMismatchError(f"{module}: adapter update is {b.shape[0]}x{a.shape[1]} but the base "
                                       f"weight is {tuple(w.shape)} (another model size?)")
        delta = (b.float() @ a.float()) * scale  # [out, r] @ [r, in] -> [out, in]; PEFT's order and precision
        merged[key] = (w.float() + delta).to(w.dtype)
    log.info("merged %d LoRA modules from %s", len(deltas), adapter)
    return merged
