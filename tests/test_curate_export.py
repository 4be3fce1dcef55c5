"""Stage export (cultureclip.curate.stages.export): pairs from judged renders, split, shards, card, atomicity.

Render and judge records are written here by hand through the record store (the shapes of the design),
so these tests check export alone; the app tests run the real stages end to end.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cultureclip import schema
from cultureclip.curate.stages import export as E
from cultureclip.curate.stages.importer import import_pairs, load_pairs, pairs_store
from cultureclip.curate.registry import Context
from cultureclip.curate.runner import Job, Outcome, Store, digest, in_val, run_stage, write_atomic

TWINS = [("Cuisine", "Bibimbap", "South Korea", "Nasi campur", "Indonesia"),
         ("Clothing", "Hanbok", "South Korea", "Kimono", "Japan"),
         ("Architecture", "Pagoda", "China", "Stupa", "Nepal"),
         ("Festival", "Songkran", "Thailand", "Holi", "India")]
# scores (authenticity, consistency, fidelity, picks_own) per (twin index, side, caption index)
FAILS = {(0, "neg", 1): (1, 5, 5, True),  # a score of 1
         (1, "pos", 0): (3, 3, 3, True),  # mean 3.0: not above 3
         (1, "neg", 0): (5, 5, 5, False),  # twin check failed
         (2, "pos", 0): (2, 2, 2, False), (2, "pos", 1): (4, 2, 3, True)}  # pagoda: no pos image passes


def caption_rows():
    rows = []
    for cat, pc, pco, nc, nco in TWINS:
        rows.append({schema.CATEGORY: cat, schema.POS_CONCEPT: pc, schema.POS_COUNTRY: pco, schema.NEG_CONCEPT: nc,
                     schema.NEG_COUNTRY: nco, schema.POS_CONTEXT: f"{pc} context", schema.NEG_CONTEXT: None,
                     schema.POS_FEATURES: [f"{pc} feature"], schema.NEG_FEATURES: [],
                     schema.POS_CAPTIONS: [f"{pc} caption {i}" for i in range(2)],
                     schema.NEG_CAPTIONS: [f"{nc} caption {i}" for i in range(2)]})
    return rows


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def reference_rows():
    """The same twin pairs as the authors' caption file has them: no countries, features as one string,
    contexts missing or blank, the category under ``metadata`` in half of the rows."""
    rows = []
    for i, (cat, pc, _, nc, _) in enumerate(TWINS):
        row = {schema.POS_CONCEPT: pc, schema.NEG_CONCEPT: nc, schema.POS_FEATURES: f"{pc} feature, another",
               schema.NEG_CONTEXT: "", schema.POS_CAPTION: f"{pc} caption 0", schema.NEG_CAPTION: f"{nc} caption 0",
               schema.REF_POS_ALL_CAPTIONS: [f"{pc} caption {i}" for i in range(2)],
               schema.REF_NEG_ALL_CAPTIONS: [f"{nc} caption {i}" for i in range(2)]}
        rows.append({**row, schema.CATEGORY: cat} if i % 2 else {**row, schema.REF_METADATA: {schema.CATEGORY: cat}})
    return rows


def make_run(out: Path, fails=FAILS, judge: bool = True, rows=None) -> dict:
    """pairs (imported), render and (``judge``) judge stores as the stages write them, through the runner;
    returns what went in."""
    src = out.parent / "pairs_in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (rows or caption_rows())) + "\n")
    import_pairs([src], out)
    pairs = sorted(load_pairs(out), key=lambda p: [t[1] for t in TWINS].index(p[schema.POS_CONCEPT]))
    jobs, where = [], {}
    for t, pair in enumerate(pairs):
        for side in (schema.POS_PREFIX, schema.NEG_PREFIX):
            for c, caption in enumerate(pair[f"{side}_captions"]):
                inputs = {schema.CONCEPT: pair[f"{side}_concept"], schema.COUNTRY: pair.get(f"{side}_country"),
                          schema.CATEGORY: pair[schema.CATEGORY], schema.CAPTION: caption}
                jobs.append(Job(inputs=inputs, model="hand-made", extra={"n": len(jobs)}))
                where[caption] = (t, side, c, pair)

    def render(todo):
        for j in todo:
            key, data = j[schema.REC_KEY], png_bytes(j["n"])
            rel = f"images/{key[:2]}/{key}.png"
            write_atomic(out / "render" / rel, data)
            yield Outcome(key, record={**{f: j[f] for f in (schema.CONCEPT, schema.COUNTRY, schema.CATEGORY,
                                                            schema.CAPTION)},
                                       schema.IMAGE_FILE: rel, schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest(),
                                       schema.MODEL_ID: "hand-made", schema.WIDTH: 32, schema.HEIGHT: 32})

    render_store = Store(out / "render", "render")
    run_stage(render_store, jobs, render, upstream=(pairs_store(out),))
    renders = {r[schema.REC_KEY]: r for r in render_store.records()}
    judge_jobs = []
    for rkey, r in renders.items():
        t, side, c, pair = where[r[schema.CAPTION]]
        other = schema.NEG_PREFIX if side == schema.POS_PREFIX else schema.POS_PREFIX
        a, b, f, own = fails.get((t, side, c), (4, 4, 5, True))
        judge_jobs.append(Job(inputs={
            schema.RENDER_KEY: rkey, schema.TWIN_ID: pair[schema.TWIN_ID], schema.SIDE: side,
            schema.CATEGORY: pair[schema.CATEGORY], schema.IMAGE_SHA256: r[schema.IMAGE_SHA256],
            schema.CONCEPT: pair[f"{side}_concept"], schema.TWIN_CONCEPT: pair[f"{other}_concept"],
            schema.SCORE_AUTHENTICITY: a, schema.SCORE_CONSISTENCY: b, schema.SCORE_FIDELITY: f,
            schema.TWIN_CHOICE: pair[f"{side if own else other}_concept"], schema.PICKS_OWN: own,
            schema.REASON: f"reason {c}"}))
    judged = {}
    if judge:
        judge_store = Store(out / "judge", "judge")

        def answer(todo):
            for j in todo:
                judged[j[schema.REC_KEY]] = {k: v for k, v in j.items() if k != schema.REC_KEY}
                yield Outcome(j[schema.REC_KEY], record=judged[j[schema.REC_KEY]])
        run_stage(judge_store, judge_jobs, answer, upstream=(render_store, pairs_store(out)))
    return {"pairs": pairs, "renders": renders, "judged": judged, "judge_jobs": judge_jobs}


def read_shards(folder: Path) -> dict:
    samples = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples


def expected_pairs(made: dict) -> dict:
    """The pairs the design asks for, computed by brute force from the inputs: pair_id -> (twin, pos, neg)."""
    out = {}
    for pair in made["pairs"]:
        ok = {side: sorted(j[schema.RENDER_KEY] for j in made["judged"].values()
                           if j[schema.TWIN_ID] == pair[schema.TWIN_ID] and j[schema.SIDE] == side
                           and min(j[s] for s in schema.SCORES) > 1 and sum(j[s] for s in schema.SCORES) > 9
                           and j[schema.PICKS_OWN]) for side in (schema.POS_PREFIX, schema.NEG_PREFIX)}
        for p, n in itertools.product(ok[schema.POS_PREFIX], ok[schema.NEG_PREFIX]):
            out[digest({"pair": {schema.TWIN_ID: pair[schema.TWIN_ID], "pos": p, "neg": n}})] = (pair, p, n)
    return out


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    return out, make_run(out)


def test_export_all_pairs_split_shards_and_meta(run_dir):
    out, made = run_dir
    report = E.run({"pairs_per_twin": None, "val_fraction": 0.3, "split_seed": 5, "maxcount": 3, "plots": False},
                   Context(out_dir=out))
    want = expected_pairs(made)
    assert len(want) == 2 + 1 + 0 + 4  # bibimbap 2x1, hanbok 1x1, pagoda none, songkran 2x2 (see FAILS)
    train, val = read_shards(out / "export" / "train"), read_shards(out / "export" / "val")
    assert sorted(train) + sorted(val) != [] and set(train) | set(val) == set(want) and not set(train) & set(val)
    twin_of = {k: want[k][0][schema.TWIN_ID] for k in want}
    assert not {twin_of[k] for k in train} & {twin_of[k] for k in val}  # whole twin pairs per split
    exported = {twin_of[k] for k in want}
    assert {twin_of[k] for k in val} == {t for t in exported if in_val(t, 5, 0.3)}  # the rule, recomputed
    for key, sample in {**train, **val}.items():
        pair, pos, neg = want[key]
        meta = json.loads(sample[schema.META])
        assert sample["pos.png"] == (out / "render" / made["renders"][pos][schema.IMAGE_FILE]).read_bytes()
        assert sample["neg.png"] == (out / "render" / made["renders"][neg][schema.IMAGE_FILE]).read_bytes()
        assert meta == {schema.POS_CAPTION: made["renders"][pos][schema.CAPTION],
                        schema.NEG_CAPTION: made["renders"][neg][schema.CAPTION],
                        schema.POS_CONCEPT: pair[schema.POS_CONCEPT], schema.NEG_CONCEPT: pair[schema.NEG_CONCEPT],
                        schema.POS_COUNTRY: pair[schema.POS_COUNTRY], schema.NEG_COUNTRY: pair[schema.NEG_COUNTRY],
                        schema.CATEGORY: pair[schema.CATEGORY], schema.PAIR_ID: key,
                        schema.POS_CONTEXT: pair[schema.POS_CONTEXT], schema.POS_FEATURES: pair[schema.POS_FEATURES]}
    sizes = json.loads((out / "export" / "train" / schema.SIZES_FILE).read_text())
    assert sum(sizes.values()) == len(train) and max(sizes.values()) <= 3
    keys_in_order = [m.name.split(".")[0] for s in sorted((out / "export" / "train").glob("*.tar"))
                     for m in tarfile.open(s).getmembers()]
    assert keys_in_order == sorted(keys_in_order)  # sorted by pair_id
    assert report.extra["train_pairs"] == len(train) and report.extra["val_pairs"] == len(val) and report.ok == 3


def test_sampling_is_deterministic_and_a_subset(run_dir, tmp_path):
    out, made = run_dir
    E.run({"pairs_per_twin": 1, "val_fraction": 0.0, "plots": False}, Context(out_dir=out, seed=0))
    first = read_shards(out / "export" / "train")
    assert read_shards(out / "export" / "val") == {}
    E.run({"pairs_per_twin": 1, "val_fraction": 0.0, "plots": False}, Context(out_dir=out, seed=0))
    assert read_shards(out / "export" / "train") == first  # byte-identical rerun
    want = expected_pairs(made)
    twins = Counter(want[k][0][schema.TWIN_ID] for k in first)
    assert set(first) <= set(want) and len(twins) == 3 and set(twins.values()) == {1}
    picks = set()
    for seed in range(1, 5):  # the seed changes the sample (songkran has 4 combinations)
        E.run({"pairs_per_twin": 1, "val_fraction": 0.0, "plots": False}, Context(out_dir=out, seed=seed))
        picks |= set(read_shards(out / "export" / "train"))
    assert len(picks) > 3
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_card_counts_histograms_gallery(run_dir):
    out, made = run_dir
    E.run({"pairs_per_twin": None, "gallery_size": 3}, Context(out_dir=out))
    card = json.loads((out / "export" / "card.json").read_text())
    judged = list(made["judged"].values())
    assert card["stages"]["render"]["done"] == len(made["renders"]) == 16
    assert card["stages"]["judge"] == {"jobs": 16, "done": 16, "rejected": 0, "rejected_by_reason": {}, "errors": 0,
                                       "errors_by_reason": {}, "missing": 0}
    assert card["stages"]["pairs"]["done"] == 4 and "in val iff" in card["export"]["split_rule"]
    assert card["judge"]["images_passed"] == 16 - len(FAILS) and card["judge"]["pass_rate"] == round(11 / 16, 4)
    for s in schema.SCORES:
        assert card["judge"]["histograms"][s] == {str(v): sum(j[s] == v for j in judged) for v in range(1, 6)}
    cuisine = card["groups"]["category"]["Cuisine"]
    assert cuisine == {"twin_pairs": 1, "images_rendered": 4, "images_judged": 4, "images_passed": 3,
                       "pairs_exported": 2, "pass_rate": 0.75}
    assert card["groups"]["country"]["South Korea"]["twin_pairs"] == 2
    assert card["groups"]["country"]["Nepal"]["pairs_exported"] == 0
    gallery = card["gallery"]
    # lowest score sum first: (2,2,2) = 6, then the two of 9, in key order
    assert gallery[0][schema.SCORE_AUTHENTICITY] == 2 and {g[schema.SCORE_AUTHENTICITY] for g in gallery[1:]} == {3, 4}
    assert gallery[0]["failures"] == ["mean 2.00 not above 3.0", "twin check picked 'Stupa'"]
    assert gallery[0][schema.CONCEPT] == "Pagoda" and gallery[0][schema.TWIN_CONCEPT] == "Stupa"
    assert [g["failures"] for g in gallery[1:]] == [["mean 3.00 not above 3.0"]] * 2
    md = (out / "export" / "card.md").read_text()
    for g in gallery:
        assert (out / "export" / g["thumbnail"]).is_file() and f"![]({g['thumbnail']})" in md
        with Image.open(out / "export" / g["thumbnail"]) as im:
            assert max(im.size) <= 128
    assert (out / "export" / card["histogram_png"]).is_file() and "| Cuisine | 1 | 4 | 4 | 3 | 2 | 0.75 |" in md
    for title in ("Imported caption pairs", "Render", "Judge"):  # the stage modules' card sections
        assert f"## {title}" in md


def test_refuses_unfinished_judge_and_missing_stages(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"import them \(input=...\) or run stage=captions"):
        E.run({}, Context(out_dir=out))
    made = make_run(out, judge=False)
    with pytest.raises(FileNotFoundError, match=r"judge not found: run stage=judge before stage=export"):
        E.run({}, Context(out_dir=out))

    def stop_after_two(jobs):
        for j in itertools.islice(jobs, 2):
            yield Outcome(j[schema.REC_KEY], error="http_503", message="down")
        raise KeyboardInterrupt  # the process is stopped with the rest left

    with pytest.raises(KeyboardInterrupt):
        run_stage(Store(out / "judge", "judge"), made["judge_jobs"], stop_after_two,
                  upstream=(Store(out / "render", "render"), pairs_store(out)))
    with pytest.raises(ValueError, match=r"16 of 16 current judge jobs are neither done nor rejected \(2 failed "
                                         r"\{'http_503': 2\}, 14 not run yet"):
        E.run({}, Context(out_dir=out))
    with pytest.raises(ValueError, match="num_shards=1"):
        E.run({}, Context(out_dir=out, num_shards=2, shard_index=1))
    with pytest.raises(ValueError, match=r"unknown export settings \['pairs_per_twn'\]"):
        E.run({"pairs_per_twn": 3}, Context(out_dir=out))


def test_a_failed_export_leaves_the_previous_one(run_dir):
    out, made = run_dir
    E.run({"plots": False}, Context(out_dir=out))
    before = {p.relative_to(out): p.read_bytes() for p in (out / "export").rglob("*") if p.is_file()}
    victim = out / "render" / next(iter(made["renders"].values()))[schema.IMAGE_FILE]
    victim.write_bytes(png_bytes(999))  # changed after rendering: its sha256 no longer matches
    with pytest.raises(ValueError, match=r"does not match the sha256 of render record"):
        E.run({"maxcount": 1}, Context(out_dir=out))
    after = {p.relative_to(out): p.read_bytes() for p in (out / "export").rglob("*") if p.is_file()}
    assert after == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_exported_shards_read_by_the_pipeline(run_dir):
    out, made = run_dir
    E.run({"pairs_per_twin": None, "val_fraction": 0.0, "plots": False}, Context(out_dir=out))
    import torch
    from cultureclip.data.pipeline import build_twin_pipeline

    def tokenizer(texts, context_length=8):  # token ids are not under test here: lengths only
        return torch.tensor([[len(t)] * context_length for t in texts])

    def preprocess(im):
        return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32))
    batches = list(build_twin_pipeline(str(out / "export" / "train" / "shard-000000.tar"), preprocess, tokenizer,
                                       batch_size=4, train=False))
    want = expected_pairs(made)
    keys = [k for b in batches for k in b[schema.KEY]]
    assert sorted(keys) == sorted(want) and sum(b[schema.POS_IMAGE].shape[0] for b in batches) == 7
    for b in batches:
        for r, key in enumerate(b[schema.KEY]):
            pair = want[key][0]
            assert b[schema.CATEGORY][r] == pair[schema.CATEGORY]
            assert b[schema.POS_COUNTRY][r] == pair[schema.POS_COUNTRY]
            assert b[schema.POS_FEATURES][r] == pair[schema.POS_FEATURES] and b[schema.NEG_CONTEXT][r] is None


def test_export_of_the_authors_caption_file_without_countries(tmp_path):
    """The reference caption rows have no countries: export writes the shards, and the card counts every
    pair, image and exported pair under "(none)" (it used to die with KeyError: 'pos_country')."""
    out = tmp_path / "run"
    made = make_run(out, rows=reference_rows())
    assert all(p.get(schema.POS_COUNTRY) is None and p.get(schema.NEG_COUNTRY) is None for p in made["pairs"])
    report = E.run({"pairs_per_twin": None, "val_fraction": 0.0, "plots": False}, Context(out_dir=out, seed=0))
    expected = expected_pairs(made)
    assert report.extra["train_pairs"] == len(expected) == len(read_shards(out / "export" / "train"))
    card = json.loads((out / "export" / "card.json").read_text())
    assert list(card["groups"][schema.COUNTRY]) == ["(none)"]
    row = card["groups"][schema.COUNTRY]["(none)"]
    assert row["twin_pairs"] == len(TWINS) and row["images_rendered"] == len(made["renders"])
    assert row["images_judged"] == len(made["judged"]) and row["pairs_exported"] == len(expected)
    assert sorted(card["groups"][schema.CATEGORY]) == sorted(t[0] for t in TWINS)
    assert "| (none) | 4 |" in (out / "export" / "card.md").read_text()


def test_the_judge_section_states_the_rule_export_applied(run_dir):
    # a stricter rule than the default: the card's Judge section must count and state export's rule, not
    # the default one (the top of the card and the section once disagreed)
    out, made = run_dir
    rule = {"min_score": 4, "min_mean": 3.0, "require_twin_check": True}
    E.run({"pairs_per_twin": None, "plots": False, "rule": rule}, Context(out_dir=out))
    card = json.loads((out / "export" / "card.json").read_text())
    [section] = [s for s in card["sections"] if s["stage"] == "judge"]
    judged = list(made["judged"].values())
    recount = sum(min(j[s] for s in schema.SCORES) >= 4 and sum(j[s] for s in schema.SCORES) / 3 > 3.0
                  and j[schema.PICKS_OWN] for j in judged)
    assert section["data"]["rule"] == rule and section["data"]["passed"] == recount == card["judge"]["images_passed"]
    assert "every score >= 4" in (out / "export" / "card.md").read_text()
