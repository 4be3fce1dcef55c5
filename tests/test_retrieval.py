"""Tests for cultureclip.eval.retrieval against brute force, naive loops and torchmetrics."""
import faiss
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_recall
from torchmetrics.retrieval import RetrievalRecall

from cultureclip.eval import retrieval as R

N, Q, D = 500, 50, 32
KS = (1, 5, 10)


def unit(n, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.fixture(scope="module")
def data():
    gallery, queries = unit(N, seed=0), unit(Q, seed=1)
    scores = queries @ gallery.T  # [Q, N]
    top = scores.topk(max(KS) + 1, dim=1).values  # [Q, k+1]
    # the reference comparison is only meaningful without (near-)ties at the top
    assert (top[:, :-1] - top[:, 1:]).min() > 1e-5
    return gallery, queries, scores


def random_positive_sets(n_queries, n_gallery, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [set(torch.randint(n_gallery, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n_queries)]


def naive_recall(indices, positive_sets, k):
    return sum(any(int(j) in pos for j in row[:k]) for row, pos in zip(indices, positive_sets)) / len(indices)


# ---------------------------------------------------------------- search vs brute force

def test_flat_search_equals_torch_topk(data):
    gallery, queries, scores = data
    ref_scores, ref_idx = scores.topk(10, dim=1)  # [Q, 10]
    index = R.build_index(gallery, kind="flat", use_gpu="auto")
    got_scores, got_idx = index.search(queries, 10)
    assert got_idx.dtype == torch.int64 and got_scores.dtype == torch.float32
    assert torch.equal(got_idx, ref_idx)
    torch.testing.assert_close(got_scores, ref_scores, atol=1e-5, rtol=0)
    assert (index.kind, index.ntotal, index.dim, index.on_gpu) == ("flat", N, D, False)


def test_ivf_with_all_lists_probed_equals_flat(data):
    gallery, queries, _ = data
    ivf = R.build_index(gallery, kind="ivf")
    assert ivf.nlist == N // R.MIN_POINTS_PER_CENTROID  # 4*sqrt(500) ~ 89 lowered to 12 so lists have >= 39 points
    exact = R.build_index(gallery, kind="ivf", nprobe=ivf.nlist)
    _, flat_idx = R.build_index(gallery).search(queries, 10)
    _, ivf_idx = exact.search(queries, 10)
    assert torch.equal(ivf_idx, flat_idx)
    assert isinstance(faiss.downcast_index(exact.index), faiss.IndexIVFFlat)
    assert exact.index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_ivf_refuses_too_few_training_points(data):
    gallery = data[0]
    with pytest.raises(ValueError, match="39"):
        R.build_index(gallery, kind="ivf", nlist=20)  # 500 < 39 * 20
    with pytest.raises(ValueError, match="kind='flat'"):
        R.build_index(gallery[:30], kind="ivf")
    with pytest.raises(ValueError, match="nprobe"):
        R.build_index(gallery, kind="ivf", nlist=4, nprobe=5)


# ---------------------------------------------------------------- recall vs naive loop and torchmetrics

def test_recall_equals_naive_loop_in_every_positive_format(data):
    gallery, queries, scores = data
    _, idx = R.build_index(gallery).search(queries, 10)
    sets = random_positive_sets(Q, N)
    # make some hits certain, so the test does not pass on all-zero recall
    sets = [s | {int(idx[i, (i // 2) % 10])} if i % 2 else s for i, s in enumerate(sets)]
    got = R.recall_at_k(idx, sets, KS)
    assert got == {k: naive_recall(idx.tolist(), sets, k) for k in KS}
    assert 0 < got[1] < got[10] <= 1
    mask = torch.zeros(Q, N, dtype=torch.bool)
    for i, s in enumerate(sets):
        mask[i, list(s)] = True
    assert R.recall_at_k(idx, mask, KS) == got
    single = scores.argsort(dim=1, descending=True)[:, 3]  # [Q]: every query's 4th-best item
    assert R.recall_at_k(idx, single, KS) == {1: 0.0, 5: 1.0, 10: 1.0}
    assert R.recall_at_k(idx, single.tolist(), KS) == {1: 0.0, 5: 1.0, 10: 1.0}


def test_recall_matches_torchmetrics(data):
    gallery, queries, scores = data
    _, idx = R.build_index(gallery).search(queries, 10)
    # torchmetrics' retrieval_recall zeroes targets whose score is <= 0; cosine + 2 is a positive,
    # order-preserving shift, so it ranks exactly as the raw cosine does
    preds = scores + 2  # [Q, N]
    single = scores.argsort(dim=1, descending=True)[torch.arange(Q), torch.arange(Q) % 12]  # ranks 1..12
    target = torch.zeros(Q, N, dtype=torch.bool)
    target[torch.arange(Q), single] = True
    ours = R.recall_at_k(idx, single, KS)
    for k in KS:
        # one positive per query: IR recall (fraction of positives found) == hit rate == ours
        tm = torch.stack([retrieval_recall(preds[i], target[i], top_k=k) for i in range(Q)]).mean()
        assert ours[k] == pytest.approx(float(tm), abs=1e-7)
        metric = RetrievalRecall(top_k=k)
        metric.update(preds.flatten(), target.flatten(), indexes=torch.arange(Q).repeat_interleave(N))
        assert ours[k] == pytest.approx(float(metric.compute()), abs=1e-7)

    # several positives: ours is the hit rate (CLIP_benchmark), not the fraction of positives found
    sets = random_positive_sets(Q, N, seed=3)
    sets = [s | {int(idx[i, 0])} if i % 3 == 0 else s for i, s in enumerate(sets)]
    multi = torch.zeros(Q, N, dtype=torch.bool)
    for i, s in enumerate(sets):
        multi[i, list(s)] = True
    ours = R.recall_at_k(idx, multi, KS)
    for k in KS:
        hit = torch.stack([retrieval_hit_rate(preds[i], multi[i], top_k=k) for i in range(Q)]).mean()
        frac = torch.stack([retrieval_recall(preds[i], multi[i], top_k=k) for i in range(Q)]).mean()
        assert ours[k] == pytest.approx(float(hit), abs=1e-7)
        assert ours[k] >= float(frac) - 1e-7


def test_ranks_and_retrieval_metrics(data):
    gallery, queries, scores = data
    positives = scores.argsort(dim=1, descending=True)[torch.arange(Q), torch.arange(Q) % 30]  # rank i%30 + 1
    ranks = R.first_positive_ranks(queries, gallery, positives, chunk_size=7)
    assert torch.equal(ranks, torch.arange(Q) % 30 + 1)
    m = R.retrieval_metrics(queries, gallery, positives, ks=KS, prefix="i2t_")
    assert set(m) == {"i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "i2t_mean_rank", "i2t_median_rank",
                      "i2t_mrr"}
    for k in KS:
        assert m[f"i2t_recall@{k}"] == pytest.approx(float((ranks <= k).float().mean()))
    assert m["i2t_mean_rank"] == pytest.approx(float(ranks.float().mean()))
    assert m["i2t_mrr"] == pytest.approx(float((1 / ranks.float()).mean()))
    # several positives: the rank is that of the best one
    two = [{int(p), int(scores[i].argmax())} for i, p in enumerate(positives)]
    assert torch.equal(R.first_positive_ranks(queries, gallery, two), torch.ones(Q, dtype=torch.long))


def test_k_above_gallery_size_is_clipped_in_metrics_and_refused_in_search(data):
    gallery, queries, _ = data
    small = gallery[:4]
    pos = torch.zeros(Q, dtype=torch.long)
    m = R.retrieval_metrics(queries, small, pos, ks=(1, 5, 10), prefix="t_", rank_metrics=False)
    assert m["t_recall@5"] == m["t_recall@10"] == 1.0  # top 5 of 4 items is all of them
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        R.build_index(small).search(queries, 5)
    with pytest.raises(ValueError, match="only 3 were retrieved"):
        R.recall_at_k(torch.zeros(Q, 3, dtype=torch.long), pos, (5,))


def test_bad_inputs_give_clear_errors(data):
    gallery, queries, _ = data
    with pytest.raises(ValueError, match="not L2-normalised"):
        R.build_index(gallery * 3)
    with pytest.raises(ValueError, match="not L2-normalised"):
        R.build_index(gallery).search(queries * 0.5, 1)
    R.build_index(gallery * 3, check_normalized=False)  # allowed when asked for explicitly
    with pytest.raises(ValueError, match="dimension"):
        R.build_index(gallery).search(unit(3, d=D + 1), 1)
    with pytest.raises(ValueError, match="same D"):
        R.retrieval_metrics(unit(3, d=D + 1), gallery, [0, 1, 2])
    with pytest.raises(ValueError, match="2-D"):
        R.build_index(gallery[0])
    with pytest.raises(ValueError, match="NaN"):
        R.build_index(torch.full((3, D), float("nan")))
    with pytest.raises(ValueError, match="kind"):
        R.build_index(gallery, kind="hnsw")
    with pytest.raises(ValueError, match="use_gpu"):
        R.build_index(gallery, use_gpu="yes")
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="no positive"):
        R.recall_at_k(idx, [{1}, set(), {2}], (1,))
    with pytest.raises(ValueError, match="3 queries"):
        R.recall_at_k(idx, [{1}, {2}], (1,))
    with pytest.raises(ValueError, match="outside"):
        R.first_positive_ranks(queries[:2], gallery, [N, 0])


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the error raised when no GPU is visible")
def test_use_gpu_true_without_gpu_raises(data):
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        R.build_index(data[0], use_gpu=True)
    assert R.build_index(data[0], use_gpu="auto").on_gpu is False


# ---------------------------------------------------------------- IVF that keeps its recall promise

def clustered(n, centers, spread, seed):
    """Unit vectors around random cluster centres (a loose mixture, as CLIP features of many concepts)."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(centers.shape[0], (n,), generator=g)
    noise = torch.randn(n, centers.shape[1], generator=g) * spread / centers.shape[1] ** 0.5
    return F.normalize(centers[which] + noise, dim=-1)


@pytest.fixture(scope="module")
def mixture():
    centers = unit(64, 32, seed=5)
    return clustered(8000, centers, 0.8, seed=6), clustered(200, centers, 0.8, seed=7)


def overlap_recall(found, truth):
    """Mean |found_i & truth_i| / k, re-implemented here as the reference."""
    k = truth.shape[1]
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)) / (k * truth.shape[0])


def test_auto_nprobe_reaches_the_requested_recall_against_brute_force(mixture):
    gallery, queries = mixture
    truth = (queries @ gallery.T).topk(10, dim=1).indices  # [Q, 10] brute force
    index = R.build_index(gallery, kind="ivf", target_recall=0.95, tune_queries=queries)
    assert index.nlist == min(round(4 * 8000 ** 0.5), 8000 // R.MIN_POINTS_PER_CENTROID)
    _, found = index.search(queries, 10)
    got = overlap_recall(found, truth)
    assert got >= 0.95 and got == pytest.approx(index.measured_recall, abs=1e-9)
    assert 1 < index.nprobe < index.nlist  # a real trade-off, neither the cheapest nor the exact setting
    # the smaller setting it passed over fell short: nprobe is the first power of two that reaches it
    low = R.build_index(gallery, kind="ivf", nprobe=index.nprobe // 2)
    assert overlap_recall(low.search(queries, 10)[1], truth) < 0.95


def test_auto_nprobe_tuned_on_the_gallery_holds_on_new_queries(mixture):
    gallery, queries = mixture
    index = R.build_index(gallery, kind="ivf")  # default: 0.95 recall@10 on 256 gallery rows, self excluded
    assert index.target_recall == 0.95 and index.tune_k == 10 and index.measured_recall >= 0.95
    truth = (queries @ gallery.T).topk(10, dim=1).indices
    # other queries from the same distribution: within sampling error (200 queries) of the target
    assert overlap_recall(index.search(queries, 10)[1], truth) >= 0.92


def test_ivf_results_report_nlist_nprobe_and_measured_recall(mixture):
    gallery, queries = mixture
    truth = (queries @ gallery.T).topk(1, dim=1).indices.squeeze(1)  # each query's nearest item as positive
    out = R.retrieval_metrics(queries, gallery, truth, ks=(1, 10), index_kind="ivf", rank_metrics=False)
    assert out["i2t_ivf_nlist"] == min(round(4 * 8000 ** 0.5), 8000 // R.MIN_POINTS_PER_CENTROID)
    assert 1 <= out["i2t_ivf_nprobe"] <= out["i2t_ivf_nlist"] and out["i2t_ivf_recall@10_vs_flat"] >= 0.95
    assert "i2t_ivf_nlist" not in R.retrieval_metrics(queries, gallery, truth, ks=(1,), rank_metrics=False)


def test_default_nlist_grows_with_the_gallery_and_is_bounded():
    assert R._ivf_lists(10_000, None) == 256  # 4 * sqrt(N) = 400, lowered to N / 39
    assert R._ivf_lists(100_000, None) == round(4 * 100_000 ** 0.5)
    assert R._ivf_lists(10 ** 6, None) == R.MAX_AUTO_NLIST
    with pytest.raises(ValueError, match="target_recall"):
        R.build_index(unit(200), kind="ivf", target_recall=1.5)
