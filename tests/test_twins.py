"""Tests for cultureclip.eval.twins: hand-built embeddings with known answers, brute force, and end to end."""
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from PIL import Image

from cultureclip import CultureCLIP, schema
from cultureclip.data.pipeline import build_twin_pipeline
from cultureclip.data.shards import TwinShardWriter
from cultureclip.eval import twins as T

# ---------------------------------------------------------------- hand-built embeddings
# pairs (pos concept, pos country, neg concept, neg country, category); "qipao" and "kimono" occur in
# two pairs each, so the vocabulary holds 6 names for 8 images
PAIRS = [("ao dai", "Vietnam", "qipao", "China", "Clothing"),
         ("kimono", "Japan", "hanbok", "Korea", "Clothing"),
         ("dragon dance", "China", "barong", "Indonesia", "Festival"),
         ("qipao", "China", "kimono", "Japan", None)]
VOCAB = sorted({p[0] for p in PAIRS} | {p[2] for p in PAIRS})
# each image's concept ranking, best first (rows interleave pos/neg: image 2p is pos of pair p)
RANKINGS = [["ao dai", "qipao"],                  # 0 right
            ["ao dai", "qipao"],                  # 1 own rank 2, top-1 is its twin
            ["hanbok", "qipao", "ao dai", "barong", "dragon dance", "kimono"],  # 2 own rank 6, twin first
            ["hanbok"],                           # 3 right
            ["qipao", "kimono", "hanbok", "dragon dance", "barong"],  # 4 own rank 4, above its twin
            ["barong"],                           # 5 right
            ["ao dai", "qipao"],                  # 6 own rank 2, top-1 is not its twin (kimono)
            ["kimono"]]                           # 7 right
SWAPPED_CAPTIONS = {2, 3}  # pair 1's images prefer the twin's caption


