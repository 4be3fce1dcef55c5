"""Exact mapping between ``transformers``' ``CLIPModel`` (ViT towers) and open_clip's ``CLIP``.

Pure torch on plain dicts (a ``CLIPConfig.to_dict()`` and state dicts), so the rules can be read and
tested without ``transformers``. The two implementations compute the same function once:

- **attention**: ``transformers`` keeps separate ``q_proj``/``k_proj``/``v_proj`` linears, open_clip one
  ``nn.MultiheadAttention`` whose ``in_proj_weight`` ``[3W, W]`` is the row-wise concatenation q, k, v
  (and ``in_proj_bias`` ``[3W]`` likewise); ``out_proj`` maps one to one;
- **projections**: ``transformers``' ``visual_projection``/``text_projection`` are bias-free
  ``nn.Linear`` (``y = x @ weight.T``), open_clip's ``visual.proj``/``text_projection`` are matrices used
  as ``x @ proj``, so ``proj = weight.T``;
- **embeddings**: class embedding, patch convolution (no bias on either side) and position tables map
  one to one; ``pre_layrnorm``/``post_layernorm``/``final_layer_norm`` are open_clip's
  ``ln_pre``/``ln_post``/``ln_final`` (a per-token LayerNorm, so normalising the class token after
  pooling, as ``transformers`` does, equals open_clip's normalise-then-pool);
- **activation**: ``hidden_act="quick_gelu"`` is open_clip's ``quick_gelu=True``, ``"gelu"`` (erf) its
  default ``nn.GELU``; any other activation, or towers with different ones, is refused;
- **text pooling**: ``transformers`` reads the position of the largest token id when the text config's
  ``eos_token_id`` is 2 (the rule of configs written before the EOS fix) and otherwise the first
  position holding ``eos_token_id``; open_clip's ``pool_type="argmax"`` and ``pool_type="eos"`` (with
  ``eos_id``) are the same two rules, so each maps to the other and the pooled position agrees for
  every token sequence, not only for tokenizer output;
- **logit_scale**: both store the log temperature.

Fields open_clip has no place for (a LayerNorm epsilon other than 1e-5, non-square images, biases on
the projections, attentional pooling, ...) are refused with the field named, never dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

SUPPORTED_ACTS = ("quick_gelu", "gelu")
OPEN_CLIP_LN_EPS = 1e-5  # open_clip builds every LayerNorm with torch's default epsilon
LEGACY_ARGMAX_EOS = 2  # transformers' marker for "pool at the largest token id"
_ATTN = ("q_proj", "k_proj", "v_proj")
_IGNORED_HF_KEYS = ("position_ids",)  # non-persistent buffers some older checkpoints still contain


class ConversionError(ValueError):
    """A model that the other library cannot represent exactly; the message names the field."""


# ---------------------------------------------------------------------------------------- configs
def _mlp_ratio(tower: str, hidden: int, intermediate: int) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:  # open_clip rebuilds the MLP width as int(width * mlp_ratio)
        raise ConversionError(f"{tower}: intermediate_size {intermediate} is not representable as "
                              f"int(hidden_size * mlp_ratio) with hidden_size {hidden}")
    return ratio


def _check_tower(tower: str, c: Mapping[str, Any]) -> None:
    eps = c.get("layer_norm_eps", OPEN_CLIP_LN_EPS)
    if abs(eps - OPEN_CLIP_LN_EPS) > 1e-12:
        raise ConversionError(f"{tower}.layer_norm_eps is {eps}; open_clip's LayerNorms use {OPEN_CLIP_LN_EPS}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ConversionError(f"{tower}: hidden_size {c['hidden_size']} is not divisible by "
                              f"num_attention_heads {c['num_attention_heads']}")


def open_clip_cfg_from_hf(hf: Mapping[str, Any]) -> dict:
    """open_clip's model-config dict for a ``CLIPConfig.to_dict()``.

    Raises:
        ConversionError: naming the field that open_clip cannot represent.
    """
    if hf.get("model_type", "clip") != "clip":
        raise ConversionError(f"model_type is {hf.get('model_type')!r}; only 'clip' (CLIPModel) converts")
    t, v = hf["text_config"], hf["vision_config"]
    acts = {"text_config.hidden_act": t.get("hidden_act", "quick_gelu"),
            "vision_config.hidden_act": v.get("hidden_act", "quick_gelu")}
    for field, act in acts.items():
        if act not in SUPPORTED_ACTS:
            raise ConversionError(f"{field} is {act!r}; open_clip CLIP supports {SUPPORTED_ACTS}")
    if len(set(acts.values())) > 1:
        raise ConversionError(f"the towers use different activations {acts}; open_clip has one quick_gelu flag")
    _check_tower("text_config", t)
    _check_tower("vision_config", v)
    if v.get("num_channels", 3) != 3:
        raise ConversionError(f"vision_config.num_channels is {v['num_channels']}; open_clip ViTs take RGB (3)")
    vision_cfg: dict[str, Any] = {"image_size": v["image_size"], "layers": v["num_hidden_layers"],
                                  "width": v["hidden_size"], "patch_size": v["patch_size"]}
    head_width = v["hidden_size"] // v["num_attention_heads"]
    if head_width != 64:  # open_clip's default; left out so converted OpenAI models match its built-in configs
        vision_cfg["head_width"] = head_width
    ratio = _mlp_ratio("vision_config", v["hidden_size"], v["intermediate_size"])
    if ratio != 4.0:
        vision_cfg["mlp_ratio"] = ratio
    text_cfg: dict[str, Any] = {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"],
                                "width": t["hidden_size"], "heads": t["num_attention_heads"],
                                "layers": t["num_hidden_layers"]}
    ratio = _mlp_ratio("text_config", t["hidden_size"], t["intermediate_size"])
    if ratio != 4.0:
        text_cfg["mlp_ratio"] = ratio
    eos = t.get("eos_token_id", LEGACY_ARGMAX_EOS)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ConversionError(f"text_config.eos_token_id is {eos}; pooling needs a single end-of-text id")
        eos = eos[0]
    if eos != LEGACY_ARGMAX_EOS:  # transformers pools at the first eos_token_id: open_clip's "eos" pooling
        text_cfg["pool_type"], text_cfg["eos_id"] = "eos", int(eos)
    cfg: dict[str, Any] = {"embed_dim": hf["projection_dim"]}
    if acts["text_config.hidden_act"] == "quick_gelu":
        cfg["quick_gelu"] = True
    cfg["vision_cfg"], cfg["text_cfg"] = vision_cfg, text_cfg
    return cfg


def _square(tower: str, field: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{tower}.{field} is {list(value)}; transformers' CLIP needs a square size")
        value = value[0]
    return int(value)


def _check_defaults(tower: str, cfg: Mapping[str, Any], defaults: Any, mapped: set[str]) -> None:
    """Every field outside ``mapped`` must keep open_clip's default, which is what transformers computes."""
    instance = defaults()
    base = {f.name: getattr(instance, f.name) for f in dataclasses.fields(defaults)}
    for key, value in cfg.items():
        if key in mapped:
            continue
        if key not in base:
            raise ConversionError(f"{tower}.{key} is not a field of open_clip's {defaults.__name__}")
        if value != base[key] and not (isinstance(base[key], tuple) and list(base[key]) == value):
            raise ConversionError(f"{tower}.{key} is {value!r} (open_clip default {base[key]!r}); "
                                  f"transformers' CLIPModel has no equivalent")


