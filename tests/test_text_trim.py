"""Exact length trimming of token batches (cultureclip.text_length): exact where enabled, off where not.

Each case builds a tiny random text tower from an open_clip config (pool type, causal mask, built-in
``CLIP`` text or ``CustomTextCLIP``'s ``TextTransformer``) and compares ``CultureCLIP.encode_text``
with plain open_clip's full-context ``encode_text``.
"""
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

from cultureclip import CultureCLIP
from cultureclip.text_length import encode_prefix, pooled_positions, trim_plan
from conftest import TINY_VIT

TEXTS = ["qipao", "a hanbok worn at a wedding in Seoul, photographed from the side", "ao dai", "kimono"]
EOT = 49407  # the CLIP tokenizer's end-of-text id, also the largest id


def build(seed=0, custom_text=False, **text_cfg):
    cfg = deepcopy(TINY_VIT)
    cfg["vision_cfg"].update(layers=1, width=32, head_width=16)  # the image tower is not under test
    cfg["text_cfg"].update(text_cfg)
    if custom_text:
        cfg["custom_text"] = True
    torch.manual_seed(seed)
    return CultureCLIP.from_config(cfg, name="trim-test").eval()


def reference(model, tokens):
    """open_clip's own forward at the full context length, normalised."""
    with torch.no_grad():  # as input_lengths: autograd off selects the same attention kernels
        return F.normalize(model.model.encode_text(tokens), dim=-1)


def input_lengths(model, tokens):
    """Sequence lengths the text transformer saw while ``model.encode_text(tokens)`` ran."""
    seen = []
    m = model.model
    transformer = m.text.transformer if hasattr(m, "text") else m.transformer
    handle = transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            out = model.encode_text(tokens)
    finally:
        handle.remove()
    return out, seen


EXACT = {
    "argmax, causal (CLIP)": {},
    "eos, causal (CLIP)": {"pool_type": "eos", "eos_id": EOT},
    "argmax, causal (TextTransformer)": {"custom_text": True},
    "eos, causal, linear proj with bias (TextTransformer)": {"custom_text": True, "pool_type": "eos", "eos_id": EOT,
                                                              "proj_bias": True},
}


@pytest.mark.parametrize("case", list(EXACT))
def test_trimming_is_exact_where_enabled(case):
    model = build(**EXACT[case])
    tokens = model.tokenize(TEXTS)  # [4, 24]
    assert trim_plan(model.model) is not None and model.supports_short_context
    longest = int(pooled_positions(tokens, *trim_plan(model.model)).max()) + 1
    assert longest < tokens.shape[1]  # the case must actually trim
    out, seen = input_lengths(model, tokens)
    assert seen == [longest]
    torch.testing.assert_close(out, reference(model, tokens), atol=1e-6, rtol=0)
    # one short name alone: trimmed to its own length, same features as inside the batch
    out_one, seen_one = input_lengths(model, tokens[:1])
    assert seen_one == [int(pooled_positions(tokens[:1], *trim_plan(model.model))[0]) + 1]
    torch.testing.assert_close(out_one, out[:1], atol=1e-6, rtol=0)
    # rounding up to a multiple (the CUDA default) is exact as well
    model.text_length_multiple = 8
    out8, seen8 = input_lengths(model, tokens)
    assert seen8 == [-(-longest // 8) * 8]
    torch.testing.assert_close(out8, out, atol=1e-6, rtol=0)


def test_trimming_keeps_gradients():
    model = build().train()
    tokens = model.tokenize(TEXTS)
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for trim in (True, False):
        model.trim_text = trim
        model.zero_grad()
        (model.encode_text(tokens) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "model.token_embedding.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


NOT_EXACT = {
    "argmax, no causal mask (CLIP)": {"no_causal_mask": True},
    "argmax, no causal mask (TextTransformer)": {"custom_text": True, "no_causal_mask": True},
    "last, causal (CLIP)": {"pool_type": "last"},
    "last, causal (TextTransformer)": {"custom_text": True, "pool_type": "last"},
    "first, causal (CLIP)": {"pool_type": "first"},
}


@pytest.mark.parametrize("case", list(NOT_EXACT))
def test_trimming_is_off_where_not_exact(case):
    model = build(**NOT_EXACT[case])
    tokens = model.tokenize(TEXTS)
    assert trim_plan(model.model) is None and not model.supports_short_context
    out, seen = input_lengths(model, tokens)
    assert seen == [tokens.shape[1]]  # the full context
    torch.testing.assert_close(out, reference(model, tokens), atol=0, rtol=0)
    with pytest.raises(ValueError, match="full context length"):
        model.encode_text(tokens[:, :16])


@pytest.mark.parametrize("case", ["argmax, no causal mask (TextTransformer)", "last, causal (CLIP)",
                                  "last, causal (TextTransformer)"])
def test_trimming_would_change_features_where_off(case):
    """The switch matters: cutting the padding of these towers changes their features."""
    model = build(**NOT_EXACT[case])
    tokens = model.tokenize(TEXTS)
    n = int(tokens.argmax(dim=-1).max()) + 1
    with torch.no_grad():
        if NOT_EXACT[case].get("no_causal_mask"):
            cut = model.model.encode_text(tokens[:, :n])  # TextTransformer slices its positions itself
        else:
            cut = encode_prefix(model.model, tokens[:, :n])  # what trimming would compute
    diff = (F.normalize(cut, dim=-1) - reference(model, tokens)).abs().max()
    assert diff > 1e-3


def test_switch_off_encodes_full_context():
    model = build()
    tokens = model.tokenize(TEXTS)
    model.trim_text = False
    out, seen = input_lengths(model, tokens)
    assert seen == [tokens.shape[1]]
    torch.testing.assert_close(out, reference(model, tokens), atol=0, rtol=0)
