"""LoRA: exactly the adapters train, every adapter gets a gradient, merging is exact, the wrapper is
numerically the same attention as nn.MultiheadAttention and as a hand-written attention with weights
W + (alpha / r) B A, and the published parameter count for ViT-B/32 holds."""
import copy
import math

import pytest
import torch
from torch import nn

from cultureclip import CultureCLIP
from cultureclip.lora import LoRAMultiheadAttention
from conftest import TINY_RESNET, TINY_VIT, randomize_lora

TEXTS = ["a red qipao with a mandarin collar", "a kimono with an obi sash", "erhu"]


def _inputs(model, n=3, seed=0):
    size = model.model_cfg["vision_cfg"]["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_only_adapters_train_and_all_get_gradients(cfg):
    torch.manual_seed(0)
    model = CultureCLIP.from_config(cfg)
    n_trainable = model.add_lora(r=4, alpha=16, dropout=0.1, targets="qv")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert n_trainable == sum(p.numel() for p in trainable.values())
    randomize_lora(model)  # with B = 0 the gradient of A is exactly zero
    model.train()
    img = model.encode_image(_inputs(model))
    txt = model.encode_text(TEXTS)
    (img @ txt.T).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_published_parameter_count_vit_b32():
    # CultureCLIP reports ~246k trainable parameters for r=4 on q and v of every layer of both towers of
    # ViT-B/32. Built on the meta device: shapes only, no memory, no weight initialisation.
    with torch.device("meta"):
        model = CultureCLIP.from_pretrained("ViT-B-32-quickgelu", pretrained=None, device="meta")
    assert model.add_lora(r=4, alpha=16, dropout=0.1, targets="qv") == 12 * 2 * 4 * (768 * 2) + 12 * 2 * 4 * (512 * 2)
    assert 12 * 2 * 4 * (768 * 2) + 12 * 2 * 4 * (512 * 2) == 245_760


def test_targets_layers_towers_select_what_they_say(tiny_model):
    n = tiny_model.add_lora(r=2, targets="qkvo", towers=("text",), layers=[1])
    names = [k for k, p in tiny_model.named_parameters() if p.requires_grad]
    assert all(k.startswith("model.transformer.resblocks.1.attn.lora.") for k in names)
    assert sorted({k.split(".lora.")[1].split(".")[0] for k in names}) == sorted("qkvo")
    assert n == 4 * 2 * (64 + 64)


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": "qx"}, "targets"), ({"layers": [7]}, "layers"), ({"towers": ("audio",)}, "towers"),
    ({"r": 0}, "rank"),
])
def test_bad_lora_arguments_raise(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.add_lora(**kwargs)


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_lora_starts_as_identity_and_merge_is_exact(cfg):
    torch.manual_seed(0)
    model = CultureCLIP.from_config(cfg).eval()
    x = _inputs(model)
    base_img, base_txt = model.encode_image(x), model.encode_text(TEXTS)
    model.add_lora(r=4, alpha=16, dropout=0.1, targets="qkvo")
    model.eval()
    torch.testing.assert_close(model.encode_image(x), base_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_text(TEXTS), base_txt, atol=1e-5, rtol=1e-5)
    randomize_lora(model)
    lora_img, lora_txt = model.encode_image(x), model.encode_text(TEXTS)
    assert (lora_img - base_img).abs().max() > 1e-3  # the adapters do something
    assert model.merge_lora() > 0 and not model.has_lora
    assert not any(".lora." in k for k in model.state_dict())
    torch.testing.assert_close(model.encode_image(x), lora_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_text(TEXTS), lora_txt, atol=1e-5, rtol=1e-5)
    # the merged model is plain open_clip again: its own state dict loads into a fresh open_clip model
    fresh = CultureCLIP.from_config(cfg).eval()
    fresh.model.load_state_dict(model.model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.encode_image(x), lora_img, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_wrapper_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ref = copy.deepcopy(mha)
    wrapper = LoRAMultiheadAttention(mha, "qv", r=2, alpha=4, dropout=0.0).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": pad}, {"attn_mask": causal.isinf()}):
        expected = ref(x, x, x, need_weights=False, **kwargs)[0]
        got = wrapper(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _reference_attention(mha, deltas, x, attn_mask=None, key_padding_mask=None):
    """Attention written out by hand on batch-first ``x [B, L, D]``, with every projection weight replaced
    by ``W + (alpha / r) B A`` (``deltas``: name in "qkvo" -> (A [r, D], B [D, r], alpha / r))."""
    d, h = mha.embed_dim, mha.num_heads
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    for name, (a, b, scale) in deltas.items():
        i = "qkv".find(name)  # -1 for "o"
        w, rows = (w_out, slice(None)) if name == "o" else (w_in, slice(i * d, (i + 1) * d))
        w[rows] += scale * b @ a
    proj = x @ w_in.T + mha.in_proj_bias  # [B, L, 3D]
    # [B, L, D] -> [B, H, L, hd] each
    q, k, v = (t.reshape(x.shape[0], x.shape[1], h, d // h).transpose(1, 2) for t in proj.chunk(3, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # [B, H, L, L]
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)  # [B, L, D]
    return out @ w_out.T + mha.out_proj.bias


@pytest.mark.parametrize("batch_first", [True, False])
def test_wrapper_with_adapters_matches_hand_written_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    wrapper = LoRAMultiheadAttention(copy.deepcopy(mha), "qkvo", r=2, alpha=6, dropout=0.5).eval()
    randomize_lora(wrapper)
    deltas = {n: (a.lora_A.detach(), a.lora_B.detach(), 6 / 2) for n, a in wrapper.lora.items()}
    x = torch.randn(3, 7, 32)  # [B, L, D]
    causal = torch.full((7, 7), float("-inf")).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": causal.isinf()}, {"key_padding_mask": pad}):
        expected = _reference_attention(mha, deltas, x, **kwargs)
        inp = x if batch_first else x.transpose(0, 1)  # [L, B, D]
        got = wrapper(inp, inp, inp, need_weights=False, **kwargs)[0]
        got = got if batch_first else got.transpose(0, 1)
        assert (expected - _reference_attention(mha, {}, x, **kwargs)).abs().max() > 1e-2  # adapters matter
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adapter_dropout_is_on_the_input_and_only_in_training(tiny_model):
    tiny_model.add_lora(r=4, dropout=0.5)
    randomize_lora(tiny_model)
    x = _inputs(tiny_model)
    no_dropout = copy.deepcopy(tiny_model)
    for module in no_dropout.modules():
        if hasattr(module, "lora_A"):
            module.dropout = nn.Identity()
    tiny_model.eval()
    torch.testing.assert_close(tiny_model.encode_image(x), no_dropout.eval().encode_image(x), atol=0, rtol=0)
    tiny_model.train()
    torch.manual_seed(1)
    a = tiny_model.encode_image(x)
    torch.manual_seed(2)
    b = tiny_model.encode_image(x)
    assert (a - b).abs().max() > 1e-4


def test_lock_tower_for_full_finetune(tiny_model):
    tiny_model.lock(image=True)
    assert not any(p.requires_grad for p in tiny_model.model.visual.parameters())
    assert all(p.requires_grad for p in tiny_model.model.transformer.parameters())


def test_siglip2_architecture_takes_lora_on_both_towers():
    # the released ViT-B-16-SigLIP2 (timm image tower with fused qkv, native non-causal text tower), shapes only
    import open_clip
    from cultureclip.lora import add_lora
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16-SigLIP2", pretrained=None, device="meta")
    wrapped = add_lora({"image": model.visual, "text": model.text}, r=4, targets="qv")
    n = sum(p.numel() for w in wrapped for p in w.lora.parameters())
    assert n == 2 * 12 * 2 * 4 * (768 + 768)  # towers x layers x (q, v) x r x (in + out)
    image_sites = [w for w in wrapped if any(w is m for m in model.visual.modules())]
    assert len(image_sites) == 12 and all(sorted(w.lora) == ["q", "v"] for w in image_sites)


def test_fused_qkv_adapter_equals_the_linear_with_hand_merged_weight():
    from cultureclip.lora_linear import LoRALinear
    torch.manual_seed(0)
    qkv = nn.Linear(8, 24)
    rows = {"q": slice(0, 8), "v": slice(16, 24)}
    wrapper = LoRALinear(copy.deepcopy(qkv), rows, r=2, alpha=6, dropout=0.0)
    randomize_lora(wrapper)
    w = qkv.weight.detach().clone()
    for name, s in rows.items():
        a, b = wrapper.lora[name].lora_A.detach(), wrapper.lora[name].lora_B.detach()
        w[s] += 3.0 * b @ a  # alpha / r = 3
    x = torch.randn(5, 3, 8)
    expected = x @ w.T + qkv.bias.detach()
    torch.testing.assert_close(wrapper(x), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(wrapper(x)[..., 8:16], qkv(x)[..., 8:16])  # the k slice is untouched
    assert set(wrapper.state_dict()) >= {"weight", "bias"}  # the base weights keep their names
    merged = wrapper.merged_original()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-6, rtol=1e-5)


def test_a_tower_without_attention_asks_for_mlp():
    import open_clip
    from cultureclip.lora import add_lora
    with torch.device("meta"):
        model = open_clip.create_model("convnext_base", pretrained=None, device="meta")
    with pytest.raises(ValueError, match="lora.mlp: true"):
        add_lora({"image": model.visual}, targets="qv")
    assert add_lora({"image": model.visual}, targets="qv", mlp=True)


def test_hugging_face_text_towers_expose_their_q_v_and_mlp_sites():
    # the encoders open_clip's HF text towers wrap: mT5 (q/k/v/o, wi/wo) and NLLB's M2M100 (q_proj/v_proj, fc1/fc2)
    from transformers import M2M100Config, MT5Config, MT5EncoderModel
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
    from cultureclip.lora_linear import linear_sites
    mt5 = MT5EncoderModel(MT5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    nllb = M2M100Encoder(M2M100Config(vocab_size=100, d_model=16, encoder_layers=2, encoder_attention_heads=2,
                                      encoder_ffn_dim=32))
    for tower, mlp_names in ((mt5, {"wi_0", "wi_1", "wo"}), (nllb, {"fc1", "fc2"})):
        sites = {(attr, index): sorted(rows) for _, attr, index, rows in linear_sites(tower, "qv", mlp=True)}
        attention = {k: v for k, v in sites.items() if v != ["mlp"]}
        assert sorted(v[0] for v in attention.values()) == ["q", "q", "v", "v"]  # 2 layers x (q, v)
        assert {a for a, _ in sites if sites[(a, _)] == ["mlp"]} == mlp_names
        assert linear_sites(tower, "qv", mlp=False)  # attention without MLPs too
