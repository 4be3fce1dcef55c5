"""Stage concepts on the stand-in server: top-down cells, WIT pages, seed lists; per-item prompts;
categories outside the enum rejected with the reason. Also the shared helpers the upstream stages use."""
import base64
import json
import unicodedata
from contextlib import contextmanager

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("openai")

from cultureclip import schema  # noqa: E402
from cultureclip.curate.stages import concepts  # noqa: E402
from cultureclip.curate.stages import upstream as up  # noqa: E402
from cultureclip.curate.runner import Store  # noqa: E402
from cultureclip.curate.registry import Context  # noqa: E402
from cultureclip.curate.backends.standin import StandinServer, request_images, request_text, schema_name  # noqa: E402

COUNTRIES = ["Japan", "Mexico", "South Korea", "Vietnam"]
CATS = ["Cuisine", "Clothing"]


@contextmanager
def standin(*modules, **kwargs):
    """A stand-in server answering with the given stage modules' responders."""
    responders = {}
    for m in modules:
        responders.update(m.standin_responders())
    with StandinServer(responders, **kwargs) as srv:
        yield srv


def ctx_for(out, srv, **kwargs):
    chat = {"base_url": srv.url, "model": "standin", "concurrency": 4, "max_attempts": 2, "timeout_s": 10,
            "backoff_s": 0.01}
    return Context(out_dir=out, chat=chat, **kwargs)


def top_down_cfg(countries=COUNTRIES, cats=CATS, n=3):
    return {"sources": ["top_down"], "categories": cats, "top_down": {"countries": countries, "n_per_cell": n}}


# ---------------------------------------------------------------------------- helpers
def test_country_list_sorted_unique_inhabited():
    names = up.load_countries()
    assert names == sorted(names, key=str.casefold) and len(set(names)) == len(names) > 200
    for uninhabited in ("Antarctica", "Bouvet Island", "Heard Island and McDonald Islands",
                        "South Georgia and the South Sandwich Islands", "French Southern Territories"):
        assert uninhabited not in names
    assert {"Japan", "Côte d'Ivoire", "Greenland"} <= set(names)


