"""Fine-grained concept recognition over a twin-pair split (the CultureCLIP task).

Every image of every pair is a query, the positive (``pos``) and the twin (``neg``) image alike.
Each is labelled with its own concept, and its *twin* is the other concept of its pair, the
look-alike from another culture. Image rows are interleaved, ``2p`` = pos and ``2p + 1`` = neg of
pair ``p``, so the twin of row ``i`` is row ``i ^ 1``.

Metrics (flat keys; each also per category and per country as ``name/category=Clothing``):

- ``twin_acc``, ``img2concept_recall@1``, ``twin_confusion_rate``: defined once in
  :mod:`cultureclip.metrics` (training's validation logs the same as ``val/<name>``);
- ``img2concept_recall@k``: image -> the full concept vocabulary (FAISS), hit if its concept is in the top k;
- ``caption2img_recall@k`` / ``img2caption_recall@k``: a caption's only positive is the image it was
  written for, and an image's only positive is its own caption;
- ``twin_caption_acc``: ``twin_acc`` with its own caption against the twin's caption of the pair.

The vocabulary is the sorted set of all concept names, so a concept that occurs in several pairs
(e.g. "kimono" twinned with both "hanfu" and "yukata") is one entry, embedded once; its images keep
the twin of their own pair. Names are compared exactly (after the shard writer's strip), so
"Kimono" and "kimono" are two concepts. Concept names are embedded bare, with no prompt template,
as the paper's concept loss does.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from cultureclip import metrics as twin_metric_defs
from cultureclip import schema
from cultureclip.eval.embed import embed_image_batches, embed_texts
from cultureclip.eval.retrieval import build_index, hits_at_k, retrieval_hits
from cultureclip.model import CultureCLIP

COUNTRY = "country"  # group label in metric keys; the image's own country (pos_country or neg_country)
GROUPS = (schema.CATEGORY, COUNTRY)


@dataclass
class TwinEmbeddings:
    """Everything :func:`twin_metrics` needs, aligned on image rows (``2p`` pos, ``2p + 1`` neg of pair ``p``).

    Attributes:
        image_feats: float32 [2P, D] normalised image features.
        caption_feats: float32 [2P, D]; row i is the caption written for image i.
        concept_feats: float32 [C, D]; row c is the bare name ``concepts[c]``.
        concepts: the sorted concept vocabulary, length C.
        image_concept: int64 [2P], vocabulary index of each image's concept.
        captions, keys, roles, countries, categories, pair_ids: per-image lists of length 2P (``keys``
            is the pair's ``__key__``, ``roles`` is ``schema.POS_PREFIX``/``NEG_PREFIX``, so an image is
            found again as ``(key, role)``; absent optional fields are None).
        n_skipped: samples the pipeline dropped (sum of ``batch[schema.N_SKIPPED]``).
    """

    image_feats: torch.Tensor
    caption_feats: torch.Tensor
    concept_feats: torch.Tensor
    concepts: list[str]
    image_concept: torch.Tensor
    captions: list[str]
    keys: list[str]
    roles: list[str]
    countries: list[Optional[str]]
    categories: list[Optional[str]]
    pair_ids: list
    n_skipped: int = 0

    @property
    def n_images(self) -> int:
        return self.image_feats.shape[0]

    @property
    def twin_index(self) -> torch.Tensor:
        """int64 [2P]: row of each image's twin image (and caption)."""
        return torch.arange(self.n_images) ^ 1

    @property
    def twin_concept(self) -> torch.Tensor:
        """int64 [2P]: vocabulary index of each image's twin concept."""
        return self.image_concept[self.twin_index]


def _column(batch: dict, key: str, size: int, required: bool) -> list:
    if key not in batch:
        if required:
            raise KeyError(f"twin batch lacks {key!r} (has {sorted(batch)}); build it with "
                           f"cultureclip.data.pipeline.build_twin_pipeline")
        return [None] * size
    values = list(batch[key])
    if len(values) != size:
        raise ValueError(f"batch field {key!r} has {len(values)} entries for {size} pairs")
    return values


