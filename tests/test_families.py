"""Temperature and bias per loss family: the family follows the model, a frozen scale or bias never
moves, a trained scale is clamped at max(ln 100, the starting value), probabilities use the bias."""
import logging
import math

import open_clip
import pytest
import torch

from cultureclip import CultureCLIP, schema
from cultureclip.eval.zeroshot import top_predictions
from cultureclip.lit_module import CultureCLIPModule
from cultureclip.loss import CultureCLIPLoss
from cultureclip.optim import adamw
from conftest import TINY_VIT

# a SigLIP-shaped model from native towers: learned bias, non-causal text tower with last-token pooling
TINY_SIGLIP = {
    "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": dict(TINY_VIT["vision_cfg"]),
    "text_cfg": dict(TINY_VIT["text_cfg"], no_causal_mask=True, pool_type="last", proj_bias=True),
}
SIGLIP_SCALE = 4.72  # released SigLIP models sit near exp(4.72) ~ 112, above CLIP's cap of 100


def _batches(model, n, b=3):
    size = model.model_cfg["vision_cfg"]["image_size"]
    words = ["qipao", "ao dai", "hanbok", "kimono", "sari", "kebaya"]
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        batch = {k: torch.randn(b, 3, size, size, generator=g) for k in schema.IMAGE_KEYS}
        for k in schema.TEXT_KEYS:
            idx = torch.randint(0, len(words), (b,), generator=g).tolist()
            batch[k] = model.tokenize([f"a {words[j]} {k}" for j in idx])
        out.append(batch)
    return out


def fit(module, batches):
    import lightning as L
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _siglip(scale=SIGLIP_SCALE):
    torch.manual_seed(0)
    model = CultureCLIP.from_config(TINY_SIGLIP, name="tiny-siglip")
    with torch.no_grad():
        model.logit_scale.fill_(scale)
    return model


def test_family_follows_the_model():
    siglip = _siglip()
    # the tokenizer follows the config, not the name: open_clip's name rule would pick SigLipTokenizer
    # (and fetch a SentencePiece model) for any name containing "siglip"
    assert type(siglip.tokenizer) is open_clip.tokenizer.SimpleTokenizer
    assert CultureCLIPModule(siglip, CultureCLIPLoss("clip"), optimizer=None).loss.family == "sigmoid"
    clip = CultureCLIP.from_config(TINY_VIT, name="tiny-vit")
    assert clip.logit_bias is None
    assert CultureCLIPModule(clip, CultureCLIPLoss("clip"), optimizer=None).loss.family == "softmax"


def test_frozen_scale_and_bias_never_move_under_lora():
    model = _siglip()
    model.add_lora(r=2, towers=("image", "text"))
    assert not model.logit_scale.requires_grad and not model.logit_bias.requires_grad
    bias0 = model.logit_bias.detach().clone()
    module = CultureCLIPModule(model, CultureCLIPLoss("cultureclip"), optimizer=lambda params: adamw(params, lr=1e-2))
    fit(module, _batches(model, 3))
    assert float(model.logit_scale) == float(torch.tensor(SIGLIP_SCALE))  # 4.72 stays 4.72, not ln 100
    assert torch.equal(model.logit_bias.detach(), bias0)


def test_trained_scale_is_clamped_at_the_base_value_not_below_and_bias_trains():
    model = _siglip()
    bias0 = float(model.logit_bias.detach())
    module = CultureCLIPModule(model, CultureCLIPLoss("caption_negclip"),
                               optimizer=lambda params: adamw(params, lr=1e-2))
    assert module.max_logit_scale == pytest.approx(SIGLIP_SCALE)
    fit(module, _batches(model, 3))
    assert math.log(100) < float(model.logit_scale) <= SIGLIP_SCALE + 1e-6
    assert float(model.logit_bias) != bias0  # the sigmoid loss uses the bias: it gets a gradient
    # a CLIP model starting below ln 100 keeps CLIP's cap
    clip = CultureCLIP.from_config(TINY_VIT, name="tiny-vit")
    assert CultureCLIPModule(clip, CultureCLIPLoss("clip"), optimizer=None).max_logit_scale == math.log(100)


def test_softmax_family_on_a_bias_model_freezes_the_bias(caplog):
    model = _siglip()
    with caplog.at_level(logging.INFO, logger="cultureclip"):
        CultureCLIPModule(model, CultureCLIPLoss("clip", family="softmax"), optimizer=None)
    assert not model.logit_bias.requires_grad
    assert "logit_bias" in caplog.text


def test_probabilities_use_the_bias():
    model = _siglip()
    cos = torch.tensor([[0.3, 0.1, -0.2], [0.05, 0.0, 0.2]])
    s, b = math.exp(SIGLIP_SCALE), float(model.logit_bias)
    expected = 1 / (1 + torch.exp(-(s * cos.double() + b)))
    torch.testing.assert_close(model.match_probabilities(cos).double(), expected, rtol=1e-5, atol=1e-7)
    probs, idx = top_predictions(cos, lambda c: model.match_probabilities(c, dim=1), k=2)
    assert idx.tolist() == [[0, 1], [2, 0]]  # ranking by cosine, unchanged by the bias
    torch.testing.assert_close(probs, expected.float().gather(1, idx))
    clip = CultureCLIP.from_config(TINY_VIT, name="tiny-vit")
    torch.testing.assert_close(clip.match_probabilities(cos), (clip.logit_scale.exp() * cos).softmax(-1).detach())
