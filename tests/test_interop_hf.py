"""transformers <-> open_clip conversion and PEFT LoRA merging (cultureclip.interop), checked against
transformers' and PEFT's own forward passes on random-init tiny models (no download)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_RESNET, TINY_VIT, randomize_lora

transformers = pytest.importorskip("transformers")
from cultureclip import CultureCLIP  # noqa: E402
from cultureclip.interop.hf_convert import ConversionError  # noqa: E402
from cultureclip.interop.peft_merge import AdapterMismatchError  # noqa: E402

REPO = Path(__file__).parents[1]
TEXTS = ["a red lantern", "two steamed dumplings on a bamboo plate", "x", "a photo of a kimono at a festival"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_hf_config(act="quick_gelu", eos=49407, **vision):
    v = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8, hidden_act=act)
    v.update(vision)
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20, hidden_act=act, eos_token_id=eos),
        vision_config=v, projection_dim=24)


def save_hf(path, config, seed=0, processor=True):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.save_pretrained(path)
    if processor:
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_mean=MEAN, image_std=STD).save_pretrained(path)
    return model


def hf_features(model, pixels, tokens):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens)
    unwrap = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output  # noqa: E731  (transformers 5)
    return F.normalize(unwrap(img), dim=-1), F.normalize(unwrap(txt), dim=-1)


def our_features(model, pixels, tokens):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.model_cfg["vision_cfg"]["image_size"]
    tokens = model.tokenize(TEXTS)
    # random ids too, with the end-of-text id in the middle and ids above it absent/present
    rand = torch.randint(1, 49406, (3, model.context_length), generator=g)
    rand[0, 5], rand[1, -1], rand[2, 3] = 49407, 49407, 49407
    rand[2, 9] = 49407
    return torch.randn(3, 3, size, size, generator=g), torch.cat([tokens, rand])


def assert_features_equal(ours, ref, atol=1e-5):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() < atol, float((a - b).abs().max())


@pytest.mark.parametrize("act,eos", [("quick_gelu", 49407), ("gelu", 2)])
def test_transformers_to_open_clip_exact(tmp_path, act, eos):
    hf = save_hf(tmp_path, tiny_hf_config(act, eos))
    ours = CultureCLIP.from_pretrained(f"hf-transformers:{tmp_path}")
    assert ours.model_cfg.get("quick_gelu", False) == (act == "quick_gelu")
    # the pooling rule follows transformers': argmax of ids for eos_token_id 2, first eos_token_id otherwise
    assert ours.model_cfg["text_cfg"].get("pool_type", "argmax") == ("argmax" if eos == 2 else "eos")
    pixels, tokens = inputs(ours)
    assert_features_equal(our_features(ours, pixels, tokens), hf_features(hf, pixels, tokens))
    assert torch.equal(ours.logit_scale.detach(), hf.logit_scale.detach())
    # tokenizer and preprocessing carried over
    assert ours.context_length == 20 and ours.tokenize("a cat").shape == (1, 20)
    norm = ours.preprocess_val.transforms[-1]
    assert list(norm.mean) == MEAN and list(norm.std) == STD


def test_fused_attention_rule(tmp_path):
    """The q/k/v thirds of in_proj are transformers' q_proj/k_proj/v_proj, in that order."""
    hf = save_hf(tmp_path, tiny_hf_config())
    ours = CultureCLIP.from_pretrained(f"hf-transformers:{tmp_path}")
    attn = ours.model.visual.transformer.resblocks[1].attn
    layer = hf.vision_model.encoder.layers[1].self_attn
    expected = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    assert torch.equal(attn.in_proj_weight, expected)
    assert torch.equal(ours.model.text_projection, hf.text_projection.weight.t())


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_to_transformers_exact(tmp_path, quick_gelu):
    cfg = dict(TINY_VIT, quick_gelu=True) if quick_gelu else TINY_VIT
    torch.manual_seed(0)
    ours = CultureCLIP.from_config(cfg, name="tiny-vit", preprocess_cfg={"mean": MEAN, "std": STD})
    if quick_gelu:  # unmerged adapters, in training mode: the export merges a copy, dropout plays no part
        ours.add_lora(r=2, alpha=4, dropout=0.5)
        randomize_lora(ours)
        ours.train()
    ours.save_pretrained(tmp_path / "hf", format="transformers")
    assert ours.has_lora == quick_gelu  # the model itself keeps its adapters
    ours.eval()
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    pixels, tokens = inputs(ours)
    assert_features_equal(our_features(ours, pixels, tokens), hf_features(hf, pixels, tokens))
    # and back: the same architecture and exactly the same tensors
    back = CultureCLIP.from_pretrained(f"hf-transformers:{tmp_path / 'hf'}")
    assert back.model_cfg == cfg
    if quick_gelu:
        ours.merge_lora()
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    if quick_gelu:  # the tokenizer and processor files do not depend on the activation: checked once
        return
    # the exported tokenizer produces open_clip's ids; the image processor has our settings
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(TEXTS, padding="max_length", max_length=ours.context_length, return_tensors="pt")["input_ids"]
    ids = torch.where(ids == tok.pad_token_id, 0, ids)  # transformers pads with end-of-text, open_clip with 0
    ids[torch.arange(len(TEXTS)), (ours.tokenize(TEXTS) == 49407).int().argmax(-1)] = 49407
    assert torch.equal(ids, ours.tokenize(TEXTS))
    pp = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pp["image_mean"] == MEAN and pp["crop_size"] == {"height": 32, "width": 32}


