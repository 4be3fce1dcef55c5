"""CLIP_benchmark as a client: its own CLI evaluates a saved model (open_clip's ``local-dir:`` schema)
on a local image-folder dataset and reports the accuracy cultureclip.zeroshot computes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("clip_benchmark")
pytest.importorskip("sklearn")  # CLIP_benchmark's metrics import it

CLASSES = ["dumpling", "kimono", "lantern", "pagoda", "tea bowl"]  # sorted: ImageFolder's label order
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "{c}"]


REPO = Path(__file__).parents[1]


def benchmark_cmd():
    """CLIP_benchmark's CLI through cultureclip's wrapper (the plain command where no fix is needed)."""
    return [sys.executable, "-m", "cultureclip.interop.benchmark_cli"]


def test_fixed_accuracy_is_clip_benchmark_arithmetic():
    from cultureclip.interop.benchmark_cli import accuracy, needs_fix
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    order = logits.argsort(dim=1, descending=True)  # brute force: rank of the true class
    rank = (order == target[:, None]).int().argmax(1)
    assert accuracy(logits, target, topk=(1, 5)) == [int((rank < 1).sum()) / 50, int((rank < 5).sum()) / 50]
    if not needs_fix():  # an older NumPy: CLIP_benchmark's own function runs and agrees
        from clip_benchmark.metrics.zeroshot_classification import accuracy as original
        assert original(logits, target, topk=(1, 5)) == accuracy(logits, target, topk=(1, 5))


@pytest.mark.slow
def test_clip_benchmark_cli_matches_zeroshot(tmp_path, tiny_model):
    from cultureclip import zeroshot
    # images: DATASET_ROOT/val/<class>/*.png, 8 per class, random colours and sizes (resize + crop apply)
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for c in CLASSES:
        (root / "val" / c).mkdir(parents=True)
        for i in range(8):
            h, w = rng.integers(24, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val" / c / f"{i}.png")
    name = "imagenet1k-unverified"  # CLIP_benchmark's plain ImageFolder dataset (root/val for --split test)
    (tmp_path / "classes.json").write_text(json.dumps({name: CLASSES}))
    (tmp_path / "templates.json").write_text(json.dumps({name: TEMPLATES}))
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "result.json"
    cmd = [*benchmark_cmd(), "eval", "--model", f"local-dir:{tmp_path / 'model'}", "--pretrained", "",
           "--dataset", name, "--dataset_root", str(root), "--task", "zeroshot_classification",
           "--custom_classname_file", str(tmp_path / "classes.json"),
           "--custom_template_file", str(tmp_path / "templates.json"),
           "--output", str(out), "--batch_size", "16", "--num_workers", "0", "--no_amp"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads(out.read_text())["metrics"]

    with torch.no_grad():
        ours = zeroshot.classify(tiny_model, root / "val", CLASSES, TEMPLATES, batch_size=16).metrics
    assert ours["n"] == 40
    assert reported["acc1"] == pytest.approx(ours["acc1"], abs=1e-9)
    assert reported["acc5"] == pytest.approx(ours["acc5"], abs=1e-9)
    assert reported["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-9)
