"""Tests for the multiple-choice engine and the cultural benchmarks (GlobalRG, CROPE, CultureVerse).

Fixtures write tiny rows in each benchmark's real schema to ``tmp_path``; accuracy is checked against a
brute-force loop over ``model.encode_image``/``encode_text``, the reference protocol against a
re-implementation of the authors' draw loop, determinism in subprocesses with other PYTHONHASHSEEDs.
"""
import io
import json
import os
import random
import statistics
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from cultureclip.images import ImageDecodeError, decode_image

from conftest import TINY_VIT
from cultureclip import CultureCLIP
from cultureclip.eval import multiple_choice as mc
from cultureclip.eval.cultural import (EVALUATORS, RowError, get_evaluator, read_rows, select_fields)
from cultureclip.eval.cultural import crope, cultureverse, globalrg
from cultureclip.eval.results import write_result

RETRIEVAL = [("drinks", r) for r in ("kenya", "japan", "peru", "china", "japan", "india", "mexico")] + \
            [("houses", r) for r in ("japan", "china", "peru")] + \
            [("clothing", r) for r in ("nigeria", "japan", "india", "france")]
GROUNDING = [("japan", c) for c in ("kimono", "sushi", "torii", "geta", "bento", "sushi")] + \
            [("korea", c) for c in ("hanbok", "kimchi", "gat")] + \
            [("india", c) for c in ("sari", "dosa", "diya", "rangoli")] + [("india", "tabla")] + \
            [("peru", c) for c in ("poncho", "ceviche", "quipu")] + [("peru", "chullo")]
GROUNDING_BROKEN = {"tabla", "chullo"}  # their images are corrupt: verified pools must not contain them


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CultureCLIP.from_config(TINY_VIT, name="tiny-vit").eval()


def save_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def retrieval_dir(tmp_path):
    rows = []
    for i, (universal, region) in enumerate(RETRIEVAL):
        save_png(tmp_path / "images" / f"{i}.png", i)
        rows.append({"image": f"images/{i}.png", "region": region, "universal": universal})
    write_jsonl(tmp_path / "test.jsonl", rows)
    return tmp_path


@pytest.fixture
def grounding_file(tmp_path):
    rows = []
    for i, (region, concept) in enumerate(GROUNDING):
        path = tmp_path / "img" / f"{i}.png"
        save_png(path, 100 + i)
        if concept in GROUNDING_BROKEN:
            path.write_bytes(b"not an image at all")
        rows.append({"image": f"img/{i}.png", "region": region, "concept": concept})
    return write_jsonl(tmp_path / "grounding.jsonl", rows)


@pytest.fixture
def crope_file(tmp_path):
    spec = [("no", "kimono", "hanbok", 2), ("yes", "sari", "lehenga", 1), ("no", "erhu", "guzheng", 1),
            ("no", "pagoda", "stepped pyramid", 0)]
    rows, k = [], 0
    for i, (answer, concept, definition, n_def) in enumerate(spec):
        names = []
        for _ in range(1 + n_def):
            save_png(tmp_path / "crope" / f"{k}.png", 200 + k)
            names.append(f"crope/{k}.png")
            k += 1
        rows.append({"image": names[0], "definition_images": names[1:], "answer": answer,
                     "metadata": {"image_en_concept": concept, "definition_concept": definition}})
    return write_jsonl(tmp_path / "crope.jsonl", rows)


def rows_of(path, fields):
    return select_fields(read_rows(path, "test"), fields)[0]


@torch.no_grad()
def brute_force(model, items):
    """Per item: encode the one image and its option texts, argmax of the cosine; None when undecodable."""
    preds = []
    for it in items:
        try:
            image = decode_image(it.image)
        except ImageDecodeError:
            preds.append(None)
            continue
        img = model.encode_image(model.preprocess_val(image).unsqueeze(0))  # [1, D]
        preds.append(int((img @ model.encode_text(list(it.options)).T).argmax()))  # over [1, K]
    return preds


def brute_force_acc(model, items):
    preds = [(p, it.answer) for p, it in zip(brute_force(model, items), items) if p is not None]
    return sum(p == a for p, a in preds) / len(preds)


