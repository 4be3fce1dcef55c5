"""Zero-shot classification: metrics vs a brute-force computation, classifier vs a hand-made mean,
confusion matrix vs torchmetrics, image sources and their errors, the CLI end to end."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix

from cultureclip import CultureCLIP
from cultureclip.eval.embed import zero_shot_classifier
from cultureclip.eval.imagesets import ImageDecodeError, csv_images, folder_images, open_images
from cultureclip.eval.zeroshot import (IMAGENET_CLASSNAMES_FILE, OPENAI_TEMPLATES_FILE, classify, load_classnames,
                                       load_templates, top_predictions, write_predictions)
from conftest import TINY_VIT

CLASSES = ["qipao", "hanbok", "ao dai", "kimono", "sari", "kebaya", "deel"]  # 7 > 5, so acc5 is not trivial
TEMPLATES = ["a photo of a {c}.", "a {c} at a festival.", "{c}"]
REPO = Path(__file__).resolve().parents[1]


def save_image(path, seed, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def class_tree(tmp_path):
    """``root/<class>/<i>.png``: 2 noise images per class (the last class has 3)."""
    root = tmp_path / "tree"
    seed = 0
    for c in CLASSES:
        for i in range(3 if c == "deel" else 2):
            save_image(root / c / f"{i}.png", seed)
            seed += 1
    return root


def brute_force(model, paths, labels, classnames, templates):
    """Everything classify computes, one image and one text at a time, in plain loops."""
    model.eval()
    with torch.no_grad():
        weights = []
        for c in classnames:
            e = torch.cat([model.encode_text([t.replace("{c}", c)]) for t in templates]).mean(0)
            weights.append(e / e.norm())
        weights = torch.stack(weights)  # [C, D]
        feats = torch.cat([model.encode_image(model.preprocess_val(Image.open(p).convert("RGB"))[None])
                           for p in paths])  # [N, D]
    logits = feats @ weights.T
    n, num_classes = logits.shape
    order = [sorted(range(num_classes), key=lambda j: -logits[i, j].item()) for i in range(n)]
    acc1 = sum(order[i][0] == labels[i] for i in range(n)) / n
    acc5 = sum(labels[i] in order[i][:5] for i in range(n)) / n
    recalls = []
    for c in sorted(set(labels)):
        mine = [i for i in range(n) if labels[i] == c]
        recalls.append(sum(order[i][0] == c for i in mine) / len(mine))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}, logits, weights


def test_classifier_is_normalised_mean_of_template_embeddings(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        per_class = [F.normalize(tiny_model.encode_text([t.format(c=c) for t in TEMPLATES]).mean(0), dim=0)
                     for c in CLASSES]
    torch.testing.assert_close(zero_shot_classifier(tiny_model, CLASSES, TEMPLATES, batch_size=4),
                               torch.stack(per_class), atol=1e-6, rtol=1e-5)


def test_classify_matches_brute_force(tiny_model, class_tree):
    result = classify(tiny_model, class_tree, CLASSES, TEMPLATES, k=5, batch_size=4)
    paths = [str(class_tree / i) for i in result.ids]
    labels = [CLASSES.index(i.split("/")[0]) for i in result.ids]
    assert result.labels.tolist() == labels and len(paths) == 15
    expected, logits, _ = brute_force(tiny_model, paths, labels, CLASSES, TEMPLATES)
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    assert result.metrics["n"] == 15 and result.metrics["n_skipped"] == 0
    # scores are softmax(s * cos) with the model's own temperature
    probs = (tiny_model.logit_scale.exp().item() * logits).softmax(dim=1)
    torch.testing.assert_close(result.topk_scores, probs.topk(5, dim=1).values, atol=1e-5, rtol=1e-4)
    assert torch.equal(result.topk_indices[:, 0], logits.argmax(dim=1))
    # confusion matrix: torchmetrics' layout and counts
    tm = MulticlassConfusionMatrix(num_classes=len(CLASSES))(logits.argmax(dim=1), torch.tensor(labels))
    assert torch.equal(result.confusion, tm)


def test_top_k_ranks_by_logits_where_softmax_ties_at_zero():
    cos = torch.tensor([[0.9, -0.5, -0.3, -0.9, 0.1, -0.4],
                        [-0.8, 0.7, -0.6, -0.2, -0.7, 0.0]])
    scale = torch.tensor(100.0)
    probs = (scale * cos).softmax(dim=1)
    assert (probs == 0).sum() >= 5  # the case needs float32 underflow: several classes tie at exactly 0
    scores, idx = top_predictions(cos, scale, k=6)
    expected = [sorted(range(6), key=lambda j: -cos[i, j].item()) for i in range(2)]  # by cosine, descending
    assert idx.tolist() == expected
    torch.testing.assert_close(scores, probs.gather(1, idx))  # scores stay the probabilities
    assert top_predictions(cos, scale, k=9)[1].shape == (2, 6)  # k clipped to the number of classes


def test_duplicate_prompts_are_encoded_once(tiny_model):
    """A template without ``{c}`` gives the same text for every class: encoded once, same weights."""
    tiny_model.eval()
    calls = []
    handle = tiny_model.model.token_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    weights = zero_shot_classifier(tiny_model, CLASSES, ["a photo of a {c}.", "a cultural object."], batch_size=4)
    handle.remove()
    assert sum(calls) == len(CLASSES) + 1  # 7 class prompts + the shared one, not 14
    with torch.no_grad():
        shared = tiny_model.encode_text(["a cultural object."])
        per_class = [F.normalize(tiny_model.encode_text([f"a photo of a {c}."]) + shared, dim=-1) for c in CLASSES]
    torch.testing.assert_close(weights, torch.cat(per_class), atol=1e-6, rtol=0)


def test_k_clipped_and_csv_source(tiny_model, class_tree, tmp_path):
    rows = [("tree/" + p.relative_to(class_tree).as_posix(), p.parent.name) for p in sorted(class_tree.rglob("*.png"))]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    classes3 = CLASSES[:3]
    sub = [r for r in rows if r[1] in classes3]
    (tmp_path / "sub.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in sub))
    small = classify(tiny_model, tmp_path / "sub.csv", classes3, TEMPLATES, k=5)
    assert small.topk_indices.shape == (6, 3) and small.metrics["acc5"] == 1.0  # top-3 of 3 classes
    # CSV and folder list the same images with the same labels -> same metrics
    via_csv = classify(tiny_model, csv_path, CLASSES, TEMPLATES)
    via_dir = classify(tiny_model, class_tree, CLASSES, TEMPLATES)
    assert via_csv.metrics == via_dir.metrics


def test_unlabelled_flat_folder(tiny_model, tmp_path):
    for i in range(3):
        save_image(tmp_path / "flat" / f"img{i}.jpg", i)
    result = classify(tiny_model, tmp_path / "flat", CLASSES, k=2)
    assert result.labels is None and result.confusion is None
    assert result.ids == ["img0.jpg", "img1.jpg", "img2.jpg"] and result.topk_scores.shape == (3, 2)
    assert set(result.metrics) == {"n", "n_skipped"}
    rows = list(csv.DictReader(write_predictions(result, tmp_path / "predictions.csv").open()))
    assert list(rows[0]) == ["id", "pred1", "score1", "pred2", "score2"] and rows[2]["id"] == "img2.jpg"
    assert rows[0]["pred1"] in CLASSES and 1 >= float(rows[0]["score1"]) >= float(rows[0]["score2"]) > 0


def test_class_file_errors_name_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("qipao\nhanbok\n")
    assert load_classnames(good) == ["qipao", "hanbok"]
    dup = tmp_path / "dup.txt"
    dup.write_text("qipao\nhanbok\nqipao\n")
    with pytest.raises(ValueError, match=r"dup.txt.*'qipao' on lines 1 and 3"):
        load_classnames(dup)
    blank = tmp_path / "blank.txt"
    blank.write_text("qipao\n\nhanbok\n")
    with pytest.raises(ValueError, match=r"blank.txt: blank class name on line\(s\) \[2\]"):
        load_classnames(blank)


def test_template_errors_name_lines(tmp_path):
    t = tmp_path / "templates.txt"
    t.write_text("a photo of a {c}.\na painting.\n")
    with pytest.raises(ValueError, match=r"templates.txt:2: .*no '\{c\}'"):
        load_templates(t)
    t.write_text("a photo of a {c} in {place}.\n")
    with pytest.raises(ValueError, match=r"templates.txt:1: .*cannot be filled"):
        load_templates(t)


def test_shipped_imagenet_files_match_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    assert load_classnames(IMAGENET_CLASSNAMES_FILE, allow_duplicates=True) == list(IMAGENET_CLASSNAMES)
    assert load_templates(OPENAI_TEMPLATES_FILE) == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    with pytest.raises(ValueError, match="missile"):  # OpenAI's list names two classes "missile"
        load_classnames(IMAGENET_CLASSNAMES_FILE)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_image_is_skipped_and_listed(tiny_model, class_tree, num_workers):
    bad = class_tree / "hanbok" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    result = classify(tiny_model, class_tree, CLASSES, TEMPLATES, batch_size=4, num_workers=num_workers)
    assert result.metrics["n_skipped"] == 1 and result.metrics["n"] == 15
    assert result.skipped[0][0] == str(bad) and "hanbok/broken.jpg" not in result.ids
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        classify(tiny_model, class_tree, CLASSES, TEMPLATES, on_error="raise", num_workers=num_workers)


def test_source_errors_name_file_and_line(tmp_path, class_tree):
    with pytest.raises(ValueError, match=r"not in the class list: \['ao dai'\]"):
        folder_images(class_tree, [c for c in CLASSES if c != "ao dai"])
    save_image(tmp_path / "a.png", 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,qipao\na.png,sombrero\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: unknown label 'sombrero'"):
        csv_images(bad, CLASSES)
    bad.write_text("file,label\na.png,qipao\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: header must have a 'path' column"):
        csv_images(bad, CLASSES)
    bad.write_text("path\na.png\nmissing.png\n")
    with pytest.raises(FileNotFoundError, match=r"bad.csv:3: image .*missing.png"):
        csv_images(bad)
    with pytest.raises(ValueError, match="unknown image source prefix 'shards'"):
        open_images("shards:/data/twins")


def test_public_module():
    from cultureclip import zeroshot
    assert zeroshot.classify is classify and zeroshot.DEFAULT_TEMPLATES == ("a photo of a {c}.",)


@pytest.mark.slow  # a subprocess that imports torch, open_clip and the CLI: seconds of start-up
def test_cli_end_to_end(tmp_path, class_tree):
    # one subprocess only: importing open_clip alone takes several seconds
    torch.manual_seed(0)
    model_dir = CultureCLIP.from_config(TINY_VIT, name="tiny-vit").save_pretrained(tmp_path / "model")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out" / "predictions.csv"
    cmd = [sys.executable, str(REPO / "tools" / "zeroshot_classify.py"), "--model", str(model_dir),
           "--classes", str(tmp_path / "classes.txt"), "--images", str(class_tree), "--out", str(out),
           "--topk", "3", "--workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and "mean per-class recall" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15 and rows[0]["id"] == "ao dai/0.png" and rows[0]["label"] == "ao dai"
    assert list(rows[0]) == ["id", "label", "pred1", "score1", "pred2", "score2", "pred3", "score3"]
    assert rows[0]["pred1"] in CLASSES and float(rows[0]["score1"]) >= float(rows[0]["score2"]) > 0
    confusion = list(csv.reader((out.parent / "predictions_confusion.csv").open()))
    assert confusion[0] == ["true\\pred"] + CLASSES
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 15


@pytest.mark.slow  # two CLI runs (open_clip import each)
def test_cli_pixel_cap_counts_or_names_the_file(tmp_path, class_tree):
    torch.manual_seed(0)
    model_dir = CultureCLIP.from_config(TINY_VIT, name="tiny-vit").save_pretrained(tmp_path / "model")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    huge = save_image(class_tree / "sari" / "huge.png", 99, size=100)  # 108x100 > the 64x64 cap below
    (class_tree / "kimono" / "broken.jpg").write_bytes(b"not a jpeg")
    cmd = [sys.executable, str(REPO / "tools" / "zeroshot_classify.py"), "--model", str(model_dir),
           "--classes", str(tmp_path / "classes.txt"), "--images", str(class_tree), "--workers", "0",
           "--device", "cpu", "--max-pixels", str(64 * 64), "--out", str(tmp_path / "p.csv")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "classified 15 images" in proc.stdout
    assert "skipped 2 images (bad_image 1, too_large 1)" in proc.stderr
    assert f"skipped: {huge}: ImageTooLargeError: 108x100 = 10800 pixels" in proc.stderr
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 15

    proc = subprocess.run(cmd + ["--on-error", "raise"], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "broken.jpg: cannot decode image" in proc.stderr  # the first bad file in listing order
