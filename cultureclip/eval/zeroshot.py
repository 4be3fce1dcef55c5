"""Zero-shot classification of arbitrary images into arbitrary classes (the daily tool, as a library).

Inputs use CLIP_benchmark's sidecar formats: ``classnames.txt`` (one class per line) and
``zeroshot_classification_templates.txt`` (one template per line, ``{c}`` marks the class name).
With no templates file the single template ``"a photo of a {c}."`` is used: the 80 OpenAI ImageNet
templates were tuned for ImageNet's objects, and for cultural concepts ("a tattoo of a hanbok",
"a {c} in a video game") many of them read oddly; pass a file (e.g. :data:`OPENAI_TEMPLATES_FILE`)
to use them.

Scores are ``softmax(s * cos)`` with ``s = model.logit_scale.exp()`` the model's own learned
temperature (about 100 for CLIP, so this is CLIP's usual ``softmax(100 * logits)``); a fine-tuned
model that learned another temperature gets probabilities calibrated to it. A sigmoid-trained model
(SigLIP, with a ``logit_bias`` ``b``) scores each class on its own, ``sigmoid(s * cos + b)``, as it was
trained (:meth:`CultureCLIP.match_probabilities`). Rankings, and thus all metrics, depend on neither.

Metrics follow CLIP_benchmark's ``zeroshot_classification.evaluate``: ``acc1``, ``acc5`` (top-k
with ``k = min(5, number of classes)``, where CLIP_benchmark reports NaN below 5 classes) and
``mean_per_class_recall`` (sklearn's ``balanced_accuracy_score``: the mean over classes that occur
in the labels of the fraction of their images predicted correctly).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from cultureclip.eval.embed import autocast, zero_shot_classifier
from cultureclip.eval.imagesets import ImageBatches, ImageSet, open_images
from cultureclip.images import DEFAULT_MAX_PIXELS
from cultureclip.model import CultureCLIP

DATA_DIR = Path(__file__).resolve().parent.parent / "data_files"
IMAGENET_CLASSNAMES_FILE = DATA_DIR / "imagenet_classnames.txt"  # open_clip's IMAGENET_CLASSNAMES, in index order
OPENAI_TEMPLATES_FILE = DATA_DIR / "openai_imagenet_templates.txt"  # open_clip's OPENAI_IMAGENET_TEMPLATES
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


def _read_lines(path: Union[str, os.PathLike]) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def load_classnames(path: Union[str, os.PathLike], allow_duplicates: bool = False) -> list[str]:
    """Read a class list, one name per line (CLIP_benchmark's ``classnames.txt``).

    Args:
        path: the file; surrounding whitespace on each line is ignored.
        allow_duplicates: accept a name given twice. Off by default because two classes with the
            same text get the same weights and can never be told apart; the shipped ImageNet list
            needs it (OpenAI's names use "missile" and "sunglasses" twice).

    Raises:
        ValueError: a blank line, a duplicate, or an empty file, naming the file and line numbers.
    """
    lines = [line.strip() for line in _read_lines(path)]
    while lines and not lines[-1]:
        lines.pop()  # a trailing newline at the end of the file is not a blank class
    blank = [i + 1 for i, c in enumerate(lines) if not c]
    if blank:
        raise ValueError(f"{path}: blank class name on line(s) {blank}")
    if not lines:
        raise ValueError(f"{path}: no class names")
    if not allow_duplicates:
        first: dict[str, int] = {}
        dups = []
        for i, c in enumerate(lines, start=1):
            if c in first:
                dups.append(f"{c!r} on lines {first[c]} and {i}")
            first.setdefault(c, i)
        if dups:
            raise ValueError(f"{path}: duplicate class names: {'; '.join(dups)}")
    return lines


def load_templates(path: Union[str, os.PathLike]) -> list[str]:
    """Read prompt templates, one per line, each containing ``{c}`` (blank lines are skipped).

    Raises:
        ValueError: a template without ``{c}`` or one that ``str.format`` cannot fill, naming the line.
    """
    templates = []
    for i, line in enumerate(_read_lines(path), start=1):
        t = line.strip()
        if not t:
            continue
        if "{c}" not in t:
            raise ValueError(f"{path}:{i}: template {t!r} has no '{{c}}' placeholder for the class name")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as exc:  # stray braces, e.g. "{class}"
            raise ValueError(f"{path}:{i}: template {t!r} cannot be filled: {exc!r}") from exc
        templates.append(t)
    if not templates:
        raise ValueError(f"{path}: no templates")
    return templates


@dataclass
class ClassificationResult:
    """Output of :func:`classify`.

    Attributes:
        classnames: the classes, in index order.
        ids: image ids (relative paths) of the images that were classified, in order.
        topk_indices, topk_scores: ``[N, k]`` predicted class indices and their probabilities.
        labels: ``[N]`` true class indices, or ``None`` for unlabelled images.
        metrics: flat: ``n``, ``n_skipped`` and, with labels, ``acc1``, ``acc5``, ``mean_per_class_recall``.
        confusion: ``[C, C]`` counts, rows = true class, columns = predicted (torchmetrics' layout).
        skipped: ``(path, error)`` of images that did not decode or were over the pixel cap.
        skipped_by_reason: ``{reason: count}`` of those (``bad_image``, ``too_large``).
    """

    classnames: list[str]
    ids: list[str]
    topk_indices: torch.Tensor
    topk_scores: torch.Tensor
    labels: Optional[torch.Tensor]
    metrics: dict
    confusion: Optional[torch.Tensor] = None
    skipped: list = field(default_factory=list)
    skipped_by_reason: dict = field(default_factory=dict)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, ``[i, j]`` = images of class ``i`` predicted as ``j``."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> dict:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` from logits ``[N, C]`` and labels ``[N]``.

    Top-k accuracies use ``min(k, C)``; ``acc{k}`` is added when ``k`` is neither 1 nor 5.
    """
    num_classes = logits.shape[1]
    ks = sorted({1, 5, k})
    top = logits.topk(min(max(ks), num_classes), dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]  # [N, kmax]; at most one True per row
    out = {f"acc{j}": hit[:, :min(j, num_classes)].any(dim=1).double().mean().item() for j in ks}
    cm = confusion_matrix(labels, top[:, 0], num_classes)
    support = cm.sum(dim=1)
    present = support > 0  # classes absent from the labels have no recall (sklearn drops them too)
    out["mean_per_class_recall"] = (cm.diag()[present].double() / support[present].double()).mean().item()
    return out


def top_predictions(logits: torch.Tensor, scale: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, class indices)`` ``[N, min(k, C)]`` of the ``k`` best classes per row.

    ``scale``: ``s`` (probabilities ``softmax(s * logits)``), or a function from the cosines ``[N, C]``
    to probabilities (:meth:`CultureCLIP.match_probabilities`, which uses a sigmoid model's bias).
    Ranked by the cosine similarities ``logits`` ``[N, C]``, not by ``softmax(scale * logits)``: with
    ``scale`` ~100, every class more than ~1.03 cosine below the best gets probability exactly 0 in
    float32 (``exp(-103)`` is below its smallest number), and a top-k over those ties would list
    them in arbitrary order.
    """
    topk_indices = logits.topk(min(k, logits.shape[1]), dim=1).indices  # [N, k]
    probs = scale(logits) if callable(scale) else (scale * logits).softmax(dim=1)  # [N, C]
    return probs.gather(1, topk_indices), topk_indices


@torch.no_grad()
def classify(model: CultureCLIP, images: Union[str, os.PathLike, ImageSet], classnames: Sequence[str],
             templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 5, batch_size: int = 64,
             num_workers: int = 0, amp: bool = True, on_error: str = "skip",
             max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> ClassificationResult:
    """Classify every image into one of ``classnames`` with CLIP's zero-shot classifier.

    Args:
        model: the encoder (its ``preprocess_val`` is applied to the images).
        images: an :class:`ImageSet` or a source for :func:`cultureclip.eval.imagesets.open_images`
            (class folders, flat folder, CSV ``path,label``); folder/label names index ``classnames``.
        classnames: the classes; the text for class ``c`` is each template with ``{c}`` filled.
        templates: prompt templates; their normalised embeddings are averaged per class.
        k: how many predictions to keep per image, and the ``k`` of the top-k accuracy (clipped to C).
        batch_size, num_workers: image DataLoader settings (texts use the same batch size).
        amp: bf16 autocast on CUDA.
        on_error: ``"skip"`` undecodable images (counted in ``metrics["n_skipped"]``) or ``"raise"``.
        max_pixels: pixel cap per image, read from the header before decoding (None: Pillow's own
            limit only); a larger image is skipped as ``too_large`` (or raises).

    Returns:
        A :class:`ClassificationResult`.

    Raises:
        ValueError: no image could be decoded.
    """
    classnames = list(classnames)
    image_set = open_images(images, classnames)
    if image_set.labels is not None:
        if image_set.classnames is not None and list(image_set.classnames) != classnames:
            raise ValueError(f"{image_set.source}: its labels index another class list than `classnames`")
        if max(image_set.labels) >= len(classnames) or min(image_set.labels) < 0:
            raise ValueError(f"{image_set.source}: labels out of range for {len(classnames)} classes")
    weights = zero_shot_classifier(model, classnames, templates, batch_size=batch_size, amp=amp)  # [C, D]
    weights = weights.to(model.device)
    batches = ImageBatches(image_set, model.preprocess_val, batch_size=batch_size, num_workers=num_workers,
                           on_error=on_error, max_pixels=max_pixels)
    model.eval()
    logits, labels, ids = [], [], []
    for pixels, y, batch_ids in batches:
        with autocast(model.device, amp):
            feats = model.encode_image(pixels.to(model.device, non_blocking=True))  # [b, D]
        logits.append((feats.float() @ weights.T).cpu())  # [b, C] cosine similarities
        ids.extend(batch_ids)
        if y is not None:
            labels.append(y)
    if not logits:
        raise ValueError(f"no image of {image_set.source} could be decoded ({len(batches.skipped)} skipped)")
    logits_all = torch.cat(logits)  # [N, C]
    topk_scores, topk_indices = top_predictions(logits_all, lambda cos: model.match_probabilities(cos, dim=1), k)
    metrics = {"n": len(ids), "n_skipped": len(batches.skipped)}
    label_t, cm = None, None
    if image_set.labels is not None:
        label_t = torch.cat(labels)
        metrics.update(classification_metrics(logits_all, label_t, k=k))
        cm = confusion_matrix(label_t, logits_all.argmax(dim=1), len(classnames))
    return ClassificationResult(classnames, ids, topk_indices, topk_scores, label_t, metrics, cm,
                                list(batches.skipped), dict(sorted(batches.counter.by_reason.items())))


def write_predictions(result: ClassificationResult, path: Union[str, os.PathLike]) -> Path:
    """CSV ``id,[label,]pred1,score1,...,predk,scorek`` with class names and probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kk = result.topk_indices.shape[1]
    header = ["id"] + (["label"] if result.labels is not None else [])
    header += [x for j in range(1, kk + 1) for x in (f"pred{j}", f"score{j}")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, image_id in enumerate(result.ids):
            row = [image_id] + ([result.classnames[result.labels[n]]] if result.labels is not None else [])
            for c, s in zip(result.topk_indices[n].tolist(), result.topk_scores[n].tolist()):
                row += [result.classnames[c], f"{s:.6f}"]
            w.writerow(row)
    return path


def write_confusion(result: ClassificationResult, path: Union[str, os.PathLike]) -> Path:
    """CSV confusion matrix: header ``true\\pred,<classes...>``, one row per true class."""
    if result.confusion is None:
        raise ValueError("no confusion matrix: the images had no labels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\pred"] + result.classnames)
        for name, row in zip(result.classnames, result.confusion.tolist()):
            w.writerow([name] + row)
    return path