def authors_loop(rows, group, member, template):
    """The reference scripts' loop: random.seed(42); per item sample 3 distractors, then shuffle."""
    rng = random.Random(42)
    members = defaultdict(set)
    for r in rows:
        members[r[group]].add(r[member])
    out = []
    for r in rows:
        pool = sorted(members[r[group]])
        if len(pool) < 4:
            continue
        options = [r[member]] + rng.sample([m for m in pool if m != r[member]], 3)
        rng.shuffle(options)
        out.append(([template.format(**{group: r[group], member: o}) for o in options], options.index(r[member])))
    return out


# ---------------------------------------------------------------------------- GlobalRG

def test_retrieval_filter_templates_and_answers(retrieval_dir):
    rows = rows_of(retrieval_dir, ("image", "region", "universal"))
    items = globalrg.build_retrieval_items(rows, random.Random(0))
    assert len(items) == 11 and {it.meta["universal"] for it in items} == {"drinks", "clothing"}  # houses: 3 regions
    pools = {"drinks": {"kenya", "japan", "peru", "china", "india", "mexico"},
             "clothing": {"nigeria", "japan", "india", "france"}}
    kept = [r for r in rows if r["universal"] != "houses"]
    for it, r in zip(items, kept):
        assert it.options[it.answer] == f"The picture depicts a kind of {r['universal']} in {r['region']}"
        regions = [o.split(" in ")[-1] for o in it.options]
        assert len(it.options) == 4 and len(set(regions)) == 4 and set(regions) <= pools[r["universal"]]
        assert all(o == f"The picture depicts a kind of {r['universal']} in {x}" for o, x in zip(it.options, regions))
        assert it.image == r["image"] and os.path.isabs(it.image)  # resolved against the file's folder


def test_retrieval_reference_equals_authors_loop_and_brute_force(model, retrieval_dir):
    rows = rows_of(retrieval_dir, ("image", "region", "universal"))
    seed = mc.resolve_seeds("reference", None)[0]
    items = globalrg.build_retrieval_items(rows, random.Random(seed))
    expected = authors_loop(rows, "universal", "region", globalrg.RETRIEVAL_TEMPLATE)
    assert [(list(it.options), it.answer) for it in items] == expected
    metrics, header = globalrg.evaluate_retrieval(model, retrieval_dir, protocol="reference")
    assert metrics["acc"] == pytest.approx(brute_force_acc(model, items))
    assert metrics["n"] == 11 and metrics["n_skipped"] == 0 and metrics["chance"] == pytest.approx(0.25)
    assert metrics["n/universal=clothing"] == 4 and "acc/region=japan" in metrics
    assert header["extra"]["seeds"] == [42] and "PYTHONHASHSEED" in header["extra"]["protocol_note"]
    with pytest.raises(ValueError, match="seed 42"):
        globalrg.evaluate_retrieval(model, retrieval_dir, protocol="reference", seeds=(0,))


def test_fixed_protocol_seeds_mean_std_and_repeatability(model, retrieval_dir):
    metrics, header = globalrg.evaluate_retrieval(model, retrieval_dir, seeds=(0, 1, 2))
    per_seed = [metrics[f"acc/seed={s}"] for s in (0, 1, 2)]
    assert metrics["acc_mean"] == pytest.approx(statistics.fmean(per_seed)) == pytest.approx(metrics["acc"])
    assert metrics["acc_std"] == pytest.approx(statistics.stdev(per_seed))
    assert per_seed[1] == globalrg.evaluate_retrieval(model, retrieval_dir, seeds=(1,))[0]["acc"]
    assert globalrg.evaluate_retrieval(model, retrieval_dir, seeds=(0, 1, 2))[0] == metrics
    assert header["extra"]["seeds"] == [0, 1, 2] and header["seed"] is None


def test_grounding_verifies_before_pools(model, grounding_file):
    rows = rows_of(grounding_file, ("image", "region", "concept"))
    verified = [r for r in rows if r["concept"] not in GROUNDING_BROKEN]
    items = globalrg.build_grounding_items(verified, random.Random(0))
    # korea has 3 concepts; peru has 4 only with its broken image, so both are dropped
    assert {it.meta["region"] for it in items} == {"japan", "india"} and len(items) == 10
    for it in items:
        assert it.options[it.answer] == f"The item in the picture is {it.meta['concept']} in {it.meta['region']}"
        assert not any(b in o for o in it.options for b in GROUNDING_BROKEN)
    assert [(list(it.options), it.answer) for it in globalrg.build_grounding_items(verified, random.Random(42))] \
        == authors_loop(verified, "region", "concept", globalrg.GROUNDING_TEMPLATE)
    metrics, header = globalrg.evaluate_grounding(model, grounding_file, split=None)
    assert metrics["n"] == 10 and metrics["n_skipped"] == 2 and header["extra"]["n_unverified"] == 2
    assert metrics["acc"] == pytest.approx(brute_force_acc(model, items))
    with pytest.raises(mc.ImageDecodeError, match="row 13"):
        globalrg.evaluate_grounding(model, grounding_file, on_error="raise")