def test_unsupported_models_are_refused(tmp_path):
    with pytest.raises(ConversionError, match="vision_config.hidden_act"):
        CultureCLIP.from_pretrained(f"hf-transformers:{_saved(tmp_path / 'a', tiny_hf_config(hidden_act='gelu_new'))}")
    with pytest.raises(ConversionError, match="layer_norm_eps"):
        CultureCLIP.from_pretrained(f"hf-transformers:{_saved(tmp_path / 'b', tiny_hf_config(layer_norm_eps=1e-6))}")
    # another tokenizer vocabulary (two tokens swapped): open_clip would encode text differently
    from cultureclip.interop.hf_io import clip_bpe_vocab
    vocab = dict(clip_bpe_vocab()[0])
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    path = _saved(tmp_path / "v", tiny_hf_config())
    (path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConversionError, match="cat</w>"):
        CultureCLIP.from_pretrained(f"hf-transformers:{path}")
    with pytest.raises(ConversionError, match="VisionTransformer"):
        CultureCLIP.from_config(TINY_RESNET).save_pretrained(tmp_path / "c", format="transformers")
    assert not (tmp_path / "c" / "config.json").exists()
    with pytest.raises(ValueError, match="format"):
        CultureCLIP.from_config(TINY_VIT).save_pretrained(tmp_path / "d", format="onnx")


def _saved(path, config):
    save_hf(path, config, processor=False)
    return path


# ---------------------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


def make_adapter(base_dir, out, targets, r=4, alpha=8, rslora=False, seed=0, **lora_kw):
    """A PEFT LoRA adapter with random B (B starts at zero), and PEFT's own merged model."""
    base = transformers.CLIPModel.from_pretrained(base_dir).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                   use_rslora=rslora, lora_dropout=0.0, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero (no change); A too, so every entry of the update is random
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip-tiny-base")
    save_hf(path, tiny_hf_config())
    return path


@pytest.mark.parametrize("targets,rslora,patterns", [
    (["q_proj", "v_proj"], False, {}),
    (["self_attn.out_proj", "mlp.fc1", "vision_model.encoder.layers.0.self_attn.k_proj"], False, {}),  # dotted
    (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "visual_projection", "text_projection"], True,
     {"rank_pattern": {"fc1": 2}, "alpha_pattern": {"text_model.encoder.layers.1.self_attn.q_proj": 5}})])
def test_peft_adapter_merge_matches_peft(tmp_path, hf_base, targets, rslora, patterns):
    merged = make_adapter(hf_base, tmp_path / "adapter", targets, r=4, alpha=12, rslora=rslora, **patterns)
    ours = CultureCLIP.from_pretrained(f"hf-transformers:{hf_base}", adapter=tmp_path / "adapter")
    base = CultureCLIP.from_pretrained(f"hf-transformers:{hf_base}")
    pixels, tokens = inputs(ours)
    got, ref = our_features(ours, pixels, tokens), hf_features(merged, pixels, tokens)
    assert_features_equal(got, ref)
    assert (our_features(base, pixels, tokens)[1] - ref[1]).abs().max() > 1e-3  # the adapter does change things


def test_import_tool_writes_open_clip_folder(tmp_path, hf_base):
    import open_clip
    merged = make_adapter(hf_base, tmp_path / "adapter", ["q_proj", "v_proj"], seed=3)
    spec = importlib.util.spec_from_file_location("import_hf", REPO / "tools" / "import_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(hf_base), str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")  # plain open_clip
    pixels, tokens = inputs(CultureCLIP.from_pretrained(tmp_path / "out"))
    with torch.no_grad():
        got = (model.eval().encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True))
    assert_features_equal(got, hf_features(merged, pixels, tokens))
    # a refusal is exit status 1 with the message, not a traceback
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "openai/clip-vit-large-patch14"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert tool.main([str(hf_base), str(tmp_path / "adapter"), "--out", str(tmp_path / "out2")]) == 1
    assert not (tmp_path / "out2").exists()


