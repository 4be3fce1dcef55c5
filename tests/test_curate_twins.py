"""Stage twins on the stand-in server: FAISS mining vs brute force, rules and verifier rejections
counted with reasons, failed verifier calls as errors, per-item prompts."""
import numpy as np
import pytest
import torch

pytest.importorskip("pydantic")
pytest.importorskip("openai")

from cultureclip import schema  # noqa: E402
from cultureclip.curate.stages import concepts, dedup, twins  # noqa: E402
from cultureclip.curate.stages import upstream as up  # noqa: E402
from cultureclip.curate.backends.standin import request_text, schema_name  # noqa: E402
from test_curate_concepts import ctx_for, standin, top_down_cfg  # noqa: E402

NGRAM = {"backend": "ngram"}
COUNTRIES = ["China", "India", "Japan", "South Korea", "Vietnam"]


def brute_force_twins(pool, x, k):
    out = {}
    for i, c in enumerate(pool):
        others = [j for j, d in enumerate(pool) if d["category"] == c["category"] and d["country"] != c["country"]]
        out[i] = sorted(others, key=lambda j: -float(x[i] @ x[j]))[:k]
    return out


@pytest.mark.parametrize("k", [1, 3, 50])
def test_mining_is_nearest_other_country_same_category(k):
    rng = np.random.default_rng(k)
    n = 120
    pool = [{"category": ["Cuisine", "Art", "Festival"][i % 3], "country": f"C{rng.integers(0, 6)}"}
            for i in range(n)]
    x = rng.normal(size=(n, 24)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = twins.mine(pool, torch.from_numpy(x), k)
    ref = brute_force_twins(pool, x, k)
    for i in range(n):
        assert [j for j, _ in got[i]] == ref[i], i
        np.testing.assert_allclose([s for _, s in got[i]], [x[i] @ x[j] for j in ref[i]], atol=1e-5)
        assert all(pool[j]["country"] != pool[i]["country"] and pool[j]["category"] == pool[i]["category"]
                   for j, _ in got[i])


def run_upstream(tmp_path, srv, twins_cfg=None, countries=COUNTRIES):
    ctx = ctx_for(tmp_path, srv)
    concepts.run(top_down_cfg(countries, ["Cuisine", "Clothing"], 3), ctx)
    dedup.run({"embedding": NGRAM, "threshold": 0.75}, ctx)
    cfg = {"embedding": NGRAM, "llm_candidates": 3, "mined_candidates": 2, "keep": 2, **(twins_cfg or {})}
    return twins.run(cfg, ctx)


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory):
    """concepts -> dedup -> twins on the stand-in server, once for this module: (out, report, bodies)."""
    out = tmp_path_factory.mktemp("twins")
    with standin(concepts, twins) as srv:
        report = run_upstream(out, srv)
        bodies = list(srv.bodies)
    return out, report, bodies


def test_twins_verified_and_rejections_counted(upstream_run):
    tmp_path, report, bodies = upstream_run
    verdicts = [b for b in bodies if schema_name(b) == "TwinVerdict"]
    answers = [twins.standin_responders()["TwinVerdict"](b) for b in verdicts]
    assert report.errors == 0
    recs = twins.load_twins(tmp_path)
    pool = {c["concept_id"]: c for c in dedup.load_deduped(tmp_path)}
    assert {r["concept_id"] for r in recs} == set(pool)
    kept = [(r, t) for r in recs for t in r["twins"]]
    assert kept
    for r, t in kept:
        assert t["country"] != r["country"] and t["category"] == r["category"]
        assert t["features"] and r["features"] and t["country"] and t["context"]  # both sides keep them
        assert t[schema.VERIFIER_SIMILARITY] >= 3
    for r in recs:
        sims = [t[schema.VERIFIER_SIMILARITY] for t in r["twins"]]
        assert sims == sorted(sims, reverse=True) and len(sims) <= 2
    rejected = [x for r in recs for x in r["rejected"]]
    reasons = {x["reason"] for x in rejected}
    assert {"same_country", "not_exists"} <= reasons  # Ramen -> Tsukemen (Japan); the invented fusion items
    assert ("Tsukemen", "same_country") in {(x["concept"], x["reason"]) for x in rejected}
    # every verifier question that said no is counted under its reason, nothing else
    no = sum(1 for a in answers if not (a["exists"] and a["culturally_distinct"] and a["visually_similar"]))
    low = sum(1 for a in answers if a["exists"] and a["culturally_distinct"] and a["visually_similar"]
              and a["similarity"] < 3)
    counted = sum(1 for x in rejected if x["reason"].startswith("not_") and x["reason"] != "not_in_best_m")
    assert counted == no and sum(1 for x in rejected if x["reason"] == "low_similarity") == low
    card = twins.card_section(tmp_path)
    assert card["data"]["verified"] == len(verdicts) - no - low
    assert card["data"]["kept"] == len(kept)
    assert sum(card["data"]["by_country_pair"].values()) == len(kept)
    assert sum(card["data"]["by_category"].values()) == len(kept)


