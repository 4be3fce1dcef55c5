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


# ---------------------------------------------------------------------- concept dedup in the training step
def _twin_batch(model, b, seed):
    """A batch whose concept names repeat (3 distinct names over 2b concept rows) and whose captions do not."""
    from cultureclip import schema
    g = torch.Generator().manual_seed(seed)
    names = ["qipao", "hanbok", "ao dai"]
    batch = {k: torch.randn(b, 3, 32, 32, generator=g) for k in schema.IMAGE_KEYS}
    for k in schema.CAPTION_KEYS:
        batch[k] = model.tokenize([f"{k} photo {i} of a festival, seed {seed}" for i in range(b)])
    for j, k in enumerate(schema.CONCEPT_KEYS):
        batch[k] = model.tokenize([names[(i + j) % 3] for i in range(b)])
    return batch


def _step_grads(module, micro):
    module.encoder.zero_grad(set_to_none=True)
    out = module.backward_over(micro, backward=torch.Tensor.backward)
    return out, {n: p.grad.clone() for n, p in module.encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accum", [1, 2])
def test_concept_dedup_gives_the_gradient_of_encoding_every_copy(accum, monkeypatch):
    from cultureclip.lit_module import CultureCLIPModule
    from cultureclip.loss import CultureCLIPLoss
    # float64: the two paths sum the duplicates' gradients in another order, and in float32 that
    # rounding alone reaches ~2e-6 on gradients of size ~6; in float64 any difference left is a bug
    model = build().train().double()
    module = CultureCLIPModule(model, CultureCLIPLoss("cultureclip"), optimizer=None, accum_freq=accum)
    micro = [{k: v.double() if v.is_floating_point() else v for k, v in _twin_batch(model, 6, seed).items()}
             for seed in range(accum)]
    rows = []
    m = model.model
    handle = m.token_embedding.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    out, grads = _step_grads(module, micro)
    handle.remove()
    # per encode: captions (2 x 6 rows) then concepts (3 distinct of 12 rows)
    assert rows == [12, 3] * (2 * accum if accum > 1 else 1)
    plain = CultureCLIP.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts, dedup=False: plain(model, texts))  # every copy
    ref_out, ref = _step_grads(module, micro)
    torch.testing.assert_close(out["loss"], ref_out["loss"], atol=1e-6, rtol=0)
    assert grads.keys() == ref.keys() and "model.token_embedding.weight" in grads and "model.logit_scale" in grads
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=0, msg=name)


def test_dedup_of_strings_and_token_rows():
    from cultureclip.text_length import unique_texts
    model = build()
    texts = ["kimono", "sari", "kimono", "kilt", "sari"]
    unique, inverse = unique_texts(texts)
    assert unique == ["kimono", "sari", "kilt"] and inverse.tolist() == [0, 1, 0, 2, 1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(texts, dedup=True), model.encode_text(texts), atol=1e-6, rtol=0)
        tokens = model.tokenize(texts)
        torch.testing.assert_close(model.encode_text(tokens, dedup=True), model.encode_text(tokens), atol=1e-6, rtol=0)


def test_trimming_cuts_the_text_flops_to_the_formula():
    """The benchmark's FLOP counter sees the trimmed length: a transformer layer costs
    ``24 N L W^2 + 4 N L^2 W`` (qkv, out, 4x MLP; QK^T and AV), plus ``2 N W D`` for the projection."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from flop_count import count_flops
    model = build()
    tokens = model.tokenize(TEXTS)
    n, w, layers, d = tokens.shape[0], 64, 2, 32
    for trim, length in ((True, int(tokens.argmax(dim=-1).max()) + 1), (False, tokens.shape[1])):
        model.trim_text = trim
        with torch.no_grad():
            flops = count_flops(lambda: model.encode_text(tokens))
        assert flops == layers * (24 * n * length * w * w + 4 * n * length ** 2 * w) + 2 * n * w * d, trim


def test_embed_texts_dedups_sorts_and_keeps_order(monkeypatch):
    """Against encoding each text alone at the full context: same features, in input order, for
    duplicates, several sort chunks and batches of mixed lengths."""
    from cultureclip.eval import embed
    model = build()
    texts = TEXTS + ["kimono", TEXTS[1], "a sari", "qipao"]
    monkeypatch.setattr(embed, "SORT_CHUNK", 3)
    calls = []
    handle = model.model.token_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    got = embed.embed_texts(model, texts, batch_size=2)
    handle.remove()
    assert sum(calls) == len(set(texts))  # 5 distinct of 8
    expected = torch.cat([reference(model, model.tokenize([t])) for t in texts])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