def test_undecodable_image_is_counted_or_raises(model, retrieval_dir):
    (retrieval_dir / "images" / "3.png").write_bytes(b"\x89PNG truncated")
    metrics, header = globalrg.evaluate_retrieval(model, retrieval_dir)
    assert metrics["n"] == 10 and metrics["n_skipped"] == 1
    assert header["extra"]["skipped"]["by_type"] == {"UnidentifiedImageError": 1}
    items = globalrg.build_retrieval_items(rows_of(retrieval_dir, ("image", "region", "universal")), random.Random(0))
    assert metrics["acc"] == pytest.approx(brute_force_acc(model, items))
    with pytest.raises(mc.ImageDecodeError, match=r"test.jsonl: row 3"):
        globalrg.evaluate_retrieval(model, retrieval_dir, on_error="raise")


def test_bad_rows_name_row_and_field(model, retrieval_dir):
    rows = [json.loads(x) for x in (retrieval_dir / "test.jsonl").read_text().splitlines()]
    del rows[5]["universal"]
    write_jsonl(retrieval_dir / "test.jsonl", rows)
    with pytest.raises(RowError, match=r"row 5: missing field 'universal'"):
        globalrg.evaluate_retrieval(model, retrieval_dir)
    metrics, header = globalrg.evaluate_retrieval(model, retrieval_dir, on_bad_row="skip")
    assert metrics["n_bad_rows"] == 1 and metrics["n"] == 10 and "row 5" in header["extra"]["bad_rows"][0]


# ---------------------------------------------------------------------------- determinism across hash seeds

DRAW_SCRIPT = """
import json, random, sys
from cultureclip.eval.cultural import crope, globalrg, read_rows, select_fields
dump = lambda items: [[list(i.options), i.answer] for i in items]
out = {}
for seed in (0, 42):
    rows = select_fields(read_rows(sys.argv[1], "test"), ("image", "region", "universal"))[0]
    out[f"retrieval{seed}"] = dump(globalrg.build_retrieval_items(rows, random.Random(seed)))
    rows = select_fields(read_rows(sys.argv[2], None), ("image", "region", "concept"))[0]
    out[f"grounding{seed}"] = dump(globalrg.build_grounding_items(rows, random.Random(seed)))
    rows = crope.select_rows(crope.load_rows(sys.argv[3]))[0]
    out[f"crope{seed}"] = dump(crope.build_items(rows, random.Random(seed)))
print(json.dumps(out))
"""


