"""FAISS inner-product search over L2-normalised features, and recall / rank metrics.

Pure tensors in, tensors and flat dicts out: no model, no I/O. Features must be L2-normalised, so
inner product is cosine similarity (the score CLIP uses); a norm far from 1 is an error, because a
forgotten normalisation (the reference code's training defect) silently changes every ranking.

Ties: FAISS and ``torch.topk`` may order equal scores differently (neither documents an order), and
float rounding differs between FAISS kernels and a torch matmul at the last bit. Recall can only
differ when a positive and a non-positive tie at the k-th place; the rank metrics here are
optimistic on ties (rank = 1 + number of items scoring *strictly* higher than the best positive).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import faiss
import numpy as np
import torch

# a query's relevant gallery items: one index per query [Q], a bool mask [Q, N], or an index set per query
Positives = Union[torch.Tensor, Sequence[Union[int, Sequence[int], set]]]

NORM_TOL = 1e-2  # loose enough for bf16-autocast features (~4e-3 error), tight enough to catch raw projections
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per IVF list
MAX_AUTO_NLIST = 2048  # default nlist bound: k-means and list assignment of 1M points stay ~a minute on a CPU
KMEANS_POINTS_PER_LIST = 64  # k-means trains on at most this many gallery points per list (FAISS: 256)
TUNE_QUERIES = 256  # held-out queries for the auto nprobe, sampled from the gallery when none are given


def _as_float32(x: Union[torch.Tensor, np.ndarray], name: str, check_normalized: bool) -> np.ndarray:
    """A C-contiguous float32 [N, D] numpy array, checked (FAISS reads raw memory)."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf")
    if check_normalized:
        norms = np.linalg.norm(arr, axis=1)  # [N]
        worst = float(np.abs(norms - 1).max())
        if worst > NORM_TOL:
            raise ValueError(f"{name} is not L2-normalised (a row norm is off by {worst:.3g}); inner product "
                             f"is cosine only on unit vectors: F.normalize(x, dim=-1) first")
    return np.ascontiguousarray(arr, dtype=np.float32)