def hf_config_from_open_clip(cfg: Mapping[str, Any]) -> dict:
    """``CLIPConfig`` keyword arguments (``text_config``, ``vision_config``, ``projection_dim``) for an
    open_clip ViT CLIP model config.

    Raises:
        ConversionError: naming the field that ``transformers``' CLIPModel cannot represent.
    """
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    for key, value in cfg.items():
        if key not in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg") and value not in (None, False):
            raise ConversionError(f"model config field {key}={value!r} has no transformers equivalent")
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    if not isinstance(v.get("layers", 12), int) or v.get("timm_model_name"):
        raise ConversionError("vision_cfg is not an open_clip VisionTransformer (ResNet or timm tower)")
    if t.get("hf_model_name") or t.get("hf_tokenizer_name"):
        raise ConversionError("text_cfg uses a Hugging Face text tower; only open_clip's text transformer converts")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise ConversionError(f"text_cfg.pool_type is {pool!r}; transformers pools at argmax or at eos_token_id")
    vd, td = CLIPVisionCfg(), CLIPTextCfg()  # open_clip's defaults for the fields a config leaves out
    _check_defaults("vision_cfg", v, CLIPVisionCfg, {"image_size", "patch_size", "layers", "width", "head_width",
                                                      "mlp_ratio", "patch_dropout"})  # dropout: training only
    _check_defaults("text_cfg", t, CLIPTextCfg, {"context_length", "vocab_size", "width", "heads", "layers",
                                                  "mlp_ratio", "pool_type", "eos_id"})
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    v_width, t_width = v.get("width", vd.width), t.get("width", td.width)
    v_heads = v_width // v.get("head_width", vd.head_width)
    if v_heads * v.get("head_width", vd.head_width) != v_width:
        raise ConversionError(f"vision_cfg.width {v_width} is not a multiple of head_width {v.get('head_width')}")
    proj = int(cfg["embed_dim"])
    vision = {"hidden_size": v_width, "intermediate_size": int(v_width * v.get("mlp_ratio", vd.mlp_ratio)),
              "num_hidden_layers": v.get("layers", vd.layers), "num_attention_heads": v_heads,
              "image_size": _square("vision_cfg", "image_size", v.get("image_size", vd.image_size)),
              "patch_size": _square("vision_cfg", "patch_size", v.get("patch_size", vd.patch_size)),
              "num_channels": 3, "hidden_act": act, "layer_norm_eps": OPEN_CLIP_LN_EPS, "projection_dim": proj}
    eos = int(t.get("eos_id", td.eos_id)) if pool == "eos" else LEGACY_ARGMAX_EOS
    text = {"vocab_size": t.get("vocab_size", td.vocab_size), "hidden_size": t_width,
            "intermediate_size": int(t_width * t.get("mlp_ratio", td.mlp_ratio)),
            "num_hidden_layers": t.get("layers", td.layers), "num_attention_heads": t.get("heads", td.heads),
            "max_position_embeddings": t.get("context_length", td.context_length), "hidden_act": act,
            "layer_norm_eps": OPEN_CLIP_LN_EPS, "projection_dim": proj, "eos_token_id": eos}
    return {"text_config": text, "vision_config": vision, "projection_dim": proj}


