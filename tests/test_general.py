"""Forgetting checks and WiSE-FT: ImageNet-style folders (wnid mapping), image-text retrieval recall
vs brute-force loops (Karpathy JSON and CSV), weight interpolation exactness and refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cultureclip import CultureCLIP
from cultureclip.eval.general import image_text_retrieval, imagenet_images, imagenet_zeroshot, retrieval_recalls
from cultureclip.eval.wiseft import interpolate, plot_tradeoff, sweep
from conftest import TINY_VIT

NAMES = ["tench", "goldfish", "great white shark"]


def save_image(path, seed, size=36):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def features(model, paths, texts):
    model.eval()
    with torch.no_grad():
        img = torch.cat([model.encode_image(model.preprocess_val(Image.open(p).convert("RGB"))[None])
                         for p in paths])
        txt = torch.cat([model.encode_text([t]) for t in texts]) if texts else None
    return img, txt


def brute_recalls(img, txt, owner, ks=(1, 5, 10)):
    """CLIP_benchmark's definition, one query at a time."""
    sims = img @ txt.T  # [I, T]
    out = {}
    for k in ks:
        i2t = [any(owner[t] == i for t in sims[i].argsort(descending=True)[:k].tolist()) for i in range(len(img))]
        t2i = [owner[t] in sims[:, t].argsort(descending=True)[:k].tolist() for t in range(len(txt))]
        out[f"i2t_recall@{k}"] = sum(i2t) / len(i2t)
        out[f"t2i_recall@{k}"] = sum(t2i) / len(t2i)
    return out


@pytest.fixture
def wnid_tree(tmp_path):
    root = tmp_path / "val"
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for i in range(2):
            save_image(root / wnid / f"ILSVRC_{c}_{i}.JPEG", 10 * c + i)
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\na bad photo of the {c}.\n")
    return root


def test_imagenet_wnid_folders(tiny_model, wnid_tree, tmp_path):
    classnames = NAMES
    sorted_order = imagenet_images(wnid_tree, classnames)
    assert sorted_order.labels == [0, 0, 1, 1, 2, 2]
    # a mapping file (LOC_synset_mapping.txt layout) overrides the sorted order
    (tmp_path / "map.txt").write_text("n01484850 great white shark\nn01440764 tench\nn01443537 goldfish\n")
    mapped = imagenet_images(wnid_tree, classnames, tmp_path / "map.txt")
    assert mapped.labels == [1, 1, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="pass a wnid mapping file"):
        imagenet_images(wnid_tree, classnames + ["tiger shark"])  # a subset: sorted order would shift labels

    metrics = imagenet_zeroshot(tiny_model, wnid_tree, tmp_path / "classes.txt", tmp_path / "templates.txt")
    img, _ = features(tiny_model, sorted_order.paths, [])
    with torch.no_grad():
        w = torch.stack([tiny_model.encode_text([f"a photo of a {c}.", f"a bad photo of the {c}."]).mean(0)
                         for c in NAMES])
    pred = (img @ torch.nn.functional.normalize(w, dim=-1).T).argmax(dim=1)
    labels = torch.tensor(sorted_order.labels)
    assert metrics["acc1"] == pytest.approx((pred == labels).double().mean().item())
    assert metrics["acc5"] == 1.0 and metrics["n"] == 6 and metrics["n_skipped"] == 0
    recall = np.mean([(pred[labels == c] == c).double().mean().item() for c in range(3)])
    assert metrics["mean_per_class_recall"] == pytest.approx(recall)


def test_retrieval_recalls_match_brute_force():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(17, 8, generator=g), dim=-1)
    owner = torch.randint(0, 7, (17,), generator=g)
    owner[:7] = torch.arange(7)  # every image has a caption
    got = retrieval_recalls(img, txt, owner, ks=(1, 3, 10))
    assert got == pytest.approx(brute_recalls(img, txt, owner.tolist(), ks=(1, 3, 10)))


@pytest.fixture
def caption_set(tmp_path):
    caps = {"a.png": ["a qipao", "a red dress"], "b.png": ["a hanbok", "a jeogori", "a skirt"],
            "c.png": ["an ao dai"], "d.png": ["a kimono", "an obi"]}
    for n, name in enumerate(caps):
        save_image(tmp_path / "imgs" / name, n)
    return caps