def _edit_config(adapter, **changes):
    path = Path(adapter) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_mismatched_adapters_are_refused(tmp_path, hf_base):
    adapter = tmp_path / "adapter"
    make_adapter(hf_base, adapter, ["q_proj", "v_proj"])

    def load(base=hf_base):
        return CultureCLIP.from_pretrained(f"hf-transformers:{base}", adapter=adapter)

    _edit_config(adapter, base_model_name_or_path="openai/clip-vit-large-patch14")
    with pytest.raises(AdapterMismatchError, match="clip-vit-large-patch14"):
        load()
    # another model of the same name but another size: the shape check names the module
    other = tmp_path / hf_base.name
    save_hf(other, tiny_hf_config(hidden_size=32, intermediate_size=128), processor=False)
    _edit_config(adapter, base_model_name_or_path=str(hf_base))
    with pytest.raises(AdapterMismatchError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.[qv]_proj.*32, 32"):
        load(base=other)
    with pytest.raises(AdapterMismatchError, match="v_proj"):  # the file holds v_proj weights not listed
        _edit_config(adapter, target_modules=["q_proj"])
        load()
    with pytest.raises(AdapterMismatchError, match=r"\['w_proj'\] match no module"):
        _edit_config(adapter, target_modules=["q_proj", "v_proj", "w_proj"])
        load()
    with pytest.raises(AdapterMismatchError, match=r"\['mlp\.q_proj'\] match no module"):  # a dotted entry: whole components
        _edit_config(adapter, target_modules=["self_attn.q_proj", "v_proj", "mlp.q_proj"])
        load()
    with pytest.raises(AdapterMismatchError, match="not covered by target_modules"):  # "attn.q_proj" is no suffix
        _edit_config(adapter, target_modules=["attn.q_proj", "v_proj"])  # of whole components of self_attn.q_proj
        load()
    with pytest.raises(AdapterMismatchError, match="use_dora"):
        _edit_config(adapter, target_modules=["q_proj", "v_proj"], use_dora=True)
        load()
    with pytest.raises(AdapterMismatchError, match="r=8"):
        _edit_config(adapter, use_dora=False, r=8)
        load()


def test_transformers_pipeline_runs_our_export(tmp_path, tiny_model):
    """transformers' zero-shot pipeline on our export ranks labels as we do, with the same probabilities."""
    import numpy as np
    from PIL import Image
    with torch.no_grad():
        tiny_model.logit_scale.fill_(4.0)  # sharper than the init so the ranking is not a near-tie
    tiny_model.save_pretrained(tmp_path / "hf", format="transformers")
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"), device="cpu")
    labels = ["lantern", "dumpling", "kimono", "temple gate", "tea bowl"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        got = pipe(image, candidate_labels=labels)  # template "This is a photo of {}."
        with torch.no_grad():
            img = tiny_model.encode_image(tiny_model.preprocess_val(image)[None])
            txt = tiny_model.encode_text([f"This is a photo of {c}." for c in labels])
            probs = (tiny_model.logit_scale.exp() * img @ txt.T).softmax(-1)[0]
        order = probs.argsort(descending=True).tolist()
        assert [g["label"] for g in got] == [labels[i] for i in order]
        assert np.allclose([g["score"] for g in got], probs[order].numpy(), atol=1e-4)


def test_preprocess_settings_carry_over(caplog):
    from cultureclip.interop.hf_io import hf_preprocessor_from_open_clip, preprocess_cfg_from_hf
    old_style = {"size": 224, "crop_size": 224, "resample": 2, "image_mean": MEAN, "image_std": STD}
    with caplog.at_level("WARNING", logger="cultureclip"):
        cfg = preprocess_cfg_from_hf(old_style, 224, "old")
    assert cfg == {"mean": MEAN, "std": STD, "interpolation": "bilinear", "resize_mode": "shortest"}
    assert not caplog.records
    for mode in ("shortest", "squash"):  # export then import gives the same settings back
        c = dict(cfg, resize_mode=mode)
        assert preprocess_cfg_from_hf(hf_preprocessor_from_open_clip(c, 64), 64, "rt") == c
    with caplog.at_level("WARNING", logger="cultureclip"):  # resize 256 then crop 224: not open_clip's
        preprocess_cfg_from_hf({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, 224, "p")
    assert "256" in caplog.text
    with pytest.raises(ConversionError, match="longest"):
        hf_preprocessor_from_open_clip(dict(cfg, resize_mode="longest"), 224)


@pytest.mark.parametrize("size,apart", [(224, False), (225, False), (226, False), (227, True), (229, False),
                                        (231, True)])
def test_the_two_centre_crops_differ_as_the_docs_say(size, apart):
    """docs/interop.md: torchvision's crop starts at round(margin / 2), transformers' at margin // 2, so
    the crops are one pixel apart exactly when the margin is 3 modulo 4."""
    import numpy as np
    from torchvision.transforms import CenterCrop
    from transformers.image_transforms import center_crop
    img = np.arange(size * size, dtype=np.float32).reshape(1, size, size)
    ours = CenterCrop(224)(torch.from_numpy(img)).numpy()
    theirs = center_crop(img, (224, 224), data_format="channels_first")
    assert (ours[0, 0, 0] != theirs[0, 0, 0]) == apart == ((size - 224) % 4 == 3)
    assert "3 modulo 4" in (REPO / "docs" / "interop.md").read_text()
