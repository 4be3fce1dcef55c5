"""The evaluation throughput benchmark (``benchmarks/eval_harness.py``): counts, and agreement with its
references.

No timing is asserted: only that each path processed every item, that ours and CLIP_benchmark's loop
compute the same features, and that FAISS flat returns the brute-force torch top-k.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # scripts, not a package
import eval_harness as bench  # noqa: E402


@pytest.fixture
def vendored_clip_benchmark(monkeypatch):
    """Use the re-implemented CLIP_benchmark loop whether or not clip_benchmark is installed."""
    monkeypatch.setattr(bench, "clip_benchmark_loops", lambda: (
        bench._cb_zero_shot_classifier, bench._cb_run_classification, "re-implemented (test)"))


def test_embedding_counts_and_agreement(tiny_model, tmp_path, vendored_clip_benchmark):
    bench.write_synthetic_images(tmp_path, 7, size=40, n_classes=3)
    classnames, templates = bench.synthetic_classes(13, templates_per_class=3)  # 4 classes x 3 templates
    out = bench.bench_embedding(tiny_model, tmp_path, classnames, templates, batch_size=3, num_workers=0,
                                repeats=2)
    for key in ("ours_images_per_s", "theirs_images_per_s", "ours_texts_per_s", "theirs_texts_per_s",
                "images_ratio", "texts_ratio", "clip_benchmark_source"):
        assert key in out
    assert out["ours_images_processed"] == out["theirs_images_processed"] == out["images"] == 7
    assert out["ours_texts_processed"] == out["theirs_texts_processed"] == out["texts"] == 12
    assert all(len(v) == 2 for v in out["seconds"].values())  # every path ran `repeats` times
    assert out["image_logits_max_abs_diff"] < 1e-3  # logits are 100 x cosine
    assert out["class_weights_max_abs_diff"] < 1e-5
    assert "| images/s |" in bench.format_markdown(out, None)


def test_search_flat_equals_bruteforce():
    rows = bench.bench_search([2000], dim=32, n_queries=64, k=10, nprobe=4, repeats=1)
    (r,) = rows
    assert r["n"] == 2000 and r["queries"] == 64 and r["k"] == 10
    for key in ("flat_build_s", "flat_qps", "torch_qps", "ivf_build_s", "ivf_qps", "flat_vs_torch", "ivf_vs_torch"):
        assert r[key] > 0
    assert r["flat_exact_match"] == 1.0 and r["flat_recall@10"] == 1.0  # same ordered top-k as torch.topk
    assert r["ivf_nlist"] == 2000 // 39 and r["ivf_nprobe"] == 4  # 4 * sqrt(N) capped by FAISS's 39 per list
    assert 0.0 < r["ivf_recall@10"] <= 1.0
    assert "| 2,000 |" in bench.format_markdown(None, rows)


def test_ivf_max_size_skips_ivf():
    (r,) = bench.bench_search([500], dim=8, n_queries=5, k=3, repeats=1, ivf_max_size=100)
    assert "ivf_qps" not in r and r["flat_exact_match"] == 1.0
    assert "| - |" in bench.format_markdown(None, [r])


def test_bruteforce_chunks_and_vectors():
    q = torch.from_numpy(bench.random_unit_vectors(10, 16, seed=1))
    g = bench.random_unit_vectors(300, 16, seed=2, chunk=7)  # chunked draw
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    g = torch.from_numpy(g)
    scores, idx = bench.topk_bruteforce(q, g, 5, max_chunk_bytes=4 * 300 * 3)  # 3 queries per block
    ref = torch.topk(q @ g.T, 5, dim=1)
    assert torch.equal(idx, ref.indices) and torch.allclose(scores, ref.values)


def test_reimplemented_loop_matches_clip_benchmark(tiny_model, tmp_path):
    """Only where clip_benchmark (and the scikit-learn it imports) is installed; not a dependency."""
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    bench.write_synthetic_images(tmp_path, 5, size=40, n_classes=2)
    names, templates = bench.synthetic_classes(6, templates_per_class=3)
    args = (tiny_model.model, tiny_model.tokenizer, names, templates, "cpu")
    weights = bench._cb_zero_shot_classifier(*args, amp=False)
    assert torch.equal(weights, zc.zero_shot_classifier(*args, amp=False))
    loader = DataLoader(ImageFolder(str(tmp_path), transform=tiny_model.preprocess_val), batch_size=2)
    ours = bench._cb_run_classification(tiny_model.model, weights, loader, "cpu", amp=False)
    theirs = zc.run_classification(tiny_model.model, weights, loader, "cpu", amp=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