def hand_embeddings():
    c, n = len(VOCAB), len(RANKINGS)
    d = c + n  # concept dims, then one dim per caption
    concept_feats = torch.eye(c, d)  # [C, D]
    caption_feats = torch.cat([torch.zeros(n, c), torch.eye(n)], dim=1)  # [2P, D]
    rows = []
    for i, ranking in enumerate(RANKINGS):
        order = ranking + [v for v in VOCAB if v not in ranking]
        x = torch.zeros(d)
        for pos, name in enumerate(order):
            x[VOCAB.index(name)] = float(c - pos)  # distinct weights 6..1: no ties anywhere
        own, twin = (1.0, 3.0) if i in SWAPPED_CAPTIONS else (3.0, 1.0)
        x[c + i], x[c + (i ^ 1)] = own, twin  # the same weights on every row, so every norm is equal
        rows.append(x)
    names = [name for p in PAIRS for name in (p[0], p[2])]
    return T.TwinEmbeddings(
        image_feats=F.normalize(torch.stack(rows), dim=-1), caption_feats=caption_feats,
        concept_feats=concept_feats, concepts=VOCAB,
        image_concept=torch.tensor([VOCAB.index(n) for n in names]),
        captions=[f"a photo of {n}" for n in names], keys=[f"p{i // 2}" for i in range(n)],
        roles=[schema.POS_PREFIX, schema.NEG_PREFIX] * (n // 2),
        countries=[x for p in PAIRS for x in (p[1], p[3])], categories=[p[4] for p in PAIRS for _ in range(2)],
        pair_ids=[i // 2 for i in range(n)])


def test_hand_built_embeddings_give_the_expected_metrics():
    m = T.twin_metrics(hand_embeddings(), ks=(1, 5, 10))
    # own-concept ranks: 1, 2, 6, 1, 4, 1, 2, 1
    assert m["img2concept_recall@1"] == 4 / 8
    assert m["img2concept_recall@5"] == 7 / 8
    assert m["img2concept_recall@10"] == 1.0  # 10 > 6 concepts: the whole vocabulary
    assert m["twin_acc"] == 6 / 8  # images 1 and 2 rank their twin higher
    assert m["twin_confusion_rate"] == 2 / 8  # images 1 and 2; image 6's top-1 is not its twin
    assert m["twin_caption_acc"] == m["img2caption_recall@1"] == m["caption2img_recall@1"] == 6 / 8
    assert m["img2caption_recall@5"] == m["caption2img_recall@5"] == 1.0
    assert (m["n_images"], m["n_pairs"], m["n_concepts"]) == (8, 4, 6)

    assert m["n/category=Clothing"] == 4 and m["n/category=Festival"] == 2
    assert not any(k.endswith("=None") for k in m)  # pair 3 has no category: only counted overall
    assert m["img2concept_recall@1/category=Clothing"] == 0.5
    assert m["twin_acc/category=Clothing"] == 0.5
    assert m["twin_confusion_rate/category=Clothing"] == 0.5
    assert m["twin_caption_acc/category=Clothing"] == 0.5
    assert m["twin_acc/category=Festival"] == 1.0
    assert m["img2concept_recall@1/category=Festival"] == 0.5
    assert m["n/country=China"] == 3  # images 1, 4 and 6
    assert m["img2concept_recall@1/country=China"] == 0.0
    assert m["twin_acc/country=China"] == pytest.approx(2 / 3)
    assert m["twin_confusion_rate/country=China"] == pytest.approx(1 / 3)
    assert m["img2concept_recall@5/country=Japan"] == 0.5


def test_confusion_table_and_predictions():
    out = T.confusions(hand_embeddings(), top_n=3)
    assert out["pairs"] == [
        {"concept": "qipao", "predicted": "ao dai", "count": 2, "is_twin": True},
        {"concept": "dragon dance", "predicted": "qipao", "count": 1, "is_twin": False},
        {"concept": "kimono", "predicted": "hanbok", "count": 1, "is_twin": True}]
    preds = out["predictions"]
    assert len(preds) == 8
    worst = preds[0]  # image 2: kimono ranked last, its twin first
    assert (worst["key"], worst["role"], worst["concept"], worst["twin"], worst["predicted"]) == \
        ("p1", schema.POS_PREFIX, "kimono", "hanbok", "hanbok")
    assert worst["twin_margin"] < 0 and not worst["twin_correct"] and not worst["correct"]
    assert [p["twin_margin"] for p in preds] == sorted(p["twin_margin"] for p in preds)
    assert sum(p["correct"] for p in preds) == 4 and sum(p["twin_correct"] for p in preds) == 6


# ---------------------------------------------------------------- exactness against brute force

def random_embeddings(n_pairs=60, n_concepts=70, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    concept_idx = torch.stack([torch.randperm(n_concepts, generator=g)[:2] for _ in range(n_pairs)]).flatten()
    n = 2 * n_pairs
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return T.TwinEmbeddings(
        image_feats=unit(n, d), caption_feats=unit(n, d), concept_feats=unit(n_concepts, d),
        concepts=[f"c{i:03d}" for i in range(n_concepts)], image_concept=concept_idx, captions=[""] * n,
        keys=[str(i // 2) for i in range(n)], roles=[schema.POS_PREFIX, schema.NEG_PREFIX] * n_pairs,
        countries=[None] * n, categories=[None] * n, pair_ids=[None] * n)


@pytest.mark.parametrize("index_kind", ["flat", "ivf"])
def test_faiss_path_equals_brute_force_topk(index_kind):
    emb = random_embeddings()
    got = T.per_image_outcomes(emb, ks=(1, 5, 10), index_kind=index_kind)  # ivf: every list probed at this size
    own = torch.arange(emb.n_images)
    cases = {"img2concept": (emb.image_feats, emb.concept_feats, emb.image_concept),
             "img2caption": (emb.image_feats, emb.caption_feats, own),
             "caption2img": (emb.caption_feats, emb.image_feats, own)}
    for name, (queries, gallery, positive) in cases.items():
        top = (queries @ gallery.T).topk(10, dim=1).indices  # [Q, 10]
        for k in (1, 5, 10):
            ref = (top[:, :k] == positive[:, None]).any(dim=1).float()
            assert torch.equal(got[f"{name}_recall@{k}"], ref), (name, k)
    scores = emb.image_feats @ emb.concept_feats.T  # [2P, C]
    twin = emb.image_concept[own ^ 1]
    assert torch.equal(got["twin_acc"], (scores[own, emb.image_concept] > scores[own, twin]).float())
    assert torch.equal(got["twin_confusion_rate"], (scores.argmax(dim=1) == twin).float())


# ---------------------------------------------------------------- end to end with a tiny model

E2E_PAIRS = [("qipao", "ao dai", "Clothing", "China", "Vietnam"),
             ("erhu", "haegeum", "Art", "China", "Korea"),
             ("kimono", "hanbok", "Clothing", "Japan", "Korea"),
             ("qipao", "kimono", "Clothing", "China", "Japan"),  # repeated names: one vocabulary entry each
             ("pagoda", "stupa", None, None, None),
             ("lion dance", "dragon dance", "Festival", "China", "China")]


def png(seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # PNG bytes are stored untouched: lossless round trip
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CultureCLIP.from_config(TINY_VIT, name="tiny-vit-twins")


def test_end_to_end_through_the_pipeline(tmp_path, model):
    images = {}
    with TwinShardWriter(tmp_path / "val", maxcount=4) as w:  # two shards: batches cross a shard boundary
        for i, (pos, neg, cat, pc, nc) in enumerate(E2E_PAIRS):
            images[i] = (png(2 * i), png(2 * i + 1))
            meta = {schema.POS_CONCEPT: pos, schema.NEG_CONCEPT: neg, schema.POS_CAPTION: f"a {pos} at a fair",
                    schema.NEG_CAPTION: f"a {neg} in a street", schema.CATEGORY: cat, schema.POS_COUNTRY: pc,
                    schema.NEG_COUNTRY: nc, schema.PAIR_ID: i}
            w.write(f"pair{i:03d}", *images[i], meta)
    pipe = build_twin_pipeline(str(tmp_path / "val"), model.preprocess_val, model.tokenizer, batch_size=4,
                               train=False)
    emb = T.embed_twin_split(model, pipe, amp=False)
    assert emb.n_images == 12 and emb.concepts == sorted({n for p in E2E_PAIRS for n in p[:2]})
    assert emb.keys[:4] == ["pair000", "pair000", "pair001", "pair001"]
    assert emb.roles[:2] == [schema.POS_PREFIX, schema.NEG_PREFIX]

    m = T.twin_metrics(emb)
    for name in ("twin_acc", "twin_caption_acc", "twin_confusion_rate", *(
            f"{t}_recall@{k}" for t in ("img2concept", "caption2img", "img2caption") for k in (1, 5, 10))):
        assert 0.0 <= m[name] <= 1.0, name
        assert f"{name}/category=Clothing" in m and f"{name}/country=Korea" in m
    assert m["n/category=Clothing"] == 6 and m["n/country=China"] == 5 and m["n_concepts"] == 10
    assert m["img2concept_recall@10"] >= m["img2concept_recall@5"] >= m["img2concept_recall@1"]

    # independent recomputation from the model's own encoders, without the pipeline
    with torch.no_grad():
        model.eval()
        pixels = torch.stack([model.preprocess_val(Image.open(io.BytesIO(b)).convert("RGB"))
                              for i in range(len(E2E_PAIRS)) for b in images[i]])  # [12, 3, H, W]
        img = model.encode_image(pixels)  # [12, D]
        own = model.encode_text([n for p in E2E_PAIRS for n in p[:2]])  # [12, D]
        twin = model.encode_text([n for p in E2E_PAIRS for n in (p[1], p[0])])  # [12, D]
    margin = (img * own).sum(-1) - (img * twin).sum(-1)  # [12]
    assert margin.abs().min() > 1e-4  # no near-tie, so the comparison below is meaningful
    assert m["twin_acc"] == pytest.approx(float((margin > 0).float().mean()))
    torch.testing.assert_close(emb.image_feats, img, atol=1e-5, rtol=0)


def test_minimal_batches_and_bad_pairs(model):
    def batch(pos_concept, neg_concept):
        texts = {schema.POS_CONCEPT: [pos_concept], schema.NEG_CONCEPT: [neg_concept],
                 schema.POS_CAPTION: ["a thing"], schema.NEG_CAPTION: ["another thing"]}
        out = {k + schema.TEXT_SUFFIX: v for k, v in texts.items()}
        out.update({schema.POS_IMAGE: torch.randn(1, 3, 32, 32), schema.NEG_IMAGE: torch.randn(1, 3, 32, 32),
                    schema.KEY: ["k0"]})
        return out

    emb = T.embed_twin_split(model, [batch("erhu", "guzheng")], amp=False)  # no optional fields at all
    m = T.twin_metrics(emb)
    assert m["n_images"] == 2 and not any("/" in k for k in m)
    with pytest.raises(ValueError, match="not a twin pair"):
        T.embed_twin_split(model, [batch("erhu", "erhu")], amp=False)
    with pytest.raises(ValueError, match="no twin pairs"):
        T.embed_twin_split(model, [], amp=False)
    bad = batch("erhu", "guzheng")
    del bad[schema.POS_CAPTION + schema.TEXT_SUFFIX]
    with pytest.raises(KeyError, match=schema.POS_CAPTION):
        T.embed_twin_split(model, [bad], amp=False)
    with pytest.raises(ValueError, match="unknown group"):
        T.twin_metrics(emb, groups=("region",))


# ---------------------------------------------------------------- the shared metric definition
def test_twin_outcomes_match_a_brute_force_loop():
    from cultureclip import metrics
    g = torch.Generator().manual_seed(0)
    n, c, d = 40, 7, 5
    images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    vocab = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    own = torch.randint(0, c, (n,), generator=g)
    twin = (own + torch.randint(1, c, (n,), generator=g)) % c  # never the own concept
    images[0] = vocab[own[0]] + vocab[twin[0]]  # an exact tie between own and twin: not a success
    got = metrics.twin_outcomes(images, vocab, own, twin)
    for i in range(n):
        scores = [float(sum(images[i][k] * vocab[j][k] for k in range(d))) for j in range(c)]
        best = max(range(c), key=lambda j: scores[j])
        assert got["twin_acc"][i] == float(scores[own[i]] > scores[twin[i]] + 1e-6), i
        assert got["img2concept_recall@1"][i] == float(best == own[i]), i
        assert got["twin_confusion_rate"][i] == float(best == twin[i]), i
    assert got["twin_acc"][0] == 0.0
    # a precomputed top-1 (e.g. from FAISS) is used as given
    top1 = twin.clone()
    forced = metrics.twin_outcomes(images, vocab, own, twin, top1=top1)
    assert forced["twin_confusion_rate"].sum() == n and forced["img2concept_recall@1"].sum() == 0
    torch.testing.assert_close(forced["twin_acc"], got["twin_acc"])