def embed_twin_split(model: CultureCLIP, batches: Iterable[dict], amp: bool = True, text_batch_size: int = 256,
                     caption_context_length: Optional[int] = None,
                     concept_context_length: Optional[int] = None, where: str = "the split") -> TwinEmbeddings:
    """Embed both images of every pair, every caption and each distinct concept name once.

    Args:
        model: the model to evaluate (left in eval mode, as the shared embed helpers leave it).
        batches: twin batch dicts (``build_twin_pipeline(..., train=False)`` or its loader); used:
            ``POS_IMAGE``/``NEG_IMAGE`` [B, 3, H, W], the four raw-text lists (text key +
            ``TEXT_SUFFIX``), ``KEY``, and optionally ``CATEGORY``, ``POS_COUNTRY``, ``NEG_COUNTRY``,
            ``PAIR_ID``, ``N_SKIPPED``. Token tensors are ignored: captions and names are tokenised here
            from the raw strings, so the result does not depend on how the pipeline tokenised. A skip
            report (:func:`cultureclip.schema.is_skip_report`) only adds to ``n_skipped``.
        amp: bf16 autocast on CUDA (see :func:`cultureclip.eval.embed.autocast`).
        text_batch_size: texts per encoder call.
        caption_context_length, concept_context_length: token lengths (None: the model's).
        where: names the split in the error raised when it holds no valid pair.

    Raises:
        ValueError: no pairs, or a pair whose two concept names are equal (not a twin pair; its
            twin accuracy would be 0 by a tie, so it is refused rather than scored).
    """
    image_chunks = []
    captions, names, keys, roles, countries, categories, pair_ids = [], [], [], [], [], [], []
    n_skipped = 0
    for batch in batches:
        n_skipped += int(batch.get(schema.N_SKIPPED, 0) or 0)
        if schema.is_skip_report(batch):  # a stream part with skips and no pair: only its count
            continue
        pos, neg = batch[schema.POS_IMAGE], batch[schema.NEG_IMAGE]  # [B, 3, H, W] each
        b = pos.shape[0]
        if b == 0:
            continue
        feats = embed_image_batches(model, [torch.cat([pos, neg])], amp=amp)  # [2B, D]: one tower call
        image_chunks.append(torch.stack([feats[:b], feats[b:]], dim=1).reshape(2 * b, -1))  # [2B, D] interleaved
        col = {k: _column(batch, k + schema.TEXT_SUFFIX, b, True) for k in schema.TEXT_KEYS}
        meta = {k: _column(batch, k, b, False) for k in schema.OPTIONAL_FIELDS}
        pair_keys = _column(batch, schema.KEY, b, True)
        for r in range(b):
            if col[schema.POS_CONCEPT][r] == col[schema.NEG_CONCEPT][r]:
                raise ValueError(f"pair {pair_keys[r]!r} has the same concept {col[schema.POS_CONCEPT][r]!r} on "
                                 f"both sides: not a twin pair")
            captions += [col[schema.POS_CAPTION][r], col[schema.NEG_CAPTION][r]]
            names += [col[schema.POS_CONCEPT][r], col[schema.NEG_CONCEPT][r]]
            countries += [meta[schema.POS_COUNTRY][r], meta[schema.NEG_COUNTRY][r]]
            keys += [pair_keys[r]] * 2
            roles += [schema.POS_PREFIX, schema.NEG_PREFIX]
            categories += [meta[schema.CATEGORY][r]] * 2
            pair_ids += [meta[schema.PAIR_ID][r]] * 2
    if not image_chunks:
        raise ValueError(f"{where} holds no twin pairs ({n_skipped} samples were skipped by the pipeline; "
                         f"its warnings name them)")
    concepts = sorted(set(names))  # sorted, never hash order: the vocabulary is the same in every run
    lookup = {c: i for i, c in enumerate(concepts)}
    return TwinEmbeddings(
        image_feats=torch.cat(image_chunks),
        caption_feats=embed_texts(model, captions, text_batch_size, amp, context_length=caption_context_length),
        concept_feats=embed_texts(model, concepts, text_batch_size, amp, context_length=concept_context_length),
        concepts=concepts, image_concept=torch.tensor([lookup[n] for n in names], dtype=torch.long),
        captions=captions, keys=keys, roles=roles, countries=countries, categories=categories,
        pair_ids=pair_ids, n_skipped=n_skipped)


def _concept_search(emb: TwinEmbeddings, k: int, index_kind: str, use_gpu: Union[bool, str]):
    """Top-min(k, C) concepts per image: float32 / int64 [2P, k']."""
    index = build_index(emb.concept_feats, kind=index_kind, use_gpu=use_gpu)
    return index.search(emb.image_feats, min(k, index.ntotal))


