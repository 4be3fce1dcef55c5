"""Forgetting checks: general zero-shot ImageNet accuracy and COCO/Flickr image-text retrieval.

Both read local copies only (nothing is downloaded) and return flat dicts for ``write_result``.

ImageNet (:func:`imagenet_zeroshot`) uses the shipped 1000 OpenAI class names and 80 templates
(``cultureclip/data_files``, generated from ``open_clip.zero_shot_metadata``). Class folders may
be named by class name or by WordNet id (``n01440764``). WordNet-id folders are mapped to class
indices by a mapping file when one is given (line ``i`` starts with the wnid of class ``i``, so
ImageNet's own ``LOC_synset_mapping.txt`` works as is), otherwise by the sorted order of the wnid
folders, which is the order the class-name list follows (torchvision ``ImageFolder`` and
CLIP_benchmark do the same). The sorted-order rule is only safe for the complete set of classes,
so a folder with another number of wnid folders than class names is refused without a mapping file.

Retrieval (:func:`image_text_retrieval`) follows CLIP_benchmark's ``zeroshot_retrieval``: an image
query is a hit at ``k`` if *any* of its captions is among the ``k`` best texts; a text query is a hit
if its image is among the ``k`` best images. The search is :mod:`cultureclip.eval.retrieval`'s exact
(flat) FAISS index, shared with the cultural benchmarks.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from cultureclip.eval.embed import embed_image_batches, embed_texts
from cultureclip.eval.imagesets import ImageBatches, ImageSet, folder_images
from cultureclip.eval.retrieval import retrieval_metrics
from cultureclip.eval.zeroshot import (IMAGENET_CLASSNAMES_FILE, OPENAI_TEMPLATES_FILE, classify, load_classnames,
                                       load_templates)
from cultureclip.model import CultureCLIP

WNID = re.compile(r"^n\d{8}$")
PathLike = Union[str, os.PathLike]


def load_wnid_mapping(path: PathLike) -> dict[str, int]:
    """``wnid -> class index`` from a file whose line ``i`` starts with the wnid of class ``i``.

    Anything after the first whitespace is ignored (``n01440764 tench, Tinca tinca``); blank lines
    are skipped. Errors name the line.
    """
    mapping: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            wnid = line.split()[0]
            if not WNID.match(wnid):
                raise ValueError(f"{path}:{line_no}: {wnid!r} is not a WordNet id like n01440764")
            if wnid in mapping:
                raise ValueError(f"{path}:{line_no}: {wnid} listed twice")
            mapping[wnid] = len(mapping)
    return mapping


def imagenet_images(folder: PathLike, classnames: Sequence[str],
                    wnid_mapping_path: Optional[PathLike] = None) -> ImageSet:
    """List an ImageNet-style folder whose labels index ``classnames`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} does not exist")
    subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not subdirs or not all(WNID.match(d) for d in subdirs):
        return folder_images(folder, classnames)  # class-name folders (or a flat, unlabelled folder)
    if wnid_mapping_path is not None:
        mapping = load_wnid_mapping(wnid_mapping_path)
        if len(mapping) != len(classnames):
            raise ValueError(f"{wnid_mapping_path} lists {len(mapping)} wnids for {len(classnames)} class names")
    elif len(subdirs) == len(classnames):
        mapping = {w: i for i, w in enumerate(subdirs)}
    else:
        raise ValueError(f"{folder} has {len(subdirs)} wnid folders for {len(classnames)} class names; the "
                         f"sorted-order mapping would shift labels, pass a wnid mapping file "
                         f"(e.g. LOC_synset_mapping.txt)")
    return folder_images(folder, mapping)


def imagenet_zeroshot(model: CultureCLIP, folder: PathLike, classnames_path: Optional[PathLike] = None,
                      templates_path: Optional[PathLike] = None, wnid_mapping_path: Optional[PathLike] = None,
                      batch_size: int = 64, num_workers: int = 0, amp: bool = True,
                      on_error: str = "skip") -> dict:
    """Zero-shot top-1/top-5 accuracy on a local ImageNet(-style) validation folder.

    Args:
        model: the encoder.
        folder: ``folder/<wnid or class name>/<image>``.
        classnames_path: class list in label order (default: the shipped 1000 OpenAI ImageNet
            names); duplicate names are allowed, as OpenAI's list has two.
        templates_path: templates (default: the shipped 80 OpenAI ImageNet templates).
        wnid_mapping_path: optional wnid order file (see :func:`load_wnid_mapping`).
        batch_size, num_workers, amp, on_error: as in :func:`cultureclip.eval.zeroshot.classify`.

    Returns:
        ``{"acc1", "acc5", "mean_per_class_recall", "n", "n_skipped"}``.
    """
    # duplicates are harmless here (labels come from folders) and standard (OpenAI's two "missile"s)
    classnames = load_classnames(classnames_path or IMAGENET_CLASSNAMES_FILE, allow_duplicates=True)
    templates = load_templates(templates_path or OPENAI_TEMPLATES_FILE)
    images = imagenet_images(folder, classnames, wnid_mapping_path)
    if images.labels is None:
        raise ValueError(f"{folder} has no class folders, so there is nothing to score")
    result = classify(model, images, classnames, templates, k=5, batch_size=batch_size,
                      num_workers=num_workers, amp=amp, on_error=on_error)
    return dict(result.metrics)


def load_captions(captions_file: PathLike, image_root: Optional[PathLike] = None,
                  split: Optional[str] = "test") -> tuple[list[str], list[str], list[int]]:
    """Read a retrieval set: ``(image paths, captions, caption -> image index)``.

    Args:
        captions_file: a Karpathy-split JSON (``{"images": [{"filename", "filepath"?, "split",
            "sentences": [{"raw"}]}]}``) or a CSV with header ``image,caption`` (several rows per
            image; an optional ``split`` column is filtered like the JSON's).
        image_root: folder the image names are relative to (default: the captions file's folder);
            a JSON ``filepath`` (COCO's ``val2014``) is joined in between.
        split: keep only this split (``"test"``, ``"val"``, ``"train"``, ``"restval"``); ``None`` keeps all.

    Raises:
        ValueError / FileNotFoundError naming the entry or CSV line.
    """
    captions_file = Path(captions_file)
    root = Path(image_root) if image_root is not None else captions_file.parent
    images: dict[str, int] = {}  # relative path -> image index, in first-seen order
    captions, owner = [], []

    def add(rel: str, caption: str, where: str) -> None:
        if not caption.strip():
            raise ValueError(f"{where}: empty caption")
        captions.append(caption.strip())
        owner.append(images.setdefault(rel, len(images)))

    if captions_file.suffix.lower() == ".json":
        data = json.loads(captions_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{captions_file}: expected Karpathy format {{'images': [...]}}")
        for n, entry in enumerate(data["images"]):
            where = f"{captions_file}: images[{n}]"
            if "filename" not in entry or not entry.get("sentences"):
                raise ValueError(f"{where} needs 'filename' and a non-empty 'sentences' list")
            if split is not None and entry.get("split") != split:
                continue
            rel = os.path.join(entry.get("filepath", ""), entry["filename"])
            for s in entry["sentences"]:
                add(rel, s.get("raw", ""), where)
    else:
        with open(captions_file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not {"image", "caption"} <= set(header):
                raise ValueError(f"{captions_file}:1: header must have 'image' and 'caption' columns, got {header}")
            reader.fieldnames = header
            for row in reader:
                where = f"{captions_file}:{reader.line_num}"
                if split is not None and "split" in header and (row.get("split") or "").strip() != split:
                    continue
                rel = (row.get("image") or "").strip()
                if not rel:
                    raise ValueError(f"{where}: empty image")
                add(rel, row.get("caption") or "", where)
    if not images:
        raise ValueError(f"{captions_file}: no images" + (f" in split {split!r}" if split else ""))
    paths = [str(root / rel) for rel in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {captions_file} not found under {root}, e.g. {missing[:3]}")
    return paths, captions, owner


def retrieval_recalls(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), use_gpu: Union[bool, str] = "auto") -> dict:
    """CLIP_benchmark recall@k from normalised features ``[I, D]``, ``[T, D]`` and caption owners ``[T]``.

    Both directions go through :func:`cultureclip.eval.retrieval.retrieval_metrics` (exact flat
    FAISS search); a ``k`` larger than the gallery is recall over the whole gallery.
    """
    captions_of: list[list[int]] = [[] for _ in range(len(image_features))]
    for t, i in enumerate(text_to_image.tolist()):
        captions_of[i].append(t)
    # image queries: a hit if any of the image's captions is in the top k (hence the caption lists)
    out = retrieval_metrics(image_features, text_features, captions_of, ks, prefix="i2t_", use_gpu=use_gpu,
                            rank_metrics=False)
    out.update(retrieval_metrics(text_features, image_features, text_to_image, ks, prefix="t2i_",
                                 use_gpu=use_gpu, rank_metrics=False))
    return out


def image_text_retrieval(model: CultureCLIP, captions_file: PathLike, image_root: Optional[PathLike] = None,
                         split: Optional[str] = "test", ks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
                         num_workers: int = 0, amp: bool = True, on_error: str = "skip") -> dict:
    """Image->text and text->image recall@k on a local COCO/Flickr-style set (see :func:`load_captions`).

    Images that do not decode are skipped together with their captions and counted in ``n_skipped``.

    Returns:
        ``{"i2t_recall@1", "t2i_recall@1", ..., "n_images", "n_texts", "n_skipped"}``.
    """
    paths, captions, owner = load_captions(captions_file, image_root, split)
    ids = [str(i) for i in range(len(paths))]  # the id is the image index, to find kept images back
    batches = ImageBatches(ImageSet(paths, None, ids, None, str(captions_file)), model.preprocess_val,
                           batch_size=batch_size, num_workers=num_workers, on_error=on_error)
    kept: list[int] = []

    def pixels_only():
        for pixels, _, batch_ids in batches:
            kept.extend(int(i) for i in batch_ids)
            yield pixels

    image_features = embed_image_batches(model, pixels_only(), amp=amp)  # [I', D]
    if not kept:
        raise ValueError(f"no image of {captions_file} could be decoded")
    new_index = {old: new for new, old in enumerate(kept)}
    keep_text = [t for t, o in enumerate(owner) if o in new_index]  # captions of skipped images go too
    text_features = embed_texts(model, [captions[t] for t in keep_text], batch_size=batch_size, amp=amp)
    text_to_image = torch.tensor([new_index[owner[t]] for t in keep_text], dtype=torch.long)
    out = retrieval_recalls(image_features, text_features, text_to_image, ks)
    out.update(n_images=len(kept), n_texts=len(keep_text), n_skipped=len(batches.skipped))
    return out
