"""One tiny random model per open_clip family (tests/family_zoo.py), offline: the loss family the model
gets, LoRA on its attention (timm fused qkv, Hugging Face q/v projections, native blocks, MLPs),
merged == unmerged, save -> plain open_clip ``local-dir:`` reload with the same features, exact text
trimming where it applies, and a few training steps on the toy set with no unused trainable parameter."""
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cultureclip import CultureCLIP
from cultureclip.eval import tasks
from cultureclip.lit_module import CultureCLIPModule
from cultureclip.loss import CultureCLIPLoss
from cultureclip.optim import adamw
import family_zoo
from conftest import randomize_lora
from test_families import fit

FAMILIES = ["clip_vit", "convnext", "siglip", "siglip2", "pe_core", "eva02", "mobileclip2", "coca", "xlmr",
            "worldwide"]
HEAVY = {"mobileclip2", "coca", "convnext"}  # seconds to build or step on 2 cores: the slow set
# training rows take 1-4 s each: these run in the fast set (a sigmoid model under LoRA, a Hugging Face text
# tower in full, a native tower with a Hugging Face tokenizer), every other row in the slow set
FAST_TRAINING = {("siglip2", "lora"), ("xlmr", "full"), ("worldwide", "lora")}
TEXTS = ["a hanbok with a long bow-tied chest ribbon", "한복", "a kimono at a Kyoto shrine", "旗袍 qipao"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return family_zoo.configs(tmp_path_factory.mktemp("zoo"))


def _rows(heavy_slow=True):
    return [pytest.param(f, marks=pytest.mark.slow) if heavy_slow and f in HEAVY else f for f in FAMILIES]


def _build(zoo, family):
    torch.manual_seed(0)
    return CultureCLIP.from_config(zoo[family]["cfg"], name=f"tiny-{family}")


def _pixels(model, n=3):
    size = model.model_cfg["vision_cfg"]["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _features(model, x):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(TEXTS)


@pytest.mark.parametrize("family", _rows())
def test_lora_merge_save_and_plain_open_clip_reload(zoo, family, tmp_path):
    spec = zoo[family]
    model = _build(zoo, family).eval()
    assert (model.logit_bias is not None) == (spec["family"] == "sigmoid")
    assert model.supports_short_context == spec["exact_trim"]
    x = _pixels(model)
    base_img, base_txt = _features(model, x)
    model.add_lora(r=2, alpha=4, dropout=0.0, targets="qv", **spec["lora"])
    counts = model.trainable_by_tower()
    assert counts["image"] > 0 and counts["text"] > 0 and counts["other"] == 0
    randomize_lora(model)
    # every adapter is on the forward path: it gets a gradient (a bypassed wrapper would get none)
    model.train()
    img, txt = model.encode_image(x), model.encode_text(TEXTS)
    (img @ txt.T).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead
    model.eval()
    lora_img, lora_txt = _features(model, x)
    # (ConvNeXt's layer scale starts at 1e-6, so its image features move by ~1e-7 only)
    assert (lora_img - base_img).abs().max() > 0 and (lora_txt - base_txt).abs().max() > 1e-3
    if spec["exact_trim"]:  # trimmed token batches give the features of the full context
        model.trim_text = False
        torch.testing.assert_close(_features(model, x)[1], lora_txt, atol=1e-5, rtol=1e-5)
        model.trim_text = True
    out = model.save_pretrained(tmp_path / "model")  # merges a copy
    # plain open_clip: model and tokenizer from the folder alone
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    plain.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        plain_img = F.normalize(plain.encode_image(x), dim=-1)
        plain_txt = F.normalize(plain.encode_text(tok(TEXTS)), dim=-1)
    torch.testing.assert_close(plain_img, lora_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_txt, lora_txt, atol=1e-5, rtol=1e-5)
    assert model.merge_lora() > 0
    torch.testing.assert_close(_features(model, x)[0], lora_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_features(model, x)[1], lora_txt, atol=1e-5, rtol=1e-5)
    # ours reloads from the folder wherever it is moved (the HF text config and tokenizer travel with it)
    moved = shutil.move(str(out), str(tmp_path / "moved"))
    again = CultureCLIP.from_pretrained(moved).eval()
    assert type(again.tokenizer) is type(model.tokenizer)
    torch.testing.assert_close(_features(again, x)[1], lora_txt, atol=1e-5, rtol=1e-5)


def _batch_loss(module, batch):
    # in training mode, what the steps optimise: BatchNorm (FastViT) uses the batch's
    # statistics, not running statistics that a few steps barely estimate; a fixed seed fixes dropout masks
    module.encoder.train()
    torch.manual_seed(0)
    with torch.no_grad():
        feats = module.encode(batch, module.loss.required_keys)
        return float(module.loss(feats, *module.temperature())["loss"])


@pytest.mark.parametrize("family, mode", [
    pytest.param(f, m, marks=() if (f, m) in FAST_TRAINING else pytest.mark.slow) for f in FAMILIES
    for m in ("lora", "full")])
def test_trains_on_toy_twins_with_its_loss_family(zoo, family, mode, toy_shards):
    from cultureclip.data.datamodule import TwinDataModule
    spec = zoo[family]
    model = _build(zoo, family)
    if mode == "lora":
        model.add_lora(r=4, **spec["lora"])
    dm = TwinDataModule(model.data_spec(), f"{toy_shards}/train", f"{toy_shards}/val", batch_size=6, num_workers=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [next(loader), next(loader)]
    module = CultureCLIPModule(model, CultureCLIPLoss("cultureclip"), val_concepts=dm.val_concepts,
                               optimizer=lambda params: adamw(params, lr=1e-2 if mode == "lora" else 1e-3))
    assert module.loss.family == spec["family"]
    before = _batch_loss(module, batches[0])
    fit(module, batches * 3)  # the first step checks that every trainable parameter got a gradient
    assert _batch_loss(module, batches[0]) < before
    metrics, header, _ = tasks.twins(model, f"{toy_shards}/val", batch_size=32, amp=False)  # zero-shot + retrieval
    assert header["n"] > 0 and 0.0 <= metrics["twin_acc"] <= 1.0


def test_coca_decoder_is_frozen_with_a_log_line_and_unused_parameters_are_named(zoo, caplog):
    model = _build(zoo, "coca")
    with caplog.at_level("INFO", logger="cultureclip"):
        module = CultureCLIPModule(model, CultureCLIPLoss("clip"), optimizer=None)
    assert "text decoder is frozen" in caplog.text
    assert not any(p.requires_grad for p in model.model.text_decoder.parameters())
    # a trainable parameter the loss never reaches is named at the first step, before DDP would fail
    model.model.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    model.requires_grad_(False)
    model.model.stray.requires_grad_(True)
    model.model.visual.conv1.requires_grad_(True)
    batch = {k: v for k, v in _toy_like_batch(model).items()}
    module.backward_over([batch], backward=torch.Tensor.backward)
    with pytest.raises(ValueError, match=r"1 trainable parameters got no gradient .*model\.stray"):
        module.check_gradients_reached()


def _toy_like_batch(model, b=2):
    from cultureclip import schema
    x = _pixels(model, b)
    out = {k: x for k in schema.IMAGE_KEYS}
    out.update({k: model.tokenize(TEXTS[:b]) for k in schema.TEXT_KEYS})
    return out
