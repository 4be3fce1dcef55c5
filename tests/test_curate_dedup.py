"""Stage dedup: normalised names, native names and embedding neighbours within (category, country),
checked against a brute-force reference; merges listed in the report and the card."""
import json

import numpy as np
import pytest

from cultureclip import schema
from cultureclip.curate.stages import concepts, dedup
from cultureclip.curate.backends import embeddings as emb
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.registry import Context

NGRAM = {"backend": "ngram", "dim": 1024}


def seed_concepts(tmp_path, items):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"features": ["f"], **i}, ensure_ascii=False) + "\n" for i in items))
    concepts.run({"sources": ["seed"], "seed": {"file": str(seed)}}, Context(out_dir=tmp_path))


ITEMS = [
    {"concept": "Phở", "country": "Vietnam", "category": "Cuisine", "features": ["rice noodles", "broth"]},
    {"concept": "Pho", "country": "Vietnam", "category": "Cuisine", "features": ["beef slices"]},
    {"concept": "Pho", "country": "Laos", "category": "Cuisine"},  # another country: never merged
    {"concept": "Kimono", "country": "Japan", "category": "Clothing", "native_name": "着物"},
    {"concept": "Kimonos", "country": "Japan", "category": "Clothing", "native_name": "きもの"},
    {"concept": "Kimono", "country": "Japan", "category": "Art"},  # another category: never merged
    {"concept": "Wafuku", "country": "Japan", "category": "Clothing", "native_name": "着物"},
    {"concept": "Hanbok", "country": "South Korea", "category": "Clothing"},
]


def reference_clusters(items, threshold):
    """Brute force: all pairs of one (category, country), merged on equal normalised names or native names
    or cosine >= threshold; transitive closure by repeated relabelling."""
    label = list(range(len(items)))
    feats = emb.embed([i["concept"] for i in items], NGRAM).numpy()
    sims = feats @ feats.T
    changed = True
    while changed:
        changed = False
        for a in range(len(items)):
            for b in range(len(items)):
                ia, ib = items[a], items[b]
                if (ia["category"], ia["country"]) != (ib["category"], ib["country"]) or label[a] == label[b]:
                    continue
                same = (up.normalize_name(ia["concept"]) == up.normalize_name(ib["concept"])
                        or (ia.get("native_name") and ia.get("native_name") == ib.get("native_name"))
                        or sims[a, b] >= threshold)
                if same:
                    label[a] = label[b] = min(label[a], label[b])
                    changed = True
    groups = {}
    for i, lab in enumerate(label):
        groups.setdefault(lab, set()).add((items[i]["concept"], items[i]["country"], items[i]["category"]))
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("threshold", [0.75, 0.99])
def test_dedup_matches_brute_force(tmp_path, threshold):
    seed_concepts(tmp_path, ITEMS)
    report = dedup.run({"embedding": NGRAM, "threshold": threshold}, Context(out_dir=tmp_path))
    recs = dedup.load_deduped(tmp_path)
    got = []
    for r in recs:
        members = {(r["concept"], r["country"], r["category"])}
        members |= {(m["concept"], r["country"], r["category"]) for m in r[schema.MERGED]}
        members |= {(m[schema.MERGED_WITH], r["country"], r["category"]) for m in r[schema.MERGED]}
        got.append(sorted(members))
    assert sorted(got) == reference_clusters(ITEMS, threshold)
    reasons = sorted(m["reason"] for m in report.extra["merged"])
    if threshold == 0.75:  # Kimonos joins by its 3-grams (cosine 0.77), Wafuku by the native name
        assert reasons == ["embedding", "same_name", "same_native_name"]
    else:
        assert reasons == ["same_name", "same_native_name"]
    card = dedup.card_section(tmp_path)
    assert card["data"]["concepts"] == len(recs) and len(card["data"]["merges"]) == len(reasons)
    assert "Pho" in card["markdown"]


def test_merged_concept_keeps_most_features_and_union(tmp_path):
    seed_concepts(tmp_path, ITEMS[:2])
    dedup.run({"embedding": NGRAM, "threshold": 0.9}, Context(out_dir=tmp_path))
    (r,) = dedup.load_deduped(tmp_path)
    assert r["concept"] == "Phở" and r["features"] == ["rice noodles", "broth", "beef slices"]


def test_search_groups_is_exact_within_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = [i % 3 for i in range(40)]
    import torch
    got = emb.search_groups(torch.from_numpy(x), groups, k=4)
    for i in range(40):
        others = [j for j in range(40) if groups[j] == groups[i] and j != i]
        ref = sorted(others, key=lambda j: -float(x[i] @ x[j]))[:4]
        assert [j for j, _ in got[i]] == ref
        np.testing.assert_allclose([s for _, s in got[i]], [x[i] @ x[j] for j in ref], atol=1e-5)


def test_embedding_config_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        emb.embed(["a"], {"backend": "word2vec"})
    with pytest.raises(ValueError, match="needs embedding.model"):
        emb.embed(["a"], {"backend": "openai"})
    with pytest.raises(ValueError, match="no letters or digits"):
        emb.embed(["..."], NGRAM)


def test_open_clip_backend_matches_embed_texts(tmp_path, tiny_model):
    """The open_clip backend is the model's own text tower: same features as embed_texts."""
    from cultureclip.eval.embed import embed_texts
    tiny_model.save_pretrained(tmp_path / "m")
    texts = ["Kimono", "Hanbok", "Phở"]
    got = emb.embed(texts, {"backend": "open_clip", "model": str(tmp_path / "m"), "device": "cpu"})
    ref = embed_texts(tiny_model, texts)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


class _EmbeddingHandler:
    """A local OpenAI-compatible /v1/embeddings endpoint: 3x the ngram vector of each input (not unit norm),
    listed in reverse order (the client must sort by index), float lists or base64 as asked."""

    @staticmethod
    def make():
        import base64
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            seen: list = []

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                Handler.seen.append(body)
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                vecs = (emb.embed(texts, NGRAM).numpy() * 3).astype("float32")
                data = []
                for i, v in enumerate(vecs):
                    value = (base64.b64encode(v.tobytes()).decode() if body.get("encoding_format") == "base64"
                             else v.tolist())
                    data.append({"object": "embedding", "index": i, "embedding": value})
                out = json.dumps({"object": "list", "data": data[::-1], "model": body["model"],
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        return Handler


def test_openai_backend_against_a_local_server():
    import threading
    from http.server import ThreadingHTTPServer
    handler = _EmbeddingHandler.make()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        texts = ["Kimono", "Hanbok", "Phở", "Sari", "Qipao"]
        cfg = {"backend": "openai", "model": "emb-test", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
               "batch_size": 2, "timeout_s": 10, "max_attempts": 1}
        got = emb.embed(texts, cfg)
    finally:
        server.shutdown()
        server.server_close()
    np.testing.assert_allclose(got.numpy(), emb.embed(texts, NGRAM).numpy(), atol=1e-6)
    assert [len(b["input"]) for b in handler.seen] == [2, 2, 1] and handler.seen[0]["model"] == "emb-test"