def test_country_list_duplicate_is_an_error(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("# comment\nJapan\nPeru\nJapan\n")
    with pytest.raises(ValueError, match=r"c.txt:4: 'Japan' is listed twice \(first at line 2\)"):
        up.load_countries(str(p))


def test_categories_parse_and_never_default():
    assert up.parse_category("cuisine") is up.Category.CUISINE
    assert up.parse_category("Animals and Plants") is up.Category.ANIMALS_PLANTS
    assert up.parse_category("DAILY_LIFE") is up.Category.DAILY_LIFE
    assert [c.value for c in up.categories_from(None)] == ["Cuisine", "Clothing", "Art", "Architecture", "Symbol",
                                                           "Festival"]
    for bad in ("Dance", "", None, "Symbols and more"):
        with pytest.raises(up.UnknownCategory):
            up.parse_category(bad)
    with pytest.raises(up.UnknownCategory, match="not enabled"):
        up.parse_category("Daily Life", up.DEFAULT_CATEGORIES)


def test_normalize_name():
    assert up.normalize_name("Phở bò") == up.normalize_name("PHO-BO!") == "pho bo"
    assert up.normalize_name("Bánh  mì") == "banh mi"
    assert up.normalize_name("Đình làng") == "dinh lang"
    assert up.normalize_name("ｒａｍｅｎ") == "ramen"  # NFKC: full-width letters
    assert up.normalize_name("着物") == "着物"  # letters of other scripts stay


# ---------------------------------------------------------------------------- top-down
def expected_cells(countries, cats, n):
    """What the top-down cells must accept and reject, recomputed from the stand-in table."""
    world = up.load_demo_world()["concepts"]
    accepted, rejected = {}, []
    for country in countries:
        for cat in cats:
            seen = set()
            for item in world.get(f"{country}|{cat}", [])[:n]:
                c = item.get("category", cat)
                if c not in [x.value for x in up.Category]:
                    rejected.append((item["concept"], "unknown_category"))
                elif unicodedata.normalize("NFC", up.normalize_name(item["concept"])) in seen:
                    rejected.append((item["concept"], "duplicate_in_cell"))
                else:
                    seen.add(up.normalize_name(item["concept"]))
                    accepted[(item["concept"], country, cat)] = item
    return accepted, rejected


def test_top_down_cells_and_rejections(tmp_path):
    with standin(concepts) as srv:
        report = concepts.run(top_down_cfg(), ctx_for(tmp_path, srv))
    assert report.jobs_total == len(COUNTRIES) * len(CATS) and report.ok == report.jobs_total
    got = {(c["concept"], c["country"], c["category"]): c for c in concepts.load_concepts(tmp_path)}
    accepted, rejected = expected_cells(COUNTRIES, CATS, 3)
    assert set(got) == set(accepted)
    for k, c in got.items():
        assert c[schema.FEATURES] == accepted[k]["features"] and c[schema.NATIVE_NAME] == accepted[k]["native_name"]
        assert c[schema.CONCEPT_ID] == up.concept_id(*k)
    recs = list(Store(tmp_path / "concepts", "concepts").records())
    got_rej = sorted((r["concept"], r["reason"].split(":")[0]) for rec in recs for r in rec["rejected"])
    assert got_rej == sorted(rejected)
    assert ("Jarabe tapatío", "unknown_category") in got_rej  # "Dance" is not mapped to any category
    assert not any(c["concept"] == "Jarabe tapatío" for c in got.values())
    card = concepts.card_section(tmp_path)
    assert card["data"]["accepted"] == len(accepted)
    assert card["data"]["rejected_by_reason"] == {"unknown_category": 1, "duplicate_in_cell": 1}
    assert card["data"]["proposed"] == len(accepted) + len(rejected)


def test_top_down_prompts_carry_only_their_own_cell(tmp_path):
    """The reference's batched prompts shared one template: each carried the last item's text."""
    with standin(concepts) as srv:
        concepts.run(top_down_cfg(), ctx_for(tmp_path, srv))
        bodies = list(srv.bodies)
    assert len(bodies) == len(COUNTRIES) * len(CATS)
    cells = []
    for body in bodies:
        assert schema_name(body) == "ConceptList"
        text = request_text(body)
        fields = up.read_block(text)
        cells.append((fields["Country"], fields["Category"]))
        others = [c for c in COUNTRIES if c != fields["Country"]]
        assert not any(o in text for o in others), "a request carries another cell's country"
        assert text.count("Country: ") == 1
    assert sorted(cells) == sorted((c, k) for c in COUNTRIES for k in CATS)


def test_top_down_rerun_skips_done_cells(tmp_path):
    with standin(concepts) as srv:
        concepts.run(top_down_cfg(), ctx_for(tmp_path, srv))
        n = srv.requests
        again = concepts.run(top_down_cfg(), ctx_for(tmp_path, srv))
        assert srv.requests == n and again.done_before == again.jobs_total


# ---------------------------------------------------------------------------- WIT pages
def _png(path, color):
    from PIL import Image
    Image.new("RGB", (8, 8), color).save(path)
    return path.read_bytes()


def wit_rows(tmp_path):
    imgs = tmp_path / "img"
    imgs.mkdir()
    data = {t: _png(imgs / f"{i}.png", (40 * i, 10, 10)) for i, t in enumerate(
        ["Hanbok", "Tower Bridge", "Batik", "Toyota Corolla"])}
    (imgs / "broken.png").write_bytes(b"not a png")
    rows = [{"page_url": "w/Hanbok", "page_title": "Hanbok", "caption_reference_description": "A woman in hanbok",
             "context_page_description": "Hanbok is the traditional Korean dress.", "image_path": "img/0.png"},
            {"page_url": "w/Hanbok", "page_title": "Hanbok", "image_path": "img/1.png"},  # same page: dropped
            {"page_url": "w/Tower", "page_title": "Tower Bridge", "image_path": "img/1.png",
             "context_page_description": "A bridge in London."},
            {"page_url": "w/Batik", "page_title": "Batik", "image_path": "img/2.png"},
            {"page_url": "w/Corolla", "page_title": "Toyota Corolla", "image_path": "img/3.png"},
            {"page_url": "w/Broken", "page_title": "Hanok", "image_path": "img/broken.png"},
            {"page_url": "w/NoImage", "page_title": "Machiya"}]
    path = tmp_path / "wit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, data


def test_wit_rows_jsonl_and_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path, rows, _ = wit_rows(tmp_path)
    got = concepts.read_wit({"files": [str(path)]})
    assert [r["page_title"] for r in got] == ["Hanbok", "Tower Bridge", "Batik", "Toyota Corolla", "Hanok", "Machiya"]
    assert got[0]["image_path"] == str(tmp_path / "img/0.png") and got[0]["where"] == f"{path}:1"
    keys = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp_path / "wit.parquet")
    got_pq = concepts.read_wit({"files": [str(tmp_path / "wit.parquet")]})
    assert [{k: v for k, v in r.items() if k != "where"} for r in got_pq] == \
           [{k: v for k, v in r.items() if k != "where"} for r in got]
    assert len(concepts.read_wit({"files": [str(path)], "limit": 2})) == 2
    pytest.importorskip("datasets")  # the `datasets` path, with its local json loader (no network)
    got_ds = concepts.read_wit({"dataset": "json", "data_files": [str(path)], "split": "train"})
    assert [r["page_title"] for r in got_ds] == [r["page_title"] for r in got]
    assert got_ds[1]["where"] == "json[2]"  # the page's first row, the second row of the dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"page_title": "A"}\n{"section_title": "no title"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*page_title"):
        concepts.read_wit({"files": [str(bad)]})