def _twin_margins(emb: TwinEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Own-minus-twin score per image [2P], for concept names and for captions."""
    img, names, caps = emb.image_feats, emb.concept_feats, emb.caption_feats  # [2P, D], [C, D], [2P, D]
    concept = twin_metric_defs.twin_margin(img, names[emb.image_concept], names[emb.twin_concept])
    caption = twin_metric_defs.twin_margin(img, caps, caps[emb.twin_index])
    return concept, caption


def per_image_outcomes(emb: TwinEmbeddings, ks: Sequence[int] = (1, 5, 10), index_kind: str = "flat",
                       use_gpu: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """Every metric's per-query outcome, float [2P] each (the metrics are their means over images).

    Caption-to-image outcomes sit on the row of the caption, which is the row of its image.
    """
    ks = list(ks)
    n_c = len(emb.concepts)
    own = torch.arange(emb.n_images)  # [2P]: each image's caption has the same row
    _, top = _concept_search(emb, max(ks), index_kind, use_gpu)  # [2P, k']
    concept_hits = hits_at_k(top, emb.image_concept, sorted({min(k, n_c) for k in ks}), n_gallery=n_c)
    cap2img, _, _ = retrieval_hits(emb.caption_feats, emb.image_feats, own, ks, index_kind, use_gpu=use_gpu)
    img2cap, _, _ = retrieval_hits(emb.image_feats, emb.caption_feats, own, ks, index_kind, use_gpu=use_gpu)
    _, caption_margin = _twin_margins(emb)
    out = {f"img2concept_recall@{k}": concept_hits[min(k, n_c)] for k in ks}
    out.update({f"caption2img_recall@{k}": h for k, h in cap2img.items()})
    out.update({f"img2caption_recall@{k}": h for k, h in img2cap.items()})
    # twin_acc, img2concept_recall@1, twin_confusion_rate: the definitions validation uses too
    shared = twin_metric_defs.twin_outcomes(emb.image_feats, emb.concept_feats, emb.image_concept,
                                            emb.twin_concept, top1=top[:, 0])
    out.update({k: v for k, v in shared.items() if k != twin_metric_defs.CONCEPT_TOP1 or 1 in ks})
    out["twin_caption_acc"] = caption_margin > 0  # strict: a tie is not a success
    return {name: v.float() for name, v in out.items()}


def twin_metrics(emb: TwinEmbeddings, ks: Sequence[int] = (1, 5, 10), index_kind: str = "flat",
                 use_gpu: Union[bool, str] = "auto", groups: Sequence[str] = GROUPS) -> dict[str, float]:
    """Fine-grained concept recognition metrics of one split, as a flat dict.

    Args:
        emb: from :func:`embed_twin_split`.
        ks: recall cut-offs; a k above the gallery size is recall@(gallery size), key unchanged.
        index_kind, use_gpu: see :func:`cultureclip.eval.retrieval.build_index`; ``"flat"`` is exact,
            ``"ivf"`` (default nprobe) is approximate once a gallery has more than 32 IVF lists.
        groups: per-group breakdowns, among ``schema.CATEGORY`` and ``COUNTRY``; images whose value is
            None are in no group (they still count overall).

    Returns:
        Overall metrics (see the module docstring), ``n_images``, ``n_pairs``, ``n_concepts``,
        ``n_skipped``, and for each group value ``f"{metric}/{group}={value}"`` plus the number of
        images ``f"n/{group}={value}"``.
    """
    outcomes = per_image_outcomes(emb, ks, index_kind, use_gpu)
    out: dict[str, float] = {name: float(v.double().mean()) for name, v in outcomes.items()}
    out.update(n_images=emb.n_images, n_pairs=emb.n_images // 2, n_concepts=len(emb.concepts),
               n_skipped=emb.n_skipped)
    labels = {schema.CATEGORY: emb.categories, COUNTRY: emb.countries}
    for group in groups:
        if group not in labels:
            raise ValueError(f"unknown group {group!r}; choose from {sorted(labels)}")
        values = labels[group]
        for value in sorted({v for v in values if v is not None}, key=str):
            mask = torch.tensor([v == value for v in values])  # [2P]
            out[f"n/{group}={value}"] = int(mask.sum())
            for name, v in outcomes.items():
                out[f"{name}/{group}={value}"] = float(v[mask].double().mean())
    return out


def confusions(emb: TwinEmbeddings, top_n: Optional[int] = 20, index_kind: str = "flat",
               use_gpu: Union[bool, str] = "auto") -> dict[str, list[dict]]:
    """The most frequent top-1 mistakes and a per-image prediction table (JSON-ready).

    Args:
        emb: from :func:`embed_twin_split`.
        top_n: how many (concept, predicted) pairs to keep; None keeps all.
        index_kind, use_gpu: see :func:`cultureclip.eval.retrieval.build_index`.

    Returns:
        ``{"pairs": [...], "predictions": [...]}``. ``pairs``: ``{"concept", "predicted", "count",
        "is_twin"}`` for wrong top-1 predictions, most frequent first (ties by name). ``predictions``:
        one dict per image, ``key``/``role`` to fetch it from the shards, its concept, twin, top-1
        prediction and score, ``correct``, ``twin_correct`` and ``twin_margin`` (own minus twin
        score); sorted by ``twin_margin`` ascending, so the worst twin confusions come first.
    """
    scores, top = _concept_search(emb, 1, index_kind, use_gpu)  # [2P, 1]
    margin, _ = _twin_margins(emb)  # [2P]
    names = emb.concepts
    own_names = [names[c] for c in emb.image_concept.tolist()]
    twin_names = [names[c] for c in emb.twin_concept.tolist()]
    counts: Counter = Counter()
    predictions = []
    for i, pred in enumerate(names[c] for c in top[:, 0].tolist()):
        own, tw = own_names[i], twin_names[i]
        if pred != own:
            counts[(own, pred)] += 1
        predictions.append({
            "key": emb.keys[i], "role": emb.roles[i], "pair_id": emb.pair_ids[i], "category": emb.categories[i],
            "country": emb.countries[i], "caption": emb.captions[i], "concept": own, "twin": tw,
            "predicted": pred, "predicted_score": float(scores[i, 0]), "correct": pred == own,
            "twin_correct": bool(margin[i] > 0), "twin_margin": float(margin[i])})
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    twins_of = set(zip(own_names, twin_names))
    return {"pairs": [{"concept": c, "predicted": p, "count": n, "is_twin": (c, p) in twins_of}
                      for (c, p), n in pairs],
            "predictions": sorted(predictions, key=lambda r: r["twin_margin"])}
