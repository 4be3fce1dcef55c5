"""The twin caption-set importer (cultureclip.curate.stages.importer): three formats, errors, the pairs store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cultureclip import schema
from cultureclip.curate.stages import importer as I
from cultureclip.curate.runner import Job, Outcome, Store, digest, run_stage
from cultureclip.data.shards import RecordError

POS_CAPS = ["A bowl of bibimbap with a fried egg on a wooden table.", "Bibimbap in a hot stone bowl at a market stall."]
NEG_CAPS = ["A plate of nasi campur with sambal on a banana leaf.", "Nasi campur served at a warung in Bali."]


def caption_row(**extra):
    """A row of the reference caption file (features as a string on one side, a list on the other)."""
    row = {schema.CATEGORY: "Cuisine", schema.POS_CONCEPT: "Bibimbap", schema.POS_CONTEXT: "Korean mixed rice",
           schema.POS_FEATURES: "stone bowl, fried egg", schema.NEG_CONCEPT: "Nasi campur",
           schema.NEG_CONTEXT: "Indonesian mixed rice", schema.NEG_FEATURES: ["banana leaf", "sambal"],
           schema.POS_CAPTION: POS_CAPS[0], schema.REF_POS_ALL_CAPTIONS: POS_CAPS,
           schema.NEG_CAPTION: NEG_CAPS[1], schema.REF_NEG_ALL_CAPTIONS: NEG_CAPS}
    row.update(extra)
    return row


def render_input_rows():
    """The reference render input of the same twin pair: the 2x2 caption product, rows shuffled."""
    rows = []
    for i, pc in enumerate(POS_CAPS):
        for j, nc in enumerate(NEG_CAPS):
            rows.append({schema.REF_SAMPLE_ID: 2 * i + j, schema.REF_POS_CAPTION_ID: i, schema.REF_NEG_CAPTION_ID: j,
                         schema.POS_CONCEPT: "Bibimbap", schema.POS_CONTEXT: "Korean mixed rice",
                         schema.POS_CAPTION: pc, schema.NEG_CONCEPT: "Nasi campur",
                         schema.NEG_CONTEXT: "Indonesian mixed rice", schema.NEG_CAPTION: nc,
                         schema.REF_METADATA: {schema.CATEGORY: "Cuisine", schema.POS_FEATURES: "stone bowl, fried egg",
                                               schema.NEG_FEATURES: ["banana leaf", "sambal"]}})
    return [rows[3], rows[0], rows[2], rows[1]]


def expected_record():
    """The record written by hand from the field rules (not by the importer)."""
    tid = digest({"twin": {"category": "Cuisine", "pos_concept": "Bibimbap", "pos_country": None,
                           "neg_concept": "Nasi campur", "neg_country": None}})
    return {"twin_id": tid, "category": "Cuisine", "pos_concept": "Bibimbap", "pos_country": None,
            "pos_context": "Korean mixed rice", "pos_features": ["stone bowl, fried egg"], "pos_captions": POS_CAPS,
            "neg_concept": "Nasi campur", "neg_country": None, "neg_context": "Indonesian mixed rice",
            "neg_features": ["banana leaf", "sambal"], "neg_captions": NEG_CAPS}


def write(path: Path, rows, as_list=False) -> Path:
    lines = (r if isinstance(r, str) else json.dumps(r) for r in rows)
    text = json.dumps(rows, indent=1) if as_list else "\n".join(lines)
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("fmt", ["captions_jsonl", "captions_json_list", "render_input", "ours",
                                 "captions_category_in_metadata"])
def test_every_format_gives_the_same_record(tmp_path, fmt):
    if fmt == "render_input":
        src = write(tmp_path / "in.jsonl", render_input_rows())
    elif fmt == "ours":
        src = write(tmp_path / "in.jsonl", [expected_record()])
    elif fmt == "captions_category_in_metadata":
        row = caption_row()
        row[schema.REF_METADATA] = {schema.CATEGORY: row.pop(schema.CATEGORY)}
        src = write(tmp_path / "in.jsonl", [row])
    else:
        src = write(tmp_path / "in.json", [caption_row()], as_list=fmt.endswith("list"))
    records, report = I.read_pairs([src])
    assert records == [expected_record()]
    assert report.rows == (4 if fmt == "render_input" else 1) and report.pairs == 1 and report.skipped == 0


def test_render_input_captions_follow_caption_ids_and_merge_with_caption_rows(tmp_path):
    rows = render_input_rows()
    for r in rows:  # caption id 1 first in id order: the reverse of the file's first row
        r[schema.REF_POS_CAPTION_ID] = 1 - r[schema.REF_POS_CAPTION_ID]
    records, report = I.read_pairs([write(tmp_path / "a.jsonl", rows)])
    assert records[0][schema.POS_CAPTIONS] == POS_CAPS[::-1] and report.merged_rows == 3
    # a caption-file row of the same twin pair adds its new caption after the known ones
    extra = caption_row(**{schema.REF_POS_ALL_CAPTIONS: [POS_CAPS[0], "Bibimbap on a tray."]})
    records, _ = I.read_pairs([write(tmp_path / "b.jsonl", [extra]), tmp_path / "a.jsonl"])
    assert records[0][schema.POS_CAPTIONS] == [POS_CAPS[0], "Bibimbap on a tray.", POS_CAPS[1]]


@pytest.mark.parametrize("change, field", [
    (lambda r: r.pop(schema.POS_CONCEPT), "'pos_concept'"),
    (lambda r: r.update({schema.NEG_FEATURES: 3}), "'neg_features'"),
    (lambda r: r.update({schema.REF_POS_ALL_CAPTIONS: ["ok", "  "]}), "'pos_all_captions' item 1 is blank"),
    (lambda r: r.pop(schema.CATEGORY), "'category'"),
    (lambda r: r.update({schema.NEG_CONCEPT: "Bibimbap"}), "same concept"),
    (lambda r: r.update({schema.REF_METADATA: {schema.CATEGORY: "Art"}}), "metadata.category is 'Art'"),
    (lambda r: r.pop(schema.REF_POS_ALL_CAPTIONS), "unknown row format"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, change, field):
    bad = caption_row()
    change(bad)
    src = write(tmp_path / "in.jsonl", [caption_row(**{schema.POS_CONCEPT: "Tteok"}), bad])
    with pytest.raises(RecordError, match=rf"in\.jsonl:2: .*{field}"):
        I.read_pairs([src])


def test_conflicts_between_rows_name_both_places(tmp_path):
    rows = render_input_rows()
    rows[2] = {**rows[2], schema.POS_CAPTION: "another caption"}  # caption id 1 with a second text
    with pytest.raises(RecordError, match=r"in\.jsonl:3: .*'pos_caption'.*in\.jsonl:1"):
        I.read_pairs([write(tmp_path / "in.jsonl", rows)])
    other = caption_row(**{schema.POS_CONTEXT: "something else"})
    with pytest.raises(RecordError, match=r"b\.jsonl:1: field 'pos_context'.*a\.jsonl:1"):
        I.read_pairs([write(tmp_path / "a.jsonl", [caption_row()]), write(tmp_path / "b.jsonl", [other])])


def test_skip_mode_counts_and_keeps_the_rest(tmp_path):
    src = write(tmp_path / "in.jsonl", [caption_row(), "{not json", caption_row(**{schema.POS_CONCEPT: ""}),
                                        json.dumps([1]), caption_row(**{schema.POS_CONCEPT: "Tteok"})])
    records, report = I.read_pairs([src], on_error="skip")
    assert sorted(r[schema.POS_CONCEPT] for r in records) == ["Bibimbap", "Tteok"]
    assert report.rows == 5 and report.skipped == 3 and report.skipped_by_reason == {"bad_record": 3}
    assert [w for w, _ in report.skips] == [f"{src}:2", f"{src}:3", f"{src}:4"]
    with pytest.raises(RecordError, match=r"in\.jsonl:2: invalid JSON"):
        I.read_pairs([src])


def test_import_view_reimport_wins_and_switching_back_is_free(tmp_path):
    out = tmp_path / "run"
    src = write(tmp_path / "in.jsonl", [caption_row(), caption_row(**{schema.POS_CONCEPT: "Tteok"})])
    with pytest.raises(FileNotFoundError, match=r"import them \(input=...\) or run stage=captions"):
        I.load_pairs(out)
    report = I.import_pairs([src], out)
    pairs = I.load_pairs(out)
    assert report.pairs == 2 and {p[schema.POS_CONCEPT] for p in pairs} == {"Bibimbap", "Tteok"}
    assert I.read_pairs([src])[0] == [{k: v for k, v in p.items() if k != schema.REC_KEY} for p in pairs]
    files = sorted(p.name for p in (out / I.STAGE / "parts").iterdir())
    I.import_pairs([src], out)  # same input again: nothing new written
    assert sorted(p.name for p in (out / I.STAGE / "parts").iterdir()) == files
    # a corrected file: its pairs are the view now (an import always wins), the old ones are only a cache
    fixed = caption_row(**{schema.POS_CONTEXT: "Korean mixed rice, corrected"})
    I.import_pairs([write(tmp_path / "other.jsonl", [fixed])], out)
    (now,) = I.load_pairs(out)
    assert now[schema.POS_CONTEXT] == "Korean mixed rice, corrected"
    assert json.loads((out / I.STAGE / I.REPORT_FILE).read_text())["pairs"] == 1
    section = I.card_section(out)
    assert section["data"]["pairs"] == 1 and "1 twin pairs from 1 rows" in section["markdown"]
    # a captions run makes the captions store the source; importing again makes the import the source
    captions = Store(out / I.CAPTIONS_STAGE, I.CAPTIONS_STAGE)
    run_stage(captions, [Job(inputs={"x": 1, schema.TWIN_ID: "t"})],
              lambda jobs: [Outcome(j[schema.REC_KEY], record={"x": 1, schema.TWIN_ID: "t"}) for j in jobs])
    I.set_pairs_source(out, I.CAPTIONS_STAGE)
    assert [p["x"] for p in I.load_pairs(out)] == [1] and I.card_section(out) is None
    I.import_pairs([src], out)
    assert sorted(p[schema.POS_CONCEPT] for p in I.load_pairs(out)) == ["Bibimbap", "Tteok"]
    assert sorted(p.name for p in (out / I.STAGE / "parts").iterdir())[:len(files)] == files


def test_missing_input_and_empty_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        I.import_pairs([tmp_path / "nope.jsonl"], tmp_path / "run")
    src = write(tmp_path / "in.jsonl", ["{bad"])
    with pytest.raises(ValueError, match="no usable twin pair"):
        I.import_pairs([src], tmp_path / "run", on_error="skip")


def test_load_pairs_reads_only_the_current_view_and_refuses_an_incomplete_one(tmp_path):
    store = Store(tmp_path / I.CAPTIONS_STAGE, I.CAPTIONS_STAGE)
    I.set_pairs_source(tmp_path, I.CAPTIONS_STAGE)

    def make(jobs):
        for j in jobs:
            if j["i"] == 9:
                yield Outcome(j[schema.REC_KEY], error="http_503", message="down")
            else:
                yield Outcome(j[schema.REC_KEY], record={"n": j["i"], schema.TWIN_ID: str(j["i"])})

    run_stage(store, [Job(inputs={"i": i}) for i in range(3)], make)
    run_stage(store, [Job(inputs={"i": i}) for i in range(2, 5)], make)  # a rerun on other concepts
    assert len(store.index().done) == 5
    assert sorted(r["n"] for r in I.load_pairs(tmp_path)) == [2, 3, 4]
    run_stage(store, [Job(inputs={"i": i}) for i in (2, 9)], make)
    with pytest.raises(ValueError, match=r"1 of 2 current captions jobs are neither done nor rejected"):
        I.load_pairs(tmp_path)