def test_wiki_pages(tmp_path):
    path, _, data = wit_rows(tmp_path)
    cfg = {"sources": ["wiki"], "wiki": {"files": [str(path)]}}
    with standin(concepts) as srv:
        report = concepts.run(cfg, ctx_for(tmp_path / "out", srv))
        bodies = list(srv.bodies)
    assert report.jobs_total == 6
    # a page without an image, an unreadable image and a valid answer that fails a check are rejected for
    # good (the image file's hash is in the key: a repaired file makes a new job)
    assert report.rejected_by_reason == {"no_image": 1, "unknown_category": 1, "unreadable_image": 1}
    assert report.errors == 0
    store = Store(tmp_path / "out" / "concepts", "concepts")
    assert any("broken.png" in r["message"] for r in store.rejections())
    assert any("'Textile'" in r["message"] for r in store.rejections())  # Batik: not mapped to a default
    got = {c["concept"]: c for c in concepts.load_concepts(tmp_path / "out")}
    assert set(got) == {"Hanbok", "Tower Bridge"}
    assert got["Hanbok"]["country"] == "South Korea" and got["Hanbok"]["category"] == "Clothing"
    assert got["Hanbok"]["features"] and got["Hanbok"]["source"] == "wiki"
    rej = [r for rec in store.records() for r in rec["rejected"]]
    assert [(r["concept"], r["reason"].split(":")[0]) for r in rej] == [("Toyota Corolla", "not_cultural")]
    # each request carries its own page's title and image (broken and missing images are never sent)
    assert len(bodies) == 4
    for body in bodies:
        title = up.read_block(request_text(body))["Title"]
        (url,) = request_images(body)
        sent = base64.b64decode(url.split(",", 1)[1])
        assert sent == data[title], title


# ---------------------------------------------------------------------------- seed lists
def test_seed_file(tmp_path):
    seed = tmp_path / "seed.jsonl"
    items = [{"concept": "Ramen", "country": "Japan", "category": "cuisine", "features": ["noodles"]},
             {"concept": "Tango", "country": "Argentina", "category": "Dance", "features": ["embrace"]},
             {"concept": "Hanbok", "country": "", "category": "Clothing", "features": ["jacket"]},
             {"concept": "Sari", "country": "India", "category": "Clothing", "features": []}]
    seed.write_text("".join(json.dumps(i) + "\n" for i in items))
    report = concepts.run({"sources": ["seed"], "seed": {"file": str(seed)}}, Context(out_dir=tmp_path))
    assert report.ok == 1 and report.rejected_by_reason == {"no_country": 1, "no_features": 1, "unknown_category": 1}
    assert report.errors == 0
    (c,) = concepts.load_concepts(tmp_path)
    assert (c["concept"], c["category"], c["source"]) == ("Ramen", "Cuisine", "seed")
    msgs = sorted(r["message"] for r in Store(tmp_path / "concepts", "concepts").rejections())
    assert any(m.startswith(f"{seed}:2: unknown_category") for m in msgs)
    seed.write_text('{"concept": "A"}\nnot json\n')
    with pytest.raises(ValueError, match=r"seed.jsonl:2: not a JSON object"):
        concepts.read_seed(str(seed))
    assert len(concepts.read_seed("package:curate_demo_concepts.jsonl")) == 16


def test_adding_a_source_later_keeps_the_done_cells(tmp_path):
    with standin(concepts) as srv:
        ctx = ctx_for(tmp_path, srv)
        concepts.run(top_down_cfg(["Japan"], ["Cuisine"], 2), ctx)
        cfg = {**top_down_cfg(["Japan"], ["Cuisine"], 2), "sources": ["top_down", "seed"],
               "seed": {"file": "package:curate_demo_concepts.jsonl"}}
        report = concepts.run(cfg, ctx)
        assert srv.requests == 1  # the cell was not asked again
    # the seed list's Clothing concepts are not enabled here: rejected with that reason, not re-categorised
    assert report.done_before == 1 and report.ok == 8 and report.rejected_by_reason == {"category_not_enabled": 8}
    got = concepts.load_concepts(tmp_path)
    # both sources' records are in the view; of two giving one concept id, the record with the smaller key
    # wins (recomputed here from the store), so which source a shared concept comes from follows the keys
    recs = list(Store(tmp_path / "concepts", "concepts").records())
    assert {e["source"] for r in recs for e in r["concepts"]} == {"top_down", "seed"}
    first = {}
    for r in sorted(recs, key=lambda r: r["key"], reverse=True):
        for e in r["concepts"]:
            first[e["concept_id"]] = e
    assert got == [first[k] for k in sorted(first)] and {c["category"] for c in got} == {"Cuisine"}
    # Ramen and Sushi come from both sources: one concept id each
    assert len(got) == len({c["concept_id"] for c in got}) == 8