def test_draws_identical_across_pythonhashseed(retrieval_dir, grounding_file, crope_file):
    args = [sys.executable, "-c", DRAW_SCRIPT, str(retrieval_dir), str(grounding_file), str(crope_file)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": h, "HF_HUB_OFFLINE": "1"}) for h in ("1", "2")]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(json.loads(out))
    assert outputs[0] == outputs[1]
    rows = rows_of(retrieval_dir, ("image", "region", "universal"))
    here = [[list(i.options), i.answer] for i in globalrg.build_retrieval_items(rows, random.Random(0))]
    assert outputs[0]["retrieval0"] == here and outputs[0]["retrieval0"] != outputs[0]["retrieval42"]


# ---------------------------------------------------------------------------- CROPE

def test_crope_filter_options_and_pooling(model, crope_file):
    rows, bad, n_other = crope.select_rows(crope.load_rows(crope_file))
    assert len(rows) == 3 and n_other == 1 and not bad
    items = crope.build_items(rows, random.Random(0))
    assert len(items) == 6  # (1 + 2) + (1 + 1) + (1 + 0) images; the "yes" row is dropped
    by_row = defaultdict(list)
    for it in items:
        by_row[it.meta["where"].split(" definition")[0]].append(it)
    for r in rows:
        row_items = by_row[r["_where"]]
        c, d = r["metadata.image_en_concept"], r["metadata.definition_concept"]
        assert sorted(row_items[0].options) == sorted([f"There is {c} in the image.", f"There is {d} in the image."])
        assert all(it.options == row_items[0].options for it in row_items)  # shuffled once per row
        assert row_items[0].options[row_items[0].answer] == f"There is {c} in the image."
        assert all(it.options[it.answer] == f"There is {d} in the image." for it in row_items[1:])
    ref = crope.build_items(rows, random.Random(42))  # the authors' loop: one shuffle per kept row
    expected_rng, expected = random.Random(42), []
    for r in rows:
        opts = [f"There is {r['metadata.image_en_concept']} in the image.",
                f"There is {r['metadata.definition_concept']} in the image."]
        expected_rng.shuffle(opts)
        expected += [tuple(opts)] * (1 + len(r["definition_images"]))
    assert [it.options for it in ref] == expected
    metrics, header = crope.evaluate(model, crope_file, protocol="reference")
    assert metrics["n"] == 6 and metrics["n/role=main"] == 3 and metrics["n/role=definition"] == 3
    assert metrics["chance"] == pytest.approx(0.5)
    assert metrics["acc"] == pytest.approx(brute_force_acc(model, ref))
    assert header["extra"]["n_rows_other_answer"] == 1


def test_crope_bad_row(model, crope_file):
    rows = [json.loads(x) for x in crope_file.read_text().splitlines()]
    del rows[3]["metadata"]["definition_concept"]
    rows[1]["metadata"] = {}  # an answer == "yes" row is never validated
    write_jsonl(crope_file, rows)
    with pytest.raises(RowError, match=r"crope.jsonl: row 3: missing field 'metadata.definition_concept'"):
        crope.evaluate(model, crope_file)
    metrics, _ = crope.evaluate(model, crope_file, on_bad_row="skip")
    assert metrics["n_bad_rows"] == 1 and metrics["n"] == 5


# ---------------------------------------------------------------------------- CultureVerse

CV_ROWS = [
    ("image_recognition", ["Kimono", "Hanbok", "Qipao", "Ao dai"], "A", "Japan", "clothing", None, 0),
    ("cultural_knowledge", ["a", "b"], "A", "Japan", "clothing", None, None),
    ("Image Recognition", {"B": "Fufu", "A": "Jollof rice", "D": "Couscous", "C": "Injera"}, "(B)", "Nigeria",
     "food", None, 1),
    ("image_recognition", ["Louvre", "Prado", "Uffizi"], 2, "France", "architecture", None, 2),
    ("image-recognition", ["Poncho", "Sombrero", "Serape"], "Sombrero", "Mexico", "clothing", "North America", 1),
    ("scene_understanding", ["x", "y"], "B", "Peru", "festival", None, None),
    ("image_recognition", ["w", "x", "y", "z"], "d.", "Atlantis", "symbol", None, 3),
    ("image_recognition", ["Kente", "Adire"], "1", "Côte d'Ivoire", "clothing", None, 1),
]


@pytest.fixture
def cultureverse_file(tmp_path):
    rows = []
    for i, (qtype, options, answer, country, topic, continent, _) in enumerate(CV_ROWS):
        save_png(tmp_path / "cv_images" / f"{i}.jpg", 300 + i)
        row = {"image": f"{i}.jpg", "question_type": qtype, "question": "What is shown?", "options": options,
               "answer": answer, "country": country, "topic": topic}
        if continent:
            row["continent"] = continent
        rows.append(row)
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(rows))
    return path


def test_cultureverse_recognition_only_and_groups(model, cultureverse_file):
    images_dir = cultureverse_file.parent / "cv_images"
    raw = cultureverse.load_rows(cultureverse_file, images_dir=images_dir)
    items, bad, n_other = cultureverse.build_items(raw)
    assert n_other == 2 and not bad and len(items) == 6
    assert [it.answer for it in items] == [e[-1] for e in CV_ROWS if e[-1] is not None]
    assert items[1].options == ("Jollof rice", "Fufu", "Injera", "Couscous")  # dict options by sorted key
    assert [it.meta["continent"] for it in items] == ["Asia", "Africa", "Europe", "North America", "unknown", "Africa"]
    metrics, header = cultureverse.evaluate(model, cultureverse_file, images_dir=images_dir)
    assert metrics["n"] == 6 and metrics["n_unknown_continent"] == 1
    assert header["extra"]["unknown_countries"] == ["Atlantis"]
    assert metrics["n/continent=Africa"] == 2 and metrics["n/topic=clothing"] == 3 and "acc/country=Japan" in metrics
    assert metrics["acc"] == pytest.approx(brute_force_acc(model, items))
    assert metrics["chance"] == pytest.approx(statistics.fmean([1 / len(it.options) for it in items]))


