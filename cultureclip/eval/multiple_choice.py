"""Zero-shot multiple choice: one image scored against its own option texts, as the reference scripts do.

The engine shared by every cultural benchmark in ``cultureclip.eval.cultural``:

- :class:`MCItem` (image source, option texts, index of the correct option, metadata) and
  :class:`Prediction` (one per item, skipped ones included, with the reason);
- :func:`score_items` / :func:`score_item_sets`: images batched through a ``DataLoader`` and embedded
  once (also across distractor seeds), unique option texts embedded once, softmax of
  ``logit_scale.exp() * cos`` over each item's options (for a sigmoid model with a ``logit_bias``, its
  per-option ``sigmoid(s * cos + b)``), argmax;
- :func:`accuracy_report` / :func:`aggregate_seeds`: flat metric dicts (``acc``, ``n``, ``n_skipped``,
  ``chance``, ``acc/country=Japan``, ``acc_mean``, ``acc_std``, ``acc/seed=0``);
- the distractor protocols (:func:`resolve_seeds`, :func:`draw_options`) and the result header.

Unlike the reference code, an image that cannot be decoded is never silently dropped nor replaced:
it is skipped and counted with its reason, or raises with ``on_error="raise"``. Images are decoded
and batched by the one evaluation path, :class:`cultureclip.eval.imagesets.ImageBatches`. Reading benchmark
rows (local files or the Hugging Face hub) lives in :mod:`cultureclip.eval.cultural`.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from cultureclip.images import (  # noqa: F401  (ImageDecodeError, check_on_error: re-exported for benchmarks)
    DEFAULT_MAX_PIXELS, ImageDecodeError, check_on_error)

if TYPE_CHECKING:
    import torch

    from cultureclip.model import CultureCLIP
# torch and the model stack are imported inside the functions that score: building items (the
# distractor draws) then stays cheap to import, e.g. in a subprocess or a tool that only lists items.

PROTOCOLS = ("fixed", "reference")
REFERENCE_SEED = 42  # the authors' random.seed(42)
REFERENCE_NOTE = (
    "protocol=reference makes the authors' draw calls (random.Random(42); per item random.sample of the "
    "distractors, then random.shuffle of the options, in dataset order) but over SORTED candidate pools. "
    "The authors drew from list(set(...)), whose order depends on PYTHONHASHSEED, so this matches their "
    "numbers only up to that hash-seed-dependent pool order; unlike theirs it is reproducible.")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    ``image`` is encoded bytes, a PIL image, a path, or a Hugging Face image dict
    (``{"bytes": ..., "path": ...}``); ``answer`` indexes ``options``.
    """
    image: Any
    options: tuple[str, ...]
    answer: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer index {self.answer} outside the {len(self.options)} options {self.options}")


@dataclass(frozen=True)
class Prediction:
    """The outcome for one item; ``pred`` is ``None`` and ``skipped`` holds the reason when not scored."""
    index: int
    answer: int
    num_options: int
    meta: Mapping[str, Any]
    pred: Optional[int] = None
    probs: Optional[tuple[float, ...]] = None
    skipped: Optional[str] = None

    @property
    def correct(self) -> bool:
        return self.pred is not None and self.pred == self.answer


# ---------------------------------------------------------------------------- images

