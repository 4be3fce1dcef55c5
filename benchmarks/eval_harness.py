"""Throughput of evaluation: embedding (ours vs CLIP_benchmark's loop) and FAISS search vs torch.

- :func:`bench_embedding`: images/s and texts/s of our path (``ImageBatches`` + ``embed_image_batches``,
  ``zero_shot_classifier``) against CLIP_benchmark's zero-shot loop on the same model, images, batch
  size and workers. Both outputs are compared, so a speed-up cannot come from computing something else.
- :func:`bench_search`: build time and queries/s of FAISS flat and IVF (``build_index``) over random
  unit vectors against an exact, memory-bounded ``torch.topk(queries @ gallery.T)``, which also scores
  flat's agreement and IVF's recall. Uniform random vectors have no clusters, so that recall is a
  worst case; clustered CLIP features recall more at the same ``nprobe``.

Methods run in rotating order (A B, B A, ...) and ratios are medians of per-round ratios: on a shared
machine a neighbour's load drifts, and the runs of one round see about the same load.

A benchmark helper, not part of the package (it carries a copy of CLIP_benchmark's loops and writes
synthetic JPEGs); run it through ``benchmarks/bench_eval.py``.
"""
from __future__ import annotations

import gc
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cultureclip.eval.embed import embed_image_batches, zero_shot_classifier
from cultureclip.eval.imagesets import ImageBatches, folder_images
from cultureclip.eval.retrieval import build_index
from cultureclip.model import CultureCLIP

TEMPLATES = ("a photo of a {c}.", "a close-up photo of the {c}.", "a photo of a {c} at a festival.",
             "an old photo of a {c}.", "a painting of the {c}.", "a photo of a small {c}.",
             "a traditional {c} seen in a museum.", "a cropped photo of a {c} on a street.")
_WORDS = ("red", "silk", "carved", "lacquered", "festival", "wedding", "temple", "harvest", "woven", "painted")
_NOUNS = ("robe", "hat", "lantern", "drum", "mask", "bowl", "gate", "dress", "fan", "boat")
MAX_CHUNK_BYTES = 256 * 2 ** 20  # bound on one [q, N] float32 score block of the torch brute force


def write_synthetic_images(root, n: int, size: int = 256, n_classes: int = 10, seed: int = 0) -> Path:
    """Write ``n`` JPEGs (noise plus a few shapes) into ``n_classes`` class folders under ``root``.

    Class folders make the set readable by both ``folder_images`` and torchvision's ``ImageFolder``
    (CLIP_benchmark's loader) in the same sorted order.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % n_classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        im.save(folder / f"img_{i:06d}.jpg", quality=90)
    return root


def synthetic_classes(n_texts: int, templates_per_class: int = 8) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` whose product holds ``n_texts`` strings (rounded down, at least one class)."""
    if not 1 <= templates_per_class <= len(TEMPLATES):
        raise ValueError(f"templates_per_class must be in [1, {len(TEMPLATES)}], got {templates_per_class}")
    n_classes = max(1, n_texts // templates_per_class)
    names = [f"{_WORDS[i % 10]} {_NOUNS[i // 10 % 10]} {i}" for i in range(n_classes)]
    return names, list(TEMPLATES[:templates_per_class])


# --- CLIP_benchmark's loop, followed line by line from clip_benchmark 1.6.2 (PyPI wheel),
# clip_benchmark/metrics/zeroshot_classification.py: zero_shot_classifier and run_classification, minus
# tqdm and the dict-of-templates branch. Used only when that module does not import: it imports
# scikit-learn at module level, which this project does not depend on.
def _cb_zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=True):
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        zeroshot_weights = []
        for classname in classnames:  # one encode_text call per class: batch = number of templates
            texts = tokenizer([template.format(c=classname) for template in templates]).to(device)
            class_embedding = F.normalize(model.encode_text(texts), dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1).to(device)  # [D, C]
    return zeroshot_weights


