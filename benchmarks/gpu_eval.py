"""The evaluation section of ``gpu_check.py``: image and text embedding throughput of our path (bf16 autocast)
against CLIP_benchmark's zero-shot loop on the same ViT-B/32 (random weights), and FAISS flat/IVF search at
1M vectors on the GPU where the installed ``faiss`` has GPU support (``eval_harness.py`` does the work).
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # CLIP_benchmark's progress bars; read when tqdm is imported

import tempfile  # noqa: E402

import torch  # noqa: E402

import eval_harness as bench  # noqa: E402  (beside this script)


def faiss_gpu_support() -> tuple[bool, str]:
    """Whether the installed faiss can search on a GPU, and why not when it cannot."""
    try:
        import faiss
    except ImportError as exc:
        return False, f"faiss is not installed ({exc})"
    if not hasattr(faiss, "StandardGpuResources"):
        return False, f"the installed faiss {faiss.__version__} is a CPU-only build (no StandardGpuResources)"
    if faiss.get_num_gpus() < 1:
        return False, f"faiss {faiss.__version__} has GPU support but sees no GPU"
    return True, ""


def run_eval(sec) -> None:
    dry = sec.args.dry_run
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model_name = "cultureclip-tiny" if dry else "ViT-B-32-quickgelu"
    n_images, n_texts, batch, workers, repeats = (8, 8, 4, 0, 1) if dry else (2048, 4096, 256, 12, 2)

    def embed() -> dict:
        from cultureclip.model import CultureCLIP
        model = CultureCLIP.from_pretrained(model_name, pretrained=None, device=device)
        classnames, templates = bench.synthetic_classes(n_texts, 8)
        with tempfile.TemporaryDirectory(prefix="gpu-check-eval-") as tmp:
            bench.write_synthetic_images(tmp, n_images, size=256)
            out = bench.bench_embedding(model, tmp, classnames, templates, batch, workers, repeats, amp=cuda)
        agree = out["image_logits_max_abs_diff"] < 2.0 and out["class_weights_max_abs_diff"] < 0.05
        out["checks"] = {"same_outputs": {"ok": agree and out["ours_images_processed"] == out["images"],
                                          "detail": f"image logits max |diff| {out['image_logits_max_abs_diff']:.2g}, "
                                                    f"class weights {out['class_weights_max_abs_diff']:.2g} "
                                                    "(bf16 ours vs fp16 CLIP_benchmark on a GPU)"}}
        return {"model": model_name, "weights": "random", **out}

    sec.attempt("embedding ours vs CLIP_benchmark", embed, 5 if dry else 30, kind="embed")
    ok, why = faiss_gpu_support()
    if not cuda or not ok:
        sec.emit({"name": "FAISS GPU search at 1M vectors", "kind": "search", "status": "skipped",
                  "reason": why if cuda else "no CUDA device"})
        return

    def search() -> dict:
        rows = bench.bench_search([1_000_000], dim=512, n_queries=10_000, k=10, nprobe=None, nlist=None,
                                  repeats=3, device="cuda", clusters=1000)
        return {"rows": rows}

    sec.attempt("FAISS GPU search at 1M vectors", search, 40, kind="search")