def find_undecodable(sources: Sequence[Any], num_workers: int = 0, batch_size: int = 64,
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> dict[int, str]:
    """``{index: reason}`` for the sources that do not decode (the reference's image verification)."""
    from cultureclip.eval.imagesets import ImageBatches
    batches = ImageBatches(sources, None, batch_size, num_workers, "skip", max_pixels=max_pixels,
                           progress="decoding images")
    for _ in batches.indexed():
        pass
    return batches.failed


def embed_images(model: CultureCLIP, sources: Sequence[Any], batch_size: int = 64, num_workers: int = 0,
                 amp: bool = True, on_error: str = "skip", names: Optional[Sequence[str]] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, dict[int, str]]:
    """Features ``[N, D]`` (zero rows where skipped) and ``{index: reason}`` of undecodable images.

    ``names`` (e.g. ``"file.jsonl: row 7"``) name the images in the ``on_error="raise"`` message.
    """
    import torch

    from cultureclip.eval.embed import embed_image_batches
    from cultureclip.eval.imagesets import ImageBatches
    feats = torch.zeros(len(sources), int(model.model_cfg["embed_dim"]))
    names = list(names) if names else [f"item {i}" for i in range(len(sources))]
    batches = ImageBatches(sources, model.preprocess_val, batch_size, num_workers, on_error, names, max_pixels)
    for indices, pixels in batches.indexed():
        feats[indices] = embed_image_batches(model, [pixels], amp=amp)  # [b, D]
    return feats, batches.failed


# ---------------------------------------------------------------------------- scoring

def score_item_sets(model: CultureCLIP, item_sets: Mapping[Any, Sequence[MCItem]], batch_size: int = 64,
                    num_workers: int = 0, amp: bool = True, on_error: str = "skip",
                    text_batch_size: int = 256,
                    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> dict[Any, list[Prediction]]:
    """Score several item lists that share their images position by position (one per distractor seed).

    Images are embedded once (from the first list), the union of option texts once.

    Args:
        model: the model; put in eval mode.
        item_sets: ``{key: items}``; ``items[i].image`` must be the same source in every list.
        batch_size, num_workers: image ``DataLoader`` settings.
        amp: bf16 autocast on CUDA.
        on_error: ``"skip"`` counts undecodable images (``Prediction.skipped``), ``"raise"`` raises.
        text_batch_size: batch size for the option texts.
        max_pixels: pixel cap per image (:mod:`cultureclip.images`); larger ones are skipped or raise.

    Returns:
        ``{key: [Prediction, ...]}``, one prediction per item, in item order.
    """
    from cultureclip.eval.embed import embed_texts
    lists = list(item_sets.values())
    base = lists[0] if lists else []
    for other in lists[1:]:
        if len(other) != len(base) or any(a.image is not b.image and a.image != b.image
                                          for a, b in zip(base, other)):
            raise ValueError("item sets must share their images position by position")
    names = [str(it.meta.get("where", f"item {i}")) for i, it in enumerate(base)]
    feats, failed = embed_images(model, [it.image for it in base], batch_size, num_workers, amp, on_error, names,
                                 max_pixels)
    texts = sorted({t for items in lists for it in items for t in it.options})  # sorted: stable batches
    text_feats = embed_texts(model, texts, batch_size=text_batch_size, amp=amp)  # [T, D]
    row = {t: i for i, t in enumerate(texts)}
    out = {}
    calibration = model.calibration(feats.device)  # once: not a device-to-host copy per item
    for key, items in item_sets.items():
        preds = []
        for i, it in enumerate(items):
            if i in failed:
                preds.append(Prediction(i, it.answer, len(it.options), it.meta, skipped=failed[i]))
                continue
            # softmax of s * cos over the options, or a sigmoid model's own sigmoid(s * cos + b)
            probs = model.match_probabilities(feats[i] @ text_feats[[row[t] for t in it.options]].T,
                                              calibration=calibration)  # [K]
            preds.append(Prediction(i, it.answer, len(it.options), it.meta, pred=int(probs.argmax()),
                                    probs=tuple(probs.tolist())))
        out[key] = preds
    return out


def score_items(model: CultureCLIP, items: Sequence[MCItem], batch_size: int = 64, num_workers: int = 0,
                amp: bool = True, on_error: str = "skip",
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> list[Prediction]:
    """Score one list of items; see :func:`score_item_sets` for the arguments."""
    return score_item_sets(model, {0: items}, batch_size, num_workers, amp, on_error, max_pixels=max_pixels)[0]


# ---------------------------------------------------------------------------- metrics

def accuracy_report(predictions: Sequence[Prediction], group_keys: Sequence[str] = ()) -> dict[str, float]:
    """Flat metrics: ``acc``, ``n`` (scored), ``n_skipped``, ``chance`` (mean of 1/num_options), and per group
    ``acc/{key}={value}`` and ``n/{key}={value}`` (a missing meta value groups as ``unknown``).

    ``acc`` is NaN when nothing was scored.
    """
    scored = [p for p in predictions if p.skipped is None]
    n = len(scored)
    out: dict[str, float] = {
        "acc": sum(p.correct for p in scored) / n if n else math.nan,
        "n": n,
        "n_skipped": len(predictions) - n,
        "chance": sum(1.0 / p.num_options for p in scored) / n if n else math.nan,
    }
    for key in group_keys:
        hits, counts = Counter(), Counter()
        for p in scored:
            value = p.meta.get(key)
            value = "unknown" if value is None or value == "" else str(value)
            counts[value] += 1
            hits[value] += p.correct
        for value in sorted(counts):
            out[f"acc/{key}={value}"] = hits[value] / counts[value]
            out[f"n/{key}={value}"] = counts[value]
    return out


def aggregate_seeds(reports: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Combine one report per distractor seed: accuracies averaged, counts kept, plus ``acc_mean``,
    ``acc_std`` (sample std over seeds, 0 for one seed) and ``acc/seed=S``."""
    seeds = list(reports)
    first = reports[seeds[0]]
    accs = [reports[s]["acc"] for s in seeds]
    out: dict[str, float] = {"acc": statistics.fmean(accs), "acc_mean": statistics.fmean(accs),
                             "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    out.update({f"acc/seed={s}": reports[s]["acc"] for s in seeds})
    for key in first:
        if key == "acc":
            continue
        values = [reports[s].get(key, math.nan) for s in seeds]
        # counts do not depend on the distractors (same images, same groups): keep them as ints
        out[key] = first[key] if key.startswith("n") else statistics.fmean(values)
    return out


def skip_summary(predictions: Sequence[Prediction], examples: int = 5) -> dict[str, Any]:
    """Skipped items by exception type, plus the first few ``where: reason`` lines, for the header."""
    skipped = [p for p in predictions if p.skipped is not None]
    return {"by_type": dict(Counter(p.skipped.split(":", 1)[0] for p in skipped)),
            "examples": [f"{p.meta.get('where', f'item {p.index}')}: {p.skipped}" for p in skipped[:examples]]}


# ---------------------------------------------------------------------------- protocols

def resolve_seeds(protocol: str, seeds: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The distractor seeds to run: ``fixed`` defaults to ``(0,)``; ``reference`` is always ``(42,)``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "reference":
        if seeds is not None and tuple(seeds) != (REFERENCE_SEED,):
            raise ValueError(f"protocol='reference' uses the authors' seed {REFERENCE_SEED}; got seeds={seeds}")
        return (REFERENCE_SEED,)
    seeds = (0,) if seeds is None else tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints, got {seeds}")
    return seeds


def draw_options(rng, truth: str, pool: Sequence[str], num_distractors: int) -> tuple[list[str], int]:
    """The authors' per-item draw: ``rng.sample`` distractors from ``pool`` minus ``truth``, then
    ``rng.shuffle([truth, *distractors])``. Returns the options and the index of ``truth``."""
    distractors = rng.sample([p for p in pool if p != truth], num_distractors)
    options = [truth, *distractors]
    rng.shuffle(options)
    return options, options.index(truth)


def evaluate_item_sets(model: CultureCLIP, item_sets: Mapping[int, Sequence[MCItem]],
                       group_keys: Sequence[str] = (), **score_kwargs) -> tuple[dict[str, float], dict]:
    """Score ``{seed: items}``; return the seed-aggregated metrics and the skip summary."""
    preds = score_item_sets(model, item_sets, **score_kwargs)
    metrics = aggregate_seeds({s: accuracy_report(p, group_keys) for s, p in preds.items()})
    return metrics, skip_summary(next(iter(preds.values())))


def make_header(*, task: str, dataset: str, split: Optional[str], revision: Optional[str],
                seeds: Optional[Sequence[int]], protocol: Optional[str], metrics: Mapping[str, float],
                **extra: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`cultureclip.eval.results.write_result` (besides model/pretrained/metrics):
    ``write_result(out_dir, model=..., pretrained=..., metrics=metrics, **header)``."""
    seeds = list(seeds) if seeds is not None else None
    info = {"protocol": protocol, "seeds": seeds, "n_skipped": int(metrics.get("n_skipped", 0)), **extra}
    if protocol == "reference":
        info.setdefault("protocol_note", REFERENCE_NOTE)
    return {"task": task, "dataset": str(dataset), "split": split, "revision": revision,
            "seed": seeds[0] if seeds and len(seeds) == 1 else None, "n": int(metrics.get("n", 0)),
            "extra": info}