@dataclass
class SearchIndex:
    """An inner-product FAISS index (``kind`` ``"flat"``: exact; ``"ivf"``: approximate unless
    ``nprobe == nlist``) over ``ntotal`` items of dimension ``dim``; ``search`` returns torch tensors.
    ``on_gpu``: moved with ``faiss.index_cpu_to_all_gpus``; ``nlist``/``nprobe`` are None for flat."""

    index: faiss.Index
    kind: str
    ntotal: int
    dim: int
    on_gpu: bool = False
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    target_recall: Optional[float] = None  # the auto nprobe's goal (recall@tune_k against flat), if tuned
    measured_recall: Optional[float] = None  # recall@tune_k against flat at the chosen nprobe, on tune queries
    tune_k: Optional[int] = None
    _keep: list = field(default_factory=list, repr=False)  # objects FAISS points at (IVF quantizer)

    def search(self, queries: Union[torch.Tensor, np.ndarray], k: int,
               check_normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` gallery items per query, best first.

        ``queries``: [Q, D] L2-normalised (``check_normalized`` raises on a row that is not unit norm);
        ``k``: 1 <= k <= ntotal (FAISS would pad with index -1; we refuse instead). Returns
        ``(scores, indices)``: float32 [Q, k] inner products and int64 [Q, k] gallery indices.
        """
        q = _as_float32(queries, "queries", check_normalized)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be an int in [1, {self.ntotal}] (the gallery size), got {k!r}")
        scores, indices = self.index.search(q, int(k))  # [Q, k] each
        return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))


def _ivf_lists(n: int, nlist: Optional[int]) -> int:
    """IVF list count for ``n`` training points: ``nlist``, checked, or the default of :func:`build_index`."""
    if nlist is None:
        nlist = min(max(1, round(4 * n ** 0.5)), n // MIN_POINTS_PER_CENTROID, MAX_AUTO_NLIST)
        if nlist < 1:
            raise ValueError(f"an IVF index needs at least {MIN_POINTS_PER_CENTROID} gallery points to train "
                             f"one list, got {n}; use kind='flat' (exact, and fast at this size)")
    elif not isinstance(nlist, int) or nlist < 1 or n < MIN_POINTS_PER_CENTROID * nlist:
        raise ValueError(f"nlist={nlist!r} needs a positive int and at least {MIN_POINTS_PER_CENTROID} * nlist "
                         f"= {MIN_POINTS_PER_CENTROID * max(1, int(nlist or 1))} training points, got {n}; "
                         f"lower nlist, leave it None, or use kind='flat'")
    return nlist


def build_index(gallery: Union[torch.Tensor, np.ndarray], kind: str = "flat", nlist: Optional[int] = None,
                nprobe: Optional[int] = None, use_gpu: Union[bool, str] = "auto",
                check_normalized: bool = True, target_recall: float = 0.95, tune_k: int = 10,
                tune_queries: Union[torch.Tensor, np.ndarray, None] = None, seed: int = 0) -> SearchIndex:
    """Build an inner-product index over a gallery of normalised features.

    Args:
        gallery: [N, D] L2-normalised features (converted to float32).
        kind: ``"flat"`` (``IndexFlatIP``, exact brute force) or ``"ivf"`` (``IndexIVFFlat`` with the
            inner-product metric, k-means-trained on the gallery itself).
        nlist: IVF lists; default ``round(4 * sqrt(N))``, at most 2048 (``MAX_AUTO_NLIST``), lowered so
            that every list has at least 39 training points (FAISS's own minimum). An explicit ``nlist``
            with too few points is an error. k-means trains on at most 64 gallery points per list.
        nprobe: IVF lists visited per query. None (default): the smallest of 1, 2, 4, ... (then nlist,
            which is exact) whose recall@``tune_k`` against an exact search reaches ``target_recall`` on
            the tuning queries, measured here; the result reports it (``measured_recall``).
        use_gpu: ``"auto"``: GPU when FAISS sees one; True: GPU or an error; False: CPU.
        check_normalized: raise when a gallery row is not unit norm.
        target_recall: the auto nprobe's goal, in (0, 1].
        tune_k: k of the tuning recall (clipped to N - 1).
        tune_queries: [T, D] queries to tune on (e.g. the evaluation's own; at most 256, drawn with
            ``seed``). Default: 256 gallery rows drawn with ``seed``; each is then left out of its own neighbour lists, so that finding
            itself (always exact) does not inflate the recall.

    Raises:
        ValueError: bad kind/shape/norm, or too few points to train the requested IVF; RuntimeError:
            ``use_gpu=True`` but this FAISS build has no GPU support or sees no GPU.
    """
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    x = _as_float32(gallery, "gallery", check_normalized)
    n, d = x.shape
    keep: list = []
    if kind == "flat":
        index, nlist, nprobe = faiss.IndexFlatIP(d), None, None
    elif kind == "ivf":
        nlist = _ivf_lists(n, nlist)
        if nprobe is not None and not (isinstance(nprobe, (int, np.integer)) and 1 <= nprobe <= nlist):
            raise ValueError(f"nprobe must be an int in [1, nlist={nlist}] or None (auto), got {nprobe!r}")
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
        quantizer = faiss.IndexFlatIP(d)
        keep.append(quantizer)  # the IVF index holds a raw pointer to it
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = KMEANS_POINTS_PER_LIST  # FAISS subsamples with a fixed seed
        index.train(x)  # FAISS k-means uses a fixed seed, so the lists are deterministic
        index.nprobe = nlist if nprobe is None else int(nprobe)
    else:
        raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
    index.add(x)

    can_gpu = hasattr(faiss, "index_cpu_to_all_gpus") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu is True and not can_gpu:
        raise RuntimeError("use_gpu=True but FAISS has no GPU support or sees no GPU (faiss-cpu is installed, or "
                           "CUDA_VISIBLE_DEVICES hides the devices); pass use_gpu='auto' or False")
    on_gpu = bool(use_gpu) and can_gpu
    if on_gpu:
        keep.append(index)
        index = faiss.index_cpu_to_all_gpus(index)  # GPU search caps k at 2048 (FAISS limit)
    result = SearchIndex(index=index, kind=kind, ntotal=n, dim=d, on_gpu=on_gpu, nlist=nlist, nprobe=nprobe,
                         _keep=keep)
    if kind == "ivf" and nprobe is None:
        _tune_nprobe(result, x, target_recall, tune_k, tune_queries, seed)
    return result


def _set_nprobe(index: SearchIndex, nprobe: int) -> None:
    faiss.ParameterSpace().set_index_parameter(index.index, "nprobe", int(nprobe))  # CPU or GPU index
    index.nprobe = int(nprobe)


def _tune_nprobe(index: SearchIndex, gallery: np.ndarray, target: float, k: int,
                 queries: Union[torch.Tensor, np.ndarray, None], seed: int) -> None:
    """Set ``index.nprobe`` to the smallest power of two (or nlist) reaching ``target`` recall@k against
    an exact search of the same gallery, and record the measured recall."""
    n = index.ntotal
    own = queries is None  # queries drawn from the gallery: drop each one's own row from both top lists
    if own:
        rows = np.random.default_rng(seed).choice(n, size=min(TUNE_QUERIES, n), replace=False)
        q = gallery[rows]
    else:
        q = _as_float32(queries, "tune_queries", check_normalized=False)
        if q.shape[1] != index.dim:
            raise ValueError(f"tune_queries have dimension {q.shape[1]}, the gallery has {index.dim}")
        if q.shape[0] > TUNE_QUERIES:  # a seeded sample keeps the tuning cost fixed
            q = q[np.sort(np.random.default_rng(seed).choice(q.shape[0], size=TUNE_QUERIES, replace=False))]
    k = max(1, min(int(k), n - 1 if own else n))
    fetch = min(k + int(own), n)
    exact = faiss.IndexFlatIP(index.dim)
    exact.add(gallery)
    _, truth = exact.search(q, fetch)  # [T, fetch]

    def top_k(found: np.ndarray) -> list[set]:
        if not own:
            return [set(r[:k].tolist()) for r in found]
        return [set([j for j in r.tolist() if j != rows[i]][:k]) for i, r in enumerate(found)]

    truth_sets = top_k(truth)
    cap = min(index.nlist, 2048) if index.on_gpu else index.nlist  # FAISS GPU IVF probes at most 2048 lists
    nprobe, recall = 1, 0.0
    while True:
        _set_nprobe(index, nprobe)
        _, found = index.index.search(q, fetch)
        recall = float(np.mean([len(a & b) / k for a, b in zip(top_k(found), truth_sets)]))
        if recall >= target or nprobe >= cap:
            break
        nprobe = min(2 * nprobe, cap)
    index.target_recall, index.measured_recall, index.tune_k = target, recall, k


def positive_pairs(positives: Positives, n_queries: int,
                   n_gallery: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise any positives format to ``(query_idx, gallery_idx)`` int64 pair lists.

    Args:
        positives: int64 [Q] (one positive per query), bool [Q, N] mask, or a length-Q sequence whose
            items are an int or an iterable of ints.
        n_queries, n_gallery: Q and N (N range-checks the indices; None skips the upper-bound check).

    Raises:
        ValueError: wrong length/shape, an index out of range, or a query with no positive (its
            recall is undefined, and silently counting it as a miss or a hit would bias the mean).
    """
    if isinstance(positives, torch.Tensor) and positives.dtype == torch.bool:
        if positives.dim() != 2 or positives.shape[0] != n_queries:
            raise ValueError(f"a positives mask must be [Q={n_queries}, N], got {tuple(positives.shape)}")
        if n_gallery is not None and positives.shape[1] != n_gallery:
            raise ValueError(f"positives mask has {positives.shape[1]} columns, the gallery has {n_gallery}")
        q, g = positives.nonzero(as_tuple=True)
    elif isinstance(positives, torch.Tensor):
        if positives.dim() != 1 or positives.shape[0] != n_queries or positives.is_floating_point():
            raise ValueError(f"positive indices must be an int tensor [Q={n_queries}], got "
                             f"{positives.dtype} {tuple(positives.shape)}")
        q, g = torch.arange(n_queries), positives.long().cpu()
    else:
        if len(positives) != n_queries:
            raise ValueError(f"got {len(positives)} positive sets for {n_queries} queries")
        sets = [[p] if isinstance(p, (int, np.integer)) else list(p) for p in positives]
        q = torch.tensor([i for i, s in enumerate(sets) for _ in s], dtype=torch.long)
        g = torch.tensor([int(j) for s in sets for j in s], dtype=torch.long)
    q, g = q.long().cpu(), g.long().cpu()
    if g.numel() and (g.min() < 0 or (n_gallery is not None and g.max() >= n_gallery)):
        raise ValueError(f"a positive index is outside [0, {n_gallery if n_gallery is not None else 'N'})")
    missing = (torch.bincount(q, minlength=n_queries) == 0).nonzero().flatten()
    if missing.numel():
        raise ValueError(f"{missing.numel()} queries have no positive (first: query {int(missing[0])})")
    return q, g


def hit_matrix(indices: torch.Tensor, positives: Positives, n_gallery: Optional[int] = None) -> torch.Tensor:
    """Bool [Q, k]: whether ``indices[i, j]`` is a positive of query i (index -1 never is)."""
    n_q = indices.shape[0]
    if n_q == 0 or indices.shape[1] == 0:
        raise ValueError(f"indices are empty (shape {tuple(indices.shape)})")
    q, g = positive_pairs(positives, n_q, n_gallery)
    indices = indices.long().cpu()
    # encode (query, item) as one int64 so membership is a single vectorised isin
    m = int(max(int(indices.max()) + 1, int(g.max()) + 1, 1))
    pos_keys = q * m + g  # [P]
    idx_keys = torch.arange(n_q).unsqueeze(1) * m + indices.clamp(min=0)  # [Q, k]
    return torch.isin(idx_keys, pos_keys) & (indices >= 0)


def hits_at_k(indices: torch.Tensor, positives: Positives, ks: Sequence[int] = (1, 5, 10),
              n_gallery: Optional[int] = None) -> dict[int, torch.Tensor]:
    """Per-query hit@k, ``{k: bool [Q]}``: any positive among the first k retrieved.

    ``n_gallery`` (optional) range-checks the positives, so an off-by-one never reads as a miss.
    A k larger than the number of retrieved columns raises ValueError.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be [Q, k], got shape {tuple(indices.shape)}")
    for k in ks:
        if not 1 <= k <= indices.shape[1]:
            raise ValueError(f"recall@{k} needs the top {k}, but only {indices.shape[1]} were retrieved")
    found = hit_matrix(indices, positives, n_gallery).cumsum(dim=1) > 0  # [Q, k]: a positive at column <= j
    return {k: found[:, k - 1] for k in ks}


def recall_at_k(indices: torch.Tensor, positives: Positives, ks: Sequence[int] = (1, 5, 10),
                n_gallery: Optional[int] = None) -> dict[int, float]:
    """Recall@k as in CLIP_benchmark: the fraction of queries with *any* positive in their top k.

    This is "hit rate", not the IR recall (fraction of a query's positives retrieved) that
    ``torchmetrics.retrieval_recall`` computes. CLIP_benchmark uses it because retrieval sets such as
    COCO give each image 5 equally correct captions: finding one is success, and the IR recall
    would cap image->text recall@1 at 1/5. With exactly one positive per query both definitions agree.

    ``indices``: [Q, K] retrieved gallery indices, best first; ``positives``: see :func:`positive_pairs`;
    each k of ``ks`` <= K; ``n_gallery``: N, to range-check the positives (optional). Returns ``{k: recall}``.
    """
    hits = hits_at_k(indices, positives, ks, n_gallery)
    return {k: float(h.sum()) / h.numel() for k, h in hits.items()}  # an exact ratio, not a float32 mean


@torch.no_grad()
def first_positive_ranks(query_feats: torch.Tensor, gallery_feats: torch.Tensor, positives: Positives,
                         chunk_size: int = 1024) -> torch.Tensor:
    """1-based rank of each query's best-scoring positive, int64 [Q], by exact chunked matmul.

    rank = 1 + number of gallery items scoring strictly higher than the best positive (optimistic on
    ties); hit@k is ``rank <= k`` up to ties. Cost: one [chunk, N] score block at a time.
    """
    query_feats, gallery_feats = query_feats.float().cpu(), gallery_feats.float().cpu()
    n_q, n_g = query_feats.shape[0], gallery_feats.shape[0]
    q, g = positive_pairs(positives, n_q, n_g)
    ranks = torch.empty(n_q, dtype=torch.long)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        scores = query_feats[start:stop] @ gallery_feats.T  # [c, N]
        sel = (q >= start) & (q < stop)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[q[sel] - start, g[sel]] = True
        best_pos = scores.masked_fill(~mask, float("-inf")).max(dim=1, keepdim=True).values  # [c, 1]
        ranks[start:stop] = (scores > best_pos).sum(dim=1) + 1
    return ranks


def retrieval_hits(query_feats: torch.Tensor, gallery_feats: torch.Tensor, positives: Positives,
                   ks: Sequence[int] = (1, 5, 10), index_kind: str = "flat", nlist: Optional[int] = None,
                   nprobe: Optional[int] = None, use_gpu: Union[bool, str] = "auto"):
    """Search the gallery once and return per-query hits for every k.

    A k above the gallery size N is computed as hit@N (the whole gallery is the top k; always a
    hit), and keeps its requested k, so result keys line up across datasets of any size.

    Returns:
        ``(hits, scores, indices)``: ``{k: bool [Q]}`` for each requested k, and the search result
        float32 / int64 [Q, min(max(ks), N)].
    """
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"queries {tuple(query_feats.shape)} and gallery {tuple(gallery_feats.shape)} must be "
                         f"[Q, D] and [N, D] with the same D")
    hits, scores, indices, _ = _search_hits(query_feats, gallery_feats, positives, ks, index_kind, nlist, nprobe,
                                            use_gpu)
    return hits, scores, indices


def _search_hits(query_feats, gallery_feats, positives, ks, index_kind, nlist, nprobe, use_gpu):
    """:func:`retrieval_hits`, and the :class:`SearchIndex` it searched (auto nprobe tuned on the queries)."""
    n = gallery_feats.shape[0]
    clipped = {k: min(int(k), n) for k in ks}
    index = build_index(gallery_feats, kind=index_kind, nlist=nlist, nprobe=nprobe, use_gpu=use_gpu,
                        tune_queries=query_feats if index_kind == "ivf" else None)
    scores, indices = index.search(query_feats, max(clipped.values()))  # [Q, K]
    hits = hits_at_k(indices, positives, sorted(set(clipped.values())), n_gallery=n)
    return {k: hits[clipped[k]] for k in ks}, scores, indices, index


def retrieval_metrics(query_feats: torch.Tensor, gallery_feats: torch.Tensor, positives: Positives,
                      ks: Sequence[int] = (1, 5, 10), prefix: str = "i2t_", index_kind: str = "flat",
                      nlist: Optional[int] = None, nprobe: Optional[int] = None,
                      use_gpu: Union[bool, str] = "auto", rank_metrics: bool = True) -> dict[str, float]:
    """Recall@k (see :func:`recall_at_k`) and rank metrics for queries against a gallery, as a flat dict.

    Args:
        query_feats, gallery_feats: [Q, D] and [N, D] normalised features.
        positives: see :func:`positive_pairs`; every query needs at least one.
        ks: recall cut-offs; a k above N is recall@N (see :func:`retrieval_hits`).
        prefix: key prefix, e.g. ``"i2t_"`` gives ``i2t_recall@1``.
        index_kind, nlist, nprobe, use_gpu: see :func:`build_index`.
        rank_metrics: add ``{prefix}mean_rank``, ``{prefix}median_rank`` and ``{prefix}mrr`` from
            :func:`first_positive_ranks` (an exact pass, as costly as a flat search).

    Returns:
        ``{f"{prefix}recall@{k}": float, ...}``; an IVF search adds ``{prefix}ivf_nlist``,
        ``{prefix}ivf_nprobe`` and, when nprobe was tuned, ``{prefix}ivf_recall@{k}_vs_flat`` (measured
        on the queries at build time), so an approximate result always says how approximate it is.
    """
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"queries {tuple(query_feats.shape)} and gallery {tuple(gallery_feats.shape)} must be "
                         f"[Q, D] and [N, D] with the same D")
    hits, _, _, index = _search_hits(query_feats, gallery_feats, positives, ks, index_kind, nlist, nprobe, use_gpu)
    out = {f"{prefix}recall@{k}": float(h.sum()) / h.numel() for k, h in hits.items()}
    if index.kind == "ivf":
        out[f"{prefix}ivf_nlist"], out[f"{prefix}ivf_nprobe"] = float(index.nlist), float(index.nprobe)
        if index.measured_recall is not None:
            out[f"{prefix}ivf_recall@{index.tune_k}_vs_flat"] = index.measured_recall
    if rank_metrics:
        ranks = first_positive_ranks(query_feats, gallery_feats, positives).float()  # [Q]
        out[f"{prefix}mean_rank"] = float(ranks.mean())
        out[f"{prefix}median_rank"] = float(np.median(ranks.numpy()))  # torch.median is the lower median
        out[f"{prefix}mrr"] = float((1.0 / ranks).mean())
    return out