def test_image_text_retrieval_karpathy_json_and_csv(tiny_model, tmp_path, caption_set):
    entries = [{"filepath": "imgs", "filename": f, "split": "test", "sentences": [{"raw": c} for c in caps]}
               for f, caps in caption_set.items()]
    entries.append({"filepath": "imgs", "filename": "a.png", "split": "train", "sentences": [{"raw": "x"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    got = image_text_retrieval(tiny_model, tmp_path / "karpathy.json", batch_size=3)
    paths = [tmp_path / "imgs" / f for f in caption_set]
    texts = [c for caps in caption_set.values() for c in caps]
    owner = [i for i, caps in enumerate(caption_set.values()) for _ in caps]
    img, txt = features(tiny_model, paths, texts)
    expected = brute_recalls(img, txt, owner)
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert (got["n_images"], got["n_texts"], got["n_skipped"]) == (4, 8, 0)

    rows = "".join(f"imgs/{f},{c}\n" for f, caps in caption_set.items() for c in caps)
    (tmp_path / "captions.csv").write_text("image,caption\n" + rows)
    via_csv = image_text_retrieval(tiny_model, tmp_path / "captions.csv", split=None)
    assert via_csv == pytest.approx(got)

    # an undecodable image is dropped together with its captions
    (tmp_path / "imgs" / "c.png").write_bytes(b"garbage")
    skipped = image_text_retrieval(tiny_model, tmp_path / "captions.csv", split=None)
    assert (skipped["n_images"], skipped["n_texts"], skipped["n_skipped"]) == (3, 7, 1)
    keep = [0, 1, 3]
    kept_owner = [keep.index(o) for o in owner if o in keep]
    expected = brute_recalls(img[keep], txt[[t for t, o in enumerate(owner) if o in keep]], kept_owner)
    assert {k: skipped[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    (tmp_path / "bad.csv").write_text("image,caption\nimgs/a.png,\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: empty caption"):
        image_text_retrieval(tiny_model, tmp_path / "bad.csv")


@pytest.fixture
def two_models():
    torch.manual_seed(0)
    base = CultureCLIP.from_config(TINY_VIT, name="tiny-vit").eval()
    torch.manual_seed(1)
    finetuned = CultureCLIP.from_config(TINY_VIT, name="tiny-vit").eval()
    return base, finetuned


def test_wiseft_endpoints_are_exact_and_midpoint_is_average(two_models):
    base, finetuned = two_models
    x, texts = torch.randn(2, 3, 32, 32), ["a qipao", "a hanbok"]
    with torch.no_grad():
        for alpha, ref in ((0.0, base), (1.0, finetuned)):
            mixed = interpolate(base, finetuned, alpha).eval()
            assert torch.equal(mixed.encode_image(x), ref.encode_image(x))
            assert torch.equal(mixed.encode_text(texts), ref.encode_text(texts))
    mid = interpolate(base, finetuned, 0.5).model.state_dict()
    a, b = base.model.state_dict(), finetuned.model.state_dict()
    for k in a:
        torch.testing.assert_close(mid[k], (a[k] + b[k]) / 2, msg=k)
    assert not torch.equal(a["visual.conv1.weight"], mid["visual.conv1.weight"])  # inputs untouched, output new

    rows = sweep(base, finetuned, [0.0, 0.5, 1.0], lambda m: {"scale": m.logit_scale.item()})
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]


def test_plot_tradeoff_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"alpha": a, "acc1": 0.6 - a / 10, "twin_acc": 0.5 + a / 3} for a in (0, 0.5, 1)]
    path = plot_tradeoff(rows, "acc1", "twin_acc", tmp_path / "plots" / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="imagenet"):
        plot_tradeoff(rows, "imagenet", "twin_acc", tmp_path / "x.png")


def test_wiseft_refuses_mismatched_models(two_models):
    base, finetuned = two_models
    wider = dict(TINY_VIT, embed_dim=16)
    with pytest.raises(ValueError, match="different architectures.*embed_dim"):
        interpolate(base, CultureCLIP.from_config(wider, name="tiny-16"), 0.5)
    finetuned.add_lora(r=2)
    with pytest.raises(ValueError, match="finetuned model has LoRA.*merge_lora"):
        interpolate(base, finetuned, 0.5)
    finetuned.merge_lora()
    interpolate(base, finetuned, 0.5)  # merged adapters are fine
    with pytest.raises(ValueError, match="finite"):
        interpolate(base, finetuned, float("nan"))