@pytest.mark.parametrize("change, field", [({"answer": None}, "answer"), ({"answer": "Z"}, "answer"),
                                           ({"options": "Kimono"}, "options"), ({"country": None}, "country")])
def test_cultureverse_bad_rows(model, tmp_path, change, field):
    rows = [{"image": "a.png", "question_type": "image_recognition", "options": ["p", "q"], "answer": "A",
             "country": "Japan", "topic": "food"} for _ in range(3)]
    rows[1].update(change)
    rows[1] = {k: v for k, v in rows[1].items() if v is not None}
    save_png(tmp_path / "a.png", 0)
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(RowError, match=rf"q.jsonl: row 1: .*'{field}'"):
        cultureverse.evaluate(model, path)
    metrics, _ = cultureverse.evaluate(model, path, on_bad_row="skip")
    assert metrics["n_bad_rows"] == 1 and metrics["n"] == 2


# ---------------------------------------------------------------------------- engine, registry, results

def test_score_items_sources_workers_and_brute_force(model, tmp_path):
    paths = []
    for i in range(5):
        save_png(tmp_path / f"{i}.png", 400 + i)
        paths.append(tmp_path / f"{i}.png")
    png = paths[1].read_bytes()
    sources = [str(paths[0]), png, Image.open(io.BytesIO(png)), {"bytes": png, "path": "x.png"},
               {"bytes": None, "path": str(paths[4])}, b"garbage"]
    options = [("a red lantern", "a paper fan", "a tea cup"), ("a drum", "a flute")] * 3
    items = [mc.MCItem(s, o, i % len(o), {"k": i % 2}) for i, (s, o) in enumerate(zip(sources, options))]
    preds = mc.score_items(model, items, batch_size=4)
    assert [p.pred for p in preds] == brute_force(model, items)
    assert preds[-1].skipped.startswith("UnidentifiedImageError") and preds[-1].pred is None
    assert all(sum(p.probs) == pytest.approx(1) for p in preds[:-1])
    assert [p.pred for p in mc.score_items(model, items, batch_size=2, num_workers=2)] == [p.pred for p in preds]
    report = mc.accuracy_report(preds, group_keys=("k",))
    assert report["n"] == 5 and report["n_skipped"] == 1 and report["n/k=0"] + report["n/k=1"] == 5
    assert report["chance"] == pytest.approx(statistics.fmean([1 / 3, 1 / 2, 1 / 3, 1 / 2, 1 / 3]))


def test_registry_header_write_result_and_sources(model, retrieval_dir, tmp_path, monkeypatch):
    assert set(EVALUATORS) == {"globalrg_retrieval", "globalrg_grounding", "crope", "cultureverse"}
    assert get_evaluator("crope") is crope.evaluate
    with pytest.raises(KeyError, match="registered"):
        get_evaluator("nope")
    metrics, header = get_evaluator("globalrg_retrieval")(model, retrieval_dir)
    path = write_result(tmp_path / "out", model="tiny", pretrained=None, metrics=metrics, **header)
    record = json.loads(path.read_text())
    assert record["task"] == "globalrg_retrieval" and record["seed"] == 0 and record["n"] == 11
    assert record["extra"]["protocol"] == "fixed" and record["metrics"]["acc/seed=0"] == metrics["acc"]
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # a hub id must import datasets lazily, never the network
    with pytest.raises(ImportError, match="datasets"):
        read_rows("UBC-VL/GlobalRG-Retrieval", "test")


def test_parquet_layout(model, retrieval_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(x) for x in (retrieval_dir / "test.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = {"bytes": (retrieval_dir / r["image"]).read_bytes(), "path": r["image"]}
    (retrieval_dir / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), retrieval_dir / "data" / "test-00000-of-00001.parquet")
    (retrieval_dir / "test.jsonl").unlink()
    assert globalrg.evaluate_retrieval(model, retrieval_dir)[0]["n"] == 11