# ---------------------------------------------------------------------------------------- weights
def _block_pairs(oc: str, hf: str) -> list[tuple[str, str]]:
    """(open_clip, transformers) names of one residual block's one-to-one tensors."""
    pairs = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    return [(f"{oc}.{a}.{p}", f"{hf}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def key_pairs(n_vision: int, n_text: int) -> list[tuple[str, str]]:
    """(open_clip key, transformers key) of every tensor that maps one to one (no fusing, no transpose)."""
    pairs = [("visual.class_embedding", "vision_model.embeddings.class_embedding"),
             ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
             ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
             ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
             ("logit_scale", "logit_scale")]
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        pairs += [(f"{oc}.weight", f"{hf}.weight"), (f"{oc}.bias", f"{hf}.bias")]
    for n, oc, hf in ((n_vision, "visual.transformer", "vision_model.encoder"),
                      (n_text, "transformer", "text_model.encoder")):
        for i in range(n):
            pairs += _block_pairs(f"{oc}.resblocks.{i}", f"{hf}.layers.{i}")
    return pairs


def attention_pairs(n_vision: int, n_text: int) -> list[tuple[str, str]]:
    """(open_clip attention prefix, transformers attention prefix) of every block."""
    return ([(f"visual.transformer.resblocks.{i}.attn", f"vision_model.encoder.layers.{i}.self_attn")
             for i in range(n_vision)]
            + [(f"transformer.resblocks.{i}.attn", f"text_model.encoder.layers.{i}.self_attn") for i in range(n_text)])


_PROJECTIONS = (("visual.proj", "visual_projection.weight"), ("text_projection", "text_projection.weight"))


def _take(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{source} state dict has no tensor {key!r}")
    return state.pop(key)


def open_clip_state_from_hf(hf_state: Mapping[str, torch.Tensor], n_vision: int, n_text: int) -> dict:
    """open_clip state dict from a ``CLIPModel`` state dict; every tensor must be used exactly once."""
    src = {k: v for k, v in hf_state.items() if not k.endswith(_IGNORED_HF_KEYS)}
    out = {oc: _take(src, hf, "transformers") for oc, hf in key_pairs(n_vision, n_text)}
    for oc, hf in attention_pairs(n_vision, n_text):
        for p in ("weight", "bias"):  # [3W, W] / [3W]: q, k, v stacked along dim 0
            out[f"{oc}.in_proj_{p}"] = torch.cat([_take(src, f"{hf}.{n}.{p}", "transformers") for n in _ATTN])
    for oc, hf in _PROJECTIONS:
        out[oc] = _take(src, hf, "transformers").t().contiguous()  # Linear [D, W] -> matrix [W, D]
    if src:
        raise ConversionError(f"transformers tensors with no open_clip counterpart: {sorted(src)[:8]}")
    return out


def hf_state_from_open_clip(oc_state: Mapping[str, torch.Tensor], n_vision: int, n_text: int) -> dict:
    """``CLIPModel`` state dict from an open_clip state dict; every tensor must be used exactly once."""
    src = {k: v for k, v in oc_state.items() if k != "attn_mask"}
    out = {hf: _take(src, oc, "open_clip") for oc, hf in key_pairs(n_vision, n_text)}
    for oc, hf in attention_pairs(n_vision, n_text):
        for p in ("weight", "bias"):
            for name, part in zip(_ATTN, _take(src, f"{oc}.in_proj_{p}", "open_clip").chunk(3, dim=0)):
                out[f"{hf}.{name}.{p}"] = part.contiguous()
    for oc, hf in _PROJECTIONS:
        out[hf] = _take(src, oc, "open_clip").t().contiguous()
    if src:
        raise ConversionError(f"open_clip tensors with no transformers counterpart: {sorted(src)[:8]}")
    return out
