"""Tiny random configs, one per model family open_clip ships (for tests; nothing is downloaded).

Image towers that open_clip takes from timm are registered with timm's own registry under
``cc_tiny_*`` names: the released architectures (SigLIP's MAP-pooled ViT, EVA02, PE-Core,
MobileCLIP2's FastViT-MCi) with their block types kept and their sizes cut down. Text towers are open_clip's
own, or a Hugging Face XLM-R tower built from a local ``config.json``; multilingual towers get a
tokenizer trained here on the toy set's words and saved as a local Hugging Face tokenizer folder.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import timm
from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.fastvit import RepConditionalPosEnc, _create_fastvit
from timm.models.vision_transformer import _create_vision_transformer
from torch.nn import LayerNorm

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _register(name, fn):
    if name not in timm.list_models(name):
        register_model(fn)


def cc_tiny_siglip_vit(pretrained=False, **kwargs):
    """SigLIP/SigLIP2's ViT: no class token, MAP attention-pool head (``vit_base_patch16_siglip_224``)."""
    args = dict(TINY, class_token=False, global_pool="map")
    return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=False, **dict(args, **kwargs))


def cc_tiny_eva02(pretrained=False, **kwargs):
    """EVA02-CLIP's ViT: separate q/k/v, SwiGLU MLP, rotary embeddings (``eva02_base_patch16_clip_224``)."""
    args = dict(TINY, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token")
    return _create_eva("eva02_base_patch16_clip_224", pretrained=False, **dict(args, **kwargs))


def cc_tiny_pe_core(pretrained=False, **kwargs):
    """PE-Core's ViT: fused qkv with rotary attention, MAP head (``vit_pe_core_tiny_patch16_384``)."""
    args = dict(TINY, mlp_ratio=4.0, global_pool="map", attn_type="rope", use_pre_transformer_norm=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy",
                attn_pool_num_heads=2, attn_pool_mlp_ratio=4.0, norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_eva("vit_pe_core_tiny_patch16_384", pretrained=False, **dict(args, **kwargs))


def cc_tiny_fastvit_mci(pretrained=False, **kwargs):
    """MobileCLIP2's FastViT-MCi: RepMixer stages, then an attention stage (``fastvit_mci0``)."""
    args = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(2, 2, 2, 2),
                se_downsamples=(False, False, True, True),
                pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
                token_mixers=("repmixer", "repmixer", "repmixer", "attention"), lkc_use_act=True)
    return _create_fastvit("fastvit_mci0", pretrained=False, **dict(args, **kwargs))


for _fn in (cc_tiny_siglip_vit, cc_tiny_eva02, cc_tiny_pe_core, cc_tiny_fastvit_mci):
    _register(_fn.__name__, _fn)

CLIP_TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
CLIP_VISION = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}


def timm_vision(name, image_size=32, pool="avg", proj=None):
    return {"image_size": image_size, "timm_model_name": name, "timm_model_pretrained": False,
            "timm_pool": pool, "timm_proj": proj}


def build_tokenizer(directory: Path) -> Path:
    """An XLM-R-layout tokenizer (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3) trained on the toy set's
    words plus a few non-English ones, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from cultureclip.data.toy import concept_table
    corpus = [c for row in concept_table() for c in row["captions"] + [row["name"], row["twin"], row["detail"]]]
    corpus += ["한복", "着物", "旗袍", "áo dài", "сарафан", "a photo of a", "number"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def build_xlmr_dir(directory: Path) -> Path:
    """A local folder with a tiny XLM-R ``config.json`` and the toy tokenizer (what ``hf_model_name`` names)."""
    from transformers import AutoTokenizer, XLMRobertaConfig
    build_tokenizer(directory)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    XLMRobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, type_vocab_size=1).save_pretrained(str(directory))
    return directory


def configs(tmp: Path) -> dict[str, dict]:
    """family -> ``{"cfg": model config, "family": loss family, "exact_trim": bool, "lora": add_lora kwargs}``."""
    tok_dir = build_tokenizer(tmp / "tokenizer")
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(str(tok_dir)))
    siglip_text = dict(CLIP_TEXT, no_causal_mask=True, pool_type="last", proj_bias=True, norm_kwargs={"eps": 1e-6})
    siglip = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
              "vision_cfg": timm_vision("cc_tiny_siglip_vit", pool="map", proj="none"), "text_cfg": siglip_text}
    siglip2 = {**siglip, "text_cfg": dict(siglip_text, vocab_size=vocab, hf_tokenizer_name=str(tok_dir),
                                          act_kwargs={"approximate": "tanh"})}
    coca_vision = dict(CLIP_VISION, attentional_pool=True, attn_pooler_heads=2, output_tokens=True)
    return {
        "clip_vit": dict(cfg={"embed_dim": 32, "vision_cfg": CLIP_VISION, "text_cfg": CLIP_TEXT},
                         family="softmax", exact_trim=True, lora={}),
        "convnext": dict(cfg={"embed_dim": 32, "vision_cfg": timm_vision("test_convnext", 64, pool="", proj="linear"),
                              "text_cfg": CLIP_TEXT}, family="softmax", exact_trim=True, lora={"mlp": True}),
        "siglip": dict(cfg=siglip, family="sigmoid", exact_trim=False, lora={}),
        "siglip2": dict(cfg=siglip2, family="sigmoid", exact_trim=False, lora={}),
        "pe_core": dict(cfg={"embed_dim": 32, "custom_text": True, "text_cfg": CLIP_TEXT,
                             "vision_cfg": timm_vision("cc_tiny_pe_core", pool="map", proj=None)},
                        family="softmax", exact_trim=True, lora={}),
        "eva02": dict(cfg={"embed_dim": 32, "custom_text": True, "text_cfg": CLIP_TEXT,
                           "vision_cfg": timm_vision("cc_tiny_eva02", pool="token", proj=None)},
                      family="softmax", exact_trim=True, lora={}),
        "mobileclip2": dict(cfg={"embed_dim": 32, "custom_text": True, "text_cfg": dict(CLIP_TEXT, no_causal_mask=True),
                                 "vision_cfg": timm_vision("cc_tiny_fastvit_mci", 64, pool="avg", proj=None)},
                            family="softmax", exact_trim=False, lora={}),
        "coca": dict(cfg={"embed_dim": 32, "custom_text": True, "vision_cfg": coca_vision,
                          "text_cfg": dict(CLIP_TEXT, embed_cls=True, output_tokens=True),
                          "multimodal_cfg": dict(CLIP_TEXT, layers=1, attn_pooler_heads=2)},
                     family="softmax", exact_trim=False, lora={}),
        "xlmr": dict(cfg={"embed_dim": 32, "vision_cfg": CLIP_VISION,
                          "text_cfg": {"hf_model_name": str(build_xlmr_dir(tmp / "xlmr")),
                                       "hf_tokenizer_name": str(tmp / "xlmr"), "hf_pooler_type": "mean_pooler",
                                       "hf_proj_type": "linear", "context_length": 24}},
                     family="softmax", exact_trim=False, lora={}),
        "worldwide": dict(cfg={"embed_dim": 32, "vision_cfg": CLIP_VISION,
                               "text_cfg": dict(CLIP_TEXT, vocab_size=vocab, hf_tokenizer_name=str(tok_dir),
                                                pool_type="eos", eos_id=2)},
                          family="softmax", exact_trim=True, lora={}),
    }