def _cb_run_classification(model, classifier, dataloader, device, amp=True):
    pred, true = [], []
    with torch.no_grad():
        for images, target in dataloader:
            images, target = images.to(device), target.to(device)
            with torch.autocast(device, enabled=amp):
                image_features = F.normalize(model.encode_image(images), dim=-1)
                logits = 100. * image_features @ classifier  # [b, C]
            true.append(target.cpu())
            pred.append(logits.float().cpu())
    return torch.cat(pred), torch.cat(true)


def clip_benchmark_loops() -> tuple[Callable, Callable, str]:
    """CLIP_benchmark's ``(zero_shot_classifier, run_classification, source)``: imported when possible."""
    try:
        from clip_benchmark.metrics import zeroshot_classification as zc
        return zc.zero_shot_classifier, zc.run_classification, f"imported clip_benchmark {version('clip_benchmark')}"
    except ImportError as exc:
        return _cb_zero_shot_classifier, _cb_run_classification, \
            f"re-implemented from clip_benchmark 1.6.2 metrics/zeroshot_classification.py ({exc})"


def _timed(fn: Callable, device: torch.device):
    """``(seconds, result)`` of ``fn()``, synchronising CUDA so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def _alternate(fns: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Per-run seconds and last outputs of each fn, rotating the order every round (A B, B A, ...)."""
    names, times, outs = list(fns), {name: [] for name in fns}, {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t, outs[name] = _timed(fns[name], device)
            times[name].append(t)
    return times, outs


def _paired_ratio(slow: list, fast: list) -> float:
    """Median over rounds of ``slow[i] / fast[i]`` (a speed-up of ``fast``)."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def bench_embedding(model: CultureCLIP, image_root, classnames: Sequence[str], templates: Sequence[str],
                    batch_size: int = 64, num_workers: int = 2, repeats: int = 3, amp: bool = True) -> dict:
    """Images/s and texts/s of our embedding path and of CLIP_benchmark's, in alternating runs.

    Args:
        model: the encoder; CLIP_benchmark's loop gets its plain open_clip module and tokenizer.
        image_root: a class-folder tree (see :func:`write_synthetic_images`).
        classnames, templates: texts are every template filled with every class name.
        batch_size, num_workers: image DataLoader settings for both; our texts use the same batch size.
        repeats: timed runs of each path.
        amp: our bf16 autocast (CUDA only). CLIP_benchmark gets ``amp`` only on CUDA (its fp16), because
            on CPU its ``torch.autocast("cpu")`` would run bf16 and time another computation.

    Returns:
        ``{ours,theirs}_{images,texts}_per_s`` (median run) and ``..._best`` (fastest run),
        ``{images,texts}_ratio`` (ours/theirs, median of per-round ratios), per-run seconds, counts of
        processed items, and the largest differences between both outputs (image logits, class weights).
    """
    from torch.utils.data import DataLoader, default_collate
    from torchvision.datasets import ImageFolder

    cb_classifier, cb_classify, source = clip_benchmark_loops()
    dev, their_amp = model.device, bool(amp and model.device.type == "cuda")
    model.eval()

    def theirs_texts():
        return cb_classifier(model.model, model.tokenizer, list(classnames), list(templates), dev.type, amp=their_amp)

    def theirs_images():
        ds = ImageFolder(str(image_root), transform=model.preprocess_val)  # CLIP_benchmark's builder
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=default_collate)
        return cb_classify(model.model, classifier, loader, dev.type, amp=their_amp)[0]  # [N, C] logits

    def ours_texts():
        return zero_shot_classifier(model, classnames, templates, batch_size=batch_size, amp=amp)  # [C, D]

    def ours_images():
        batches = ImageBatches(folder_images(image_root), model.preprocess_val, batch_size, num_workers)
        return embed_image_batches(model, (pixels for pixels, _, _ in batches), amp=amp)  # [N, D]

    classifier = theirs_texts()  # [D, C]; untimed, and a warm-up: first-call kernel selection lands here
    with torch.no_grad():
        model.encode_image(model.preprocess_val(Image.new("RGB", (64, 64)))[None])
    times, outs = _alternate({"ours_texts": ours_texts, "theirs_texts": theirs_texts}, repeats, dev)
    t_img, o_img = _alternate({"ours_images": ours_images, "theirs_images": theirs_images}, repeats, dev)
    times.update(t_img)
    outs.update(o_img)
    our_logits = 100. * outs["ours_images"] @ classifier.float().cpu()  # same classifier: only features differ
    weight_diff = outs["ours_texts"].float().cpu() - outs["theirs_texts"].T.float().cpu()  # [C, D]
    out = {"clip_benchmark_source": source, "classes": len(classnames), "templates_per_class": len(templates),
           "batch_size": batch_size, "workers": num_workers, "repeats": repeats, "amp_ours": amp,
           "amp_theirs": their_amp, "images": len(folder_images(image_root)), "texts": len(classnames) * len(templates),
           "ours_images_processed": len(outs["ours_images"]), "theirs_images_processed": len(outs["theirs_images"]),
           "ours_texts_processed": outs["ours_texts"].shape[0] * len(templates),
           "theirs_texts_processed": outs["theirs_texts"].shape[1] * len(templates),
           "image_logits_max_abs_diff": float((our_logits - outs["theirs_images"]).abs().max()),
           "class_weights_max_abs_diff": float(weight_diff.abs().max()), "seconds": times}
    for what in ("images", "texts"):
        for side in ("ours", "theirs"):
            out[f"{side}_{what}_per_s"] = out[what] / statistics.median(times[f"{side}_{what}"])
            out[f"{side}_{what}_per_s_best"] = out[what] / min(times[f"{side}_{what}"])
        out[f"{what}_ratio"] = _paired_ratio(times[f"theirs_{what}"], times[f"ours_{what}"])
    return out


def random_unit_vectors(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors, drawn chunk by chunk so the peak stays one output array."""
    out, gen = np.empty((n, dim), dtype=np.float32), torch.Generator().manual_seed(seed)
    for i in range(0, n, chunk):
        x = torch.randn(min(chunk, n - i), dim, generator=gen)
        out[i:i + len(x)] = F.normalize(x, dim=-1).numpy()
    return out


def clustered_unit_vectors(n: int, dim: int, clusters: int, spread: float, seed: int,
                           chunk: int = 65536) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors around ``clusters`` random unit centres: centre + Gaussian noise of
    expected norm ``spread`` (1.0: a point's cosine to its centre ~0.7, loose as CLIP features of many
    concepts), normalised; the centres depend on ``seed // 1000`` only, so queries and gallery drawn with
    seeds in one thousand share them."""
    centers = torch.from_numpy(random_unit_vectors(clusters, dim, seed=seed // 1000 * 1000 + 999))
    out, gen = np.empty((n, dim), dtype=np.float32), torch.Generator().manual_seed(seed)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        which = torch.randint(clusters, (m,), generator=gen)
        x = centers[which] + torch.randn(m, dim, generator=gen) * (spread / dim ** 0.5)
        out[i:i + m] = F.normalize(x, dim=-1).numpy()
    return out


def topk_bruteforce(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                    max_chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(scores, indices)`` [Q, k] by ``topk(queries @ gallery.T)``, a few queries at a time."""
    rows = max(1, max_chunk_bytes // (4 * gallery.shape[0]))  # a [rows, N] float32 block fits the budget
    parts = [torch.topk(queries[i:i + rows] @ gallery.T, k, dim=1) for i in range(0, len(queries), rows)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _bench_gallery(gallery: np.ndarray, queries: np.ndarray, k: int, nprobe: Optional[int], nlist: Optional[int],
                   repeats: int, dev: torch.device, with_ivf: bool, target_recall: float = 0.95) -> dict:
    """One row of :func:`bench_search`; its 2 GB-scale locals die when it returns."""
    use_gpu = "auto" if dev.type == "cuda" else False
    row: dict = {"n": len(gallery), "dim": gallery.shape[1], "queries": len(queries), "k": k}
    q_t, g_t = torch.from_numpy(queries).to(dev), torch.from_numpy(gallery).to(dev)  # zero-copy on CPU
    row["flat_build_s"], flat = _timed(lambda: build_index(gallery, "flat", use_gpu=use_gpu), dev)
    fns = {"torch": lambda: topk_bruteforce(q_t, g_t, k), "flat": lambda: flat.search(queries, k)}
    if with_ivf:
        # nprobe None: tuned at build time on 256 gallery rows (not the benchmark's queries)
        row["ivf_build_s"], ivf = _timed(lambda: build_index(gallery, "ivf", nlist=nlist, nprobe=nprobe,
                                                             use_gpu=use_gpu, target_recall=target_recall,
                                                             tune_k=k), dev)
        row["ivf_nlist"], row["ivf_nprobe"] = ivf.nlist, ivf.nprobe
        row["ivf_target_recall"], row["ivf_tuned_recall"] = ivf.target_recall, ivf.measured_recall
        fns["ivf"] = lambda: ivf.search(queries, k)
    times, outs = _alternate(fns, repeats, dev)
    exact = outs["torch"][1].cpu()  # [Q, k]
    for name, (_, found) in outs.items():
        row[f"{name}_qps"] = len(queries) / statistics.median(times[name])
        row[f"{name}_qps_best"] = len(queries) / min(times[name])
        if name != "torch":
            hit = (found.unsqueeze(2) == exact.unsqueeze(1)).any(dim=1)  # [Q, k]: exact item j is in `found`
            row[f"{name}_recall@{k}"] = float(hit.float().mean())
            row[f"{name}_vs_torch"] = _paired_ratio(times["torch"], times[name])
    row["flat_exact_match"] = float((outs["flat"][1] == exact).all(dim=1).float().mean())
    if with_ivf:
        row["ivf_vs_flat"] = _paired_ratio(times["flat"], times["ivf"])
    row["seconds"] = times
    return row


def bench_search(sizes: Sequence[int] = (10_000, 100_000, 1_000_000), dim: int = 512, n_queries: int = 1000,
                 k: int = 10, nprobe: int = 16, nlist: Optional[int] = None, repeats: int = 3,
                 device: str = "cpu", ivf_max_size: Optional[int] = None, seed: int = 0, clusters: int = 0,
                 spread: float = 1.0, target_recall: float = 0.95) -> list[dict]:
    """FAISS flat and IVF against an exact torch top-k, one row per gallery size.

    Args:
        sizes: gallery sizes N; each gallery is freed before the next is drawn.
        dim, n_queries, k: feature dimension, number of queries Q, neighbours per query.
        nprobe, nlist: IVF settings (None: ``build_index``'s defaults: ``4 * sqrt(N)`` lists, bounded, and
            nprobe tuned to ``target_recall`` recall@k against flat on 256 gallery rows).
        clusters, spread: 0: uniform random unit vectors; else a mixture of that many Gaussian clusters
            (:func:`clustered_unit_vectors`), queries drawn from the same mixture.
        repeats: timed searches of each method, in rotating order.
        device: ``"cuda"`` puts the torch brute force on the GPU and lets FAISS use a GPU if it has one.
        ivf_max_size: skip IVF above this N (its k-means training dominates on a small CPU).
        seed: data seed; queries and gallery are independent draws.

    Returns:
        Dicts with ``n``, build seconds, ``{torch,flat,ivf}_qps`` (median run) and ``..._best``,
        ``{flat,ivf}_vs_torch`` (median per-round speed-up), ``flat_exact_match`` (fraction of queries whose
        ordered flat top-k equals torch's), ``flat_recall@k`` and ``ivf_recall@k`` (against torch's top-k).
    """
    def draw(n, s):
        return clustered_unit_vectors(n, dim, clusters, spread, s) if clusters else random_unit_vectors(n, dim, s)

    queries = draw(n_queries, seed * 1000)
    rows = []
    for n in sizes:
        gallery = draw(n, seed * 1000 + 1 + n % 997)
        rows.append(_bench_gallery(gallery, queries, k, nprobe, nlist, repeats, torch.device(device),
                                   with_ivf=ivf_max_size is None or n <= ivf_max_size, target_recall=target_recall))
        rows[-1].update(clusters=clusters, spread=spread if clusters else None)
        gallery = None  # 1M x 512 is 2 GB: free it before drawing the next size
        gc.collect()
    return rows


def environment(device: str) -> dict:
    """Versions and the thread counts that decide CPU throughput."""
    import faiss
    import open_clip
    import torchvision
    env = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "open_clip": open_clip.__version__, "faiss": faiss.__version__,
           "numpy": np.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def format_markdown(embed: Optional[dict] = None, search: Optional[list] = None) -> str:
    """Markdown tables of :func:`bench_embedding` and :func:`bench_search` results.

    Rates read ``median (best)`` over the runs; ratios are medians of per-round ratios.
    """
    lines, e = [], embed
    if e:
        lines += [f"Embedding: {e['images']} images, {e['texts']} texts ({e['classes']} classes x "
                  f"{e['templates_per_class']} templates), batch {e['batch_size']}, {e['workers']} workers, "
                  f"{e['repeats']} alternating runs; CLIP_benchmark loop: {e['clip_benchmark_source']}", "",
                  "| | ours | CLIP_benchmark | ours / theirs |", "|---|---:|---:|---:|"]
        lines += [f"| {w}/s | {e[f'ours_{w}_per_s']:.1f} ({e[f'ours_{w}_per_s_best']:.1f}) | "
                  f"{e[f'theirs_{w}_per_s']:.1f} ({e[f'theirs_{w}_per_s_best']:.1f}) | {e[f'{w}_ratio']:.2f} |"
                  for w in ("images", "texts")]
        lines += ["", f"Same outputs: image logits max |diff| {e['image_logits_max_abs_diff']:.1e}, "
                      f"class weights max |diff| {e['class_weights_max_abs_diff']:.1e}", ""]
    if search:
        k = search[0]["k"]
        data = (f"{search[0]['clusters']} Gaussian clusters (spread {search[0]['spread']})"
                if search[0].get("clusters") else "uniform random unit vectors")
        lines += [f"Search: D={search[0]['dim']}, {data}, {search[0]['queries']} queries, k={k}", "",
                  f"| N | torch q/s | flat build s | flat q/s | flat / torch | flat = torch | IVF nlist/nprobe "
                  f"| IVF build s | IVF q/s | IVF / torch | IVF / flat | IVF recall@{k} (tuned) |", "|" + "---:|" * 12]
        for r in search:
            tuned = "" if r.get("ivf_tuned_recall") is None else f" ({r['ivf_tuned_recall']:.3f})"
            ivf = "| - | - | - | - | - | - |" if "ivf_qps" not in r else (
                f"| {r['ivf_nlist']}/{r['ivf_nprobe']} | {r['ivf_build_s']:.1f} | {r['ivf_qps']:.0f} "
                f"({r['ivf_qps_best']:.0f}) | {r['ivf_vs_torch']:.2f} | {r['ivf_vs_flat']:.1f} "
                f"| {r[f'ivf_recall@{k}']:.3f}{tuned} |")
            lines.append(f"| {r['n']:,} | {r['torch_qps']:.0f} ({r['torch_qps_best']:.0f}) | {r['flat_build_s']:.2f} "
                         f"| {r['flat_qps']:.0f} ({r['flat_qps_best']:.0f}) | {r['flat_vs_torch']:.2f} "
                         f"| {r['flat_exact_match']:.3f} " + ivf)
    return "\n".join(lines)
