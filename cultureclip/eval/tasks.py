"""Evaluation tasks as small adapters: ``task(model, **explicit args) -> (metrics, header, extra)``.

Each adapter wraps one library evaluation (twin pairs, a cultural benchmark, ImageNet, COCO retrieval)
and returns what :func:`cultureclip.eval.results.write_result` stores: flat ``metrics``, the
reproducibility ``header`` (``task``, ``dataset``, ``split``, ``revision``, ``seed``, ``n``) and JSON-ready
``extra`` (tables the report draws from). The config group ``conf/eval/`` picks tasks by ``_target_``
(a ``_partial_`` of one of these functions with its arguments), so there is no name dispatch here.

A new task is one function with this signature plus one YAML file; ``cultureclip.evaluate`` calls it as
``partial(model)``.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from cultureclip.data.pipeline import build_twin_pipeline, count_pairs, expand_shards, make_loader
from cultureclip.eval.cultural import get_evaluator
from cultureclip.eval.general import image_text_retrieval, imagenet_zeroshot
from cultureclip.eval.twins import confusions, embed_twin_split, twin_metrics
from cultureclip.images import DEFAULT_MAX_PIXELS
from cultureclip.model import CultureCLIP
from cultureclip.progress import track

TaskOutput = tuple[dict, dict, dict]  # (metrics, header without model/pretrained, extra)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; any other value is returned as is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def is_local_model(name: str) -> bool:
    """Whether a model name is a saved directory or a checkpoint file (its ``pretrained`` is then unused)."""
    return os.path.exists(str(name).removeprefix("local-dir:"))


def model_label(name: str, pretrained: Optional[str]) -> tuple[str, Optional[str]]:
    """``(model, pretrained)`` as the result header records them.

    A local directory or ``.ckpt`` carries its own weights, and ``CultureCLIP.from_pretrained``
    ignores ``pretrained`` for it, so the header records ``None`` rather than a misleading tag.
    """
    return (str(name), None) if is_local_model(name) else (str(name), pretrained)


def model_slug(name: str, pretrained: Optional[str] = None) -> str:
    """A folder name for a model's results.

    ``ViT-B-32-quickgelu`` + ``openai`` -> ``ViT-B-32-quickgelu_openai``; ``hf-hub:org/repo`` -> ``org_repo``;
    a path keeps its last two components, skipping ``checkpoints`` and the ``.ckpt`` suffix
    (``outputs/run/model`` -> ``run_model``, ``outputs/run/checkpoints/last.ckpt`` -> ``run_last``).
    """
    name = str(name).removeprefix("local-dir:")
    if not name.startswith("hf-hub:") and ("/" in name or os.sep in name or is_local_model(name)):
        parts = [p for p in Path(name.removesuffix(".ckpt")).parts if p not in ("", ".", "..", "/", "checkpoints")]
        text = "_".join(parts[-2:])
    else:
        text = name.removeprefix("hf-hub:") + (f"_{pretrained}" if pretrained else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _split_name(urls: Sequence[str]) -> str:
    """The folder the shards sit in (``.../toy/val/shard-000000.tar`` -> ``val``)."""
    folders = sorted({Path(u).parent.name for u in urls})
    return folders[0] if len(folders) == 1 else ",".join(folders)


def _inside(path: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def twins(model: CultureCLIP, shards: Union[str, Sequence[str]], batch_size: int = 64, num_workers: int = 0,
          amp: bool = True, ks: Sequence[int] = (1, 5, 10), index_kind: str = "flat", top_confusions: int = 20,
          max_predictions: Optional[int] = None, caption_context_length: Optional[int] = None,
          concept_context_length: Optional[int] = 16, toy_dir: Optional[str] = None, toy_seed: int = 0,
          task: str = "twins", dataset: Optional[str] = None, split: Optional[str] = None,
          max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, on_error: str = "skip") -> TaskOutput:
    """Fine-grained concept recognition on a twin-pair shard split (:mod:`cultureclip.eval.twins`).

    Args:
        model: the encoder.
        shards: shard spec (folder, brace pattern, glob, list; see ``expand_shards``).
        batch_size, num_workers, amp: loading and embedding (workers are capped at the shard count,
            because an evaluation pass hands out whole shards).
        ks, index_kind: recall cut-offs and FAISS index (``twin_metrics``).
        top_confusions: most frequent (concept, predicted) mistakes kept in ``extra["confusions"]``.
        max_predictions: per-image predictions kept in ``extra["predictions"]``, worst twin margin
            first; None keeps all (the report's confusion matrix counts the kept ones).
        caption_context_length, concept_context_length: token lengths; the concept one only applies
            to towers where a shorter context leaves features unchanged (as in training).
        toy_dir: the embedded toy set's folder; built first if ``shards`` lies inside it and it is
            missing (as the training data config does), ignored for other shards.
        toy_seed: seed of that toy set.
        task, dataset, split: header labels; default dataset is the shard spec and split the shards' folder.
        max_pixels: larger images are skipped and counted (``too_large``); None: Pillow's limit only.
        on_error: a damaged or truncated shard: ``"skip"`` counts it in ``n_skipped``
            (``bad_shard``/``truncated_shard``), ``"raise"`` stops with an error naming it.

    Returns:
        ``(metrics, header, extra)``; ``extra`` holds ``shards`` (urls, to fetch images for the
        gallery), ``confusions`` and ``predictions`` (see :func:`cultureclip.eval.twins.confusions`).
    """
    specs = [shards] if isinstance(shards, str) else list(shards)
    if toy_dir is not None and all(_inside(s, toy_dir) for s in specs):
        from cultureclip.data.toy import ensure_toy_shards  # the generator is only needed here
        ensure_toy_shards(toy_dir, seed=toy_seed)
    urls = [os.path.abspath(u) for u in expand_shards(specs)]
    workers = min(num_workers, len(urls))
    concept_ctx = concept_context_length if model.supports_short_context else None
    pipeline = build_twin_pipeline(
        urls, model.preprocess_val, model.tokenizer, batch_size, train=False, num_workers=workers,
        caption_context_length=caption_context_length, concept_context_length=concept_ctx, max_pixels=max_pixels,
        on_error=on_error)
    pairs = count_pairs(urls)  # from sizes.json; None for remote shards (the bar then shows no total)
    loader = track(make_loader(pipeline, num_workers=workers), f"twins {split or _split_name(urls)}",
                   total=None if pairs is None else math.ceil(pairs / batch_size), unit="batches", summary=False)
    emb = embed_twin_split(model, loader, amp=amp,
                           caption_context_length=caption_context_length, concept_context_length=concept_ctx,
                           where=f"twin split {split or _split_name(urls)!r} ({len(urls)} shard(s): {urls[0]}, ...)")
    metrics = twin_metrics(emb, ks=ks, index_kind=index_kind)
    conf = confusions(emb, top_n=top_confusions, index_kind=index_kind)
    header = {"task": task, "dataset": dataset or ",".join(map(str, specs)), "split": split or _split_name(urls),
              "revision": None, "seed": None, "n": emb.n_images}
    extra = {"shards": urls, "confusions": conf["pairs"], "predictions": conf["predictions"][:max_predictions],
             "n_predictions": emb.n_images}
    return metrics, header, extra


def cultural(model: CultureCLIP, name: str, source: Any = None, **kwargs: Any) -> TaskOutput:
    """One registered cultural benchmark (``cultureclip.eval.cultural.EVALUATORS``: ``globalrg_retrieval``,
    ``globalrg_grounding``, ``crope``, ``cultureverse``).

    Args:
        model: the encoder.
        name: the registry name.
        source: hub id or local file/folder; None keeps the benchmark's own default (its hub id).
        **kwargs: the benchmark's own arguments (``split``, ``revision``, ``seeds``, ``protocol``,
            ``batch_size``, ``num_workers``, ``images_dir``, ...).

    Returns:
        ``(metrics, header, extra)``: the benchmark's header with its ``extra`` moved out.
    """
    evaluate = get_evaluator(name)
    metrics, header = evaluate(model, **kwargs) if source is None else evaluate(model, source=source, **kwargs)
    header = dict(header)
    return metrics, header, dict(header.pop("extra", None) or {})


def imagenet(model: CultureCLIP, folder: str, classnames_path: Optional[str] = None,
             templates_path: Optional[str] = None, wnid_mapping_path: Optional[str] = None,
             batch_size: int = 64, num_workers: int = 0, amp: bool = True, on_error: str = "skip",
             task: str = "imagenet_zeroshot", split: str = "val") -> TaskOutput:
    """Zero-shot ImageNet accuracy on a local folder (:func:`cultureclip.eval.general.imagenet_zeroshot`).

    Args:
        model: the encoder.
        folder, classnames_path, templates_path, wnid_mapping_path, batch_size, num_workers, amp,
            on_error: as in ``imagenet_zeroshot`` (None: the shipped 1000 names and 80 templates).
        task, split: header labels.
    """
    metrics = imagenet_zeroshot(model, folder, classnames_path, templates_path, wnid_mapping_path,
                                batch_size=batch_size, num_workers=num_workers, amp=amp, on_error=on_error)
    header = {"task": task, "dataset": str(folder), "split": split, "revision": None, "seed": None,
              "n": int(metrics.get("n", 0))}
    extra = {"classnames": str(classnames_path or "shipped OpenAI ImageNet names"),
             "templates": str(templates_path or "shipped 80 OpenAI templates")}
    return metrics, header, extra


def retrieval(model: CultureCLIP, captions_file: str, image_root: Optional[str] = None,
              split: Optional[str] = "test", ks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
              num_workers: int = 0, amp: bool = True, on_error: str = "skip",
              task: str = "image_text_retrieval") -> TaskOutput:
    """Image-text retrieval recall@k on a local COCO/Flickr set (:func:`cultureclip.eval.general.image_text_retrieval`).

    Args:
        model: the encoder.
        captions_file, image_root, split, ks, batch_size, num_workers, amp, on_error: as in
            ``image_text_retrieval`` (Karpathy JSON or ``image,caption`` CSV).
        task: header label (``coco_retrieval``, ``flickr30k_retrieval``, ...).
    """
    metrics = image_text_retrieval(model, captions_file, image_root, split=split, ks=ks, batch_size=batch_size,
                                   num_workers=num_workers, amp=amp, on_error=on_error)
    header = {"task": task, "dataset": str(captions_file), "split": split, "revision": None, "seed": None,
              "n": int(metrics["n_images"])}
    return metrics, header, {"image_root": str(image_root) if image_root else None}


def toy_general(model: CultureCLIP, toy_dir: str, toy_seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                amp: bool = True, task: str = "toy_general_zeroshot") -> TaskOutput:
    """Zero-shot accuracy on the held-out split of the toy general set (:mod:`cultureclip.data.toy_general`).

    The set is built in ``toy_dir`` first if missing (a complete one is used as built); scoring is
    :func:`imagenet` on its class folders with its own class names and templates (8 colour names,
    prompts ensembled over 12 shapes).
    """
    from cultureclip.data.toy_general import CLASSNAMES_FILE, TEMPLATES_FILE, ensure_general_set
    root = ensure_general_set(toy_dir, seed=toy_seed, keep_any=True)
    return imagenet(model, str(root / "eval"), classnames_path=str(root / CLASSNAMES_FILE),
                    templates_path=str(root / TEMPLATES_FILE), batch_size=batch_size, num_workers=num_workers,
                    amp=amp, task=task, split="eval")