def test_twin_prompts_carry_only_their_own_items(upstream_run):
    tmp_path, _, bodies = upstream_run
    pool = dedup.load_deduped(tmp_path)
    names = {c["concept"] for c in pool}
    asked = [up.read_block(request_text(b)) for b in bodies if schema_name(b) == "TwinCandidates"]
    assert sorted(f["Concept"] for f in asked) == sorted(names)  # one request per concept, each its own
    for f in asked:
        c = next(c for c in pool if c["concept"] == f["Concept"])
        assert (f["Country"], f["Category"], f["Features"]) == (c["country"], c["category"], "; ".join(c["features"]))
    by_pos = {}
    for b in bodies:
        if schema_name(b) == "TwinVerdict":
            f = up.read_block(request_text(b))
            by_pos.setdefault(f["Concept A"], []).append(f["Concept B"])
    recs = {r["concept"]: r for r in twins.load_twins(tmp_path)}
    for name, cands in by_pos.items():  # the verifier saw exactly this concept's candidates
        r = recs[name]
        judged = {t["concept"] for t in r["twins"]} | {x["concept"] for x in r["rejected"]
                                                      if x["reason"] not in ("same_country", "same_concept",
                                                                             "incomplete_candidate", "no_features")}
        assert set(cands) == judged


def test_failed_verifier_is_an_error_then_retried(tmp_path):
    def faults(index, body):  # every verifier request about Ramen fails (schema-violating answers)
        if schema_name(body) == "TwinVerdict" and "Concept A: Ramen\n" in request_text(body):
            return "schema"
        return None
    with standin(concepts, twins, faults=faults) as srv:
        report = run_upstream(tmp_path, srv)
    assert report.errors == 1 and all(k.startswith("verifier_") for k in report.errors_by_reason)
    with pytest.raises(ValueError, match=r"1 of \d+ current twins jobs are neither done nor rejected"):
        twins.load_twins(tmp_path)  # the next stage refuses a view with a failed job
    card = twins.card_section(tmp_path)
    assert card["data"]["concepts_failed"] == 1
    with standin(concepts, twins) as srv:  # the server is healthy again: only Ramen is redone
        again = run_upstream(tmp_path, srv)
        assert sum(1 for b in srv.bodies if schema_name(b) == "TwinCandidates") == 1
    assert again.ok == 1 and again.errors == 0
    assert "Ramen" in {r["concept"] for r in twins.load_twins(tmp_path)}


def test_rules_without_a_call():
    pos = {"concept": "Ramen", "country": "Japan"}
    assert twins.rule_reason(pos, {"concept": "Tsukemen", "country": "japan", "features": ["x"]}) == "same_country"
    assert twins.rule_reason(pos, {"concept": "RAMEN", "country": "China", "features": ["x"]}) == "same_concept"
    assert twins.rule_reason(pos, {"concept": "", "country": "China", "features": ["x"]}) == "incomplete_candidate"
    assert twins.rule_reason(pos, {"concept": "Pho", "country": "Vietnam", "features": [" "]}) == "no_features"
    assert twins.rule_reason(pos, {"concept": "Pho", "country": "Vietnam", "features": ["broth"]}) is None
