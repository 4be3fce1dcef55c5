"""Change anything, rerun, get exactly the dataset of the current inputs.

Each case runs the curation app on the stand-ins (the local OpenAI-compatible stand-in server, the tiny
random-weight SD3 pipeline) in a folder A, changes one thing, reruns A, and compares with a run from
scratch on the new inputs in a fresh folder B:

* every stage of A ran exactly the jobs of B's plan that A had not finished before (counted from the
  reports), and A's current views equal B's;
* the exported shards and the dataset card of A equal B's byte for byte;
* switching the change back reruns nothing and gives the first export back, byte for byte.

The fast test covers the render/judge/export chain from imported caption sets; the slow matrix covers
every stage and every kind of change.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("openai")
from test_curate_app import compose_curate  # noqa: E402

from cultureclip import resolvers, schema  # noqa: E402
from cultureclip.curate import app, prompts  # noqa: E402
from cultureclip.curate.runner import Store  # noqa: E402
from cultureclip.curate.runner.gc import stores  # noqa: E402

SMALL = ["render.images_per_caption=1", "render.width=32", "render.height=32", "render.steps=2",
         "export.plots=false", "export.val_fraction=0.5", "export.pairs_per_twin=null", "export.gallery_size=4",
         "captions.n=2", "captions.max_rounds=2"]


def chain(home: Path, out: Path, *overrides: str) -> dict:
    """One app run; returns the reports by stage."""
    cfg = compose_curate(["+experiment=curate_demo", f"paths.root_dir={home}", f"out_dir={out}", *SMALL, *overrides])
    try:
        reports = app.run(cfg, echo=lambda line: None)
    finally:
        prompts.use_dir(None)
    return {r.stage: r for r in reports}


def export_bytes(out: Path) -> dict:
    """Shards, sizes and card of an export (its reports/ hold timings, which differ between runs)."""
    root = out / "export"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "reports"}


def finished(out: Path) -> dict:
    """Per store: the keys it holds an outcome for (done or rejected), current or not."""
    out_map = {}
    for store in stores(out):
        index = store.index()
        out_map[store.stage] = set(index.done) | set(index.rejected)
    return out_map


def views(out: Path) -> dict:
    return {s.stage: set(s.view()) for s in stores(out) if s.has_view()}


def check_rerun(home: Path, a: Path, b: Path, overrides: list, before: dict) -> dict:
    """Rerun A with ``overrides``, run B from scratch with them; compare (see the module docstring)."""
    got = chain(home, a, *overrides)
    chain(home, b, *overrides)
    va, vb = views(a), views(b)
    for stage, keys in vb.items():
        assert va.get(stage) == keys, f"{stage}: the current view differs from a run from scratch"
    for stage, report in got.items():
        if stage == "export":
            continue
        expected = len(vb[stage] - before.get(stage, set()))
        assert report.processed == expected, f"{stage}: ran {report.processed} jobs, {expected} were new"
    assert export_bytes(a) == export_bytes(b)
    return {s: r.processed for s, r in got.items() if s != "export"}


def write_pairs(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_change_a_caption_and_features_then_switch_back(tmp_path, monkeypatch):
    """Fast representative: re-import a corrected caption file (one caption, one side's features edited)."""
    rows = [json.loads(x) for x in Path(resolvers.data_file("curate_demo_pairs.jsonl")).read_text().splitlines()[:2]]
    v1 = write_pairs(tmp_path / "v1.jsonl", rows)
    edited = json.loads(json.dumps(rows))
    edited[0][schema.POS_CAPTIONS][0] += " at dawn"
    edited[1][schema.NEG_FEATURES] = edited[1][schema.NEG_FEATURES] + ["a new feature"]
    for r in edited:
        r.pop(schema.TWIN_ID, None)
    v2 = write_pairs(tmp_path / "v2.jsonl", edited)
    a, b = tmp_path / "a", tmp_path / "b"
    first = chain(tmp_path, a, f"input={v1}")
    assert app.failed_jobs(first.values()) == 0
    original = export_bytes(a)
    before = finished(a)
    ran = check_rerun(tmp_path, a, b, [f"input={v2}"], before)
    n_neg = len(rows[1][schema.NEG_CAPTIONS])
    # render reads the caption only: one new image; judge reads the caption's image and each side's
    # features: that image, and every image of the edited side
    assert ran == {"render": 1, "judge": 1 + n_neg}
    assert first["render"].jobs_total == len(views(a)["render"])
    # a partial upstream after a change: render stopped half-way (one of two job ranges run), so judge refuses
    v3 = write_pairs(tmp_path / "v3.jsonl", [{**r, schema.POS_CAPTIONS: [c + " again" for c in r[schema.POS_CAPTIONS]]}
                                             for r in edited])
    half = chain(tmp_path, a, f"input={v3}", "stage=render", "num_shards=2", "shard_index=0")["render"]
    missing = sum(len(r[schema.POS_CAPTIONS]) for r in edited) - half.processed  # new captions not rendered
    assert 0 < missing
    with pytest.raises(ValueError, match=rf"{missing} of {half.jobs_total} current render jobs are neither done nor "
                                         r"rejected \(0 failed , \d+ not run yet"):
        chain(tmp_path, a, "stage=judge")
    # switching back (with settings that do not change any output) reruns nothing, and gives the first export
    from cultureclip.curate.stages import render

    def no_model(*args):
        raise AssertionError("a rerun with nothing to do loaded the text-to-image model")
    monkeypatch.setattr(render, "get_pipeline", no_model)
    back = chain(tmp_path, a, f"input={v1}", "render.batch_size=1", "judge.chat.concurrency=2")
    assert {s: r.processed for s, r in back.items() if s != "export"} == {"render": 0, "judge": 0}
    assert export_bytes(a) == original


# ---------------------------------------------------------------------------------------------- slow matrix
SEED = [json.loads(x) for x in (Path(resolvers.data_file("curate_demo_concepts.jsonl")).read_text().splitlines())]


def seed_file(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    return path


def _edit_features(items):
    out = json.loads(json.dumps(items))
    out[0]["features"] = out[0]["features"][:1] + ["embroidered hem"]
    return out


CHANGES = {  # name -> (seed items, extra overrides, prompt files to edit)
    "upstream_record": (_edit_features, [], {}),
    "prompt_file": (None, [], {"judge_twin": " Look closely."}),
    "caption_prompt_file": (None, [], {"captions": " Keep them short."}),
    "setting_that_matters": (None, ["seed=7", "twins.min_similarity=4"], {}),
    "chat_sampling": (None, ["chat.temperature=0.5"], {}),  # changes every chat stage's answers
    "setting_that_does_not": (None, ["render.part_size=5", "judge.part_size=7", "chat.concurrency=2",
                                     "captions.chunk=3"], {}),
    "added_input": (lambda items: items + [SEED[12]], [], {}),
    "removed_input": (lambda items: items[1:], [], {}),
}


@pytest.mark.slow
def test_rule_rejections_rerun_with_zero_requests_and_exit_0(tmp_path):
    """Seed rows that fail a rule and a concept whose captions always fail the checks: rejected, listed in
    the card by reason; the same command again sends no request and reports no failed job."""
    from cultureclip.curate.backends.standin import StandinServer
    from test_curate_concepts import standin
    from cultureclip.curate.stages import captions, concepts, judge, twins
    bad = [{**SEED[0], "country": ""}, {**SEED[1], "category": "Dance"}]
    # the stand-in only ever answers Sherwani with too-long captions; its features share words with Durumagi's
    sherwani = [{"concept": "Sherwani", "native_name": "शेरवानी", "country": "India", "category": "Clothing",
                 "context": "a long coat worn by grooms", "features": ["long overcoat", "straight sleeves"]}]
    seed = seed_file(tmp_path / "seed.jsonl", SEED[:4] + SEED[6:10] + sherwani + bad)
    common = ["concepts.sources=[seed]", f"concepts.seed.file={seed}", "standin=false"]
    with standin(concepts, twins, captions, judge) as srv:
        first = chain(tmp_path, tmp_path / "a", *common, f"chat.base_url={srv.url}")
        assert app.failed_jobs(first.values()) == 0 and first["concepts"].rejected_by_reason == {
            "no_country": 1, "unknown_category": 1}
        n = srv.requests
        again = chain(tmp_path, tmp_path / "a", *common, f"chat.base_url={srv.url}")
        assert srv.requests == n and app.failed_jobs(again.values()) == 0
    assert isinstance(srv, StandinServer)
    card = json.loads((tmp_path / "a" / "export" / "card.json").read_text())
    assert card["stages"]["concepts"]["rejected_by_reason"] == {"no_country": 1, "unknown_category": 1}
    assert card["stages"]["captions"]["rejected_by_reason"] == {"caption_set_rejected": 1}
    md = (tmp_path / "a" / "export" / "card.md").read_text()  # Markdown-escaped cells
    assert "| concepts | 11 | 9 | 2 | 0 | 0 | no\\_country: 1, unknown\\_category: 1 |" in md
    assert re.search(r"\| captions \| \d+ \| \d+ \| 1 \| 0 \| 0 \| caption\\_set\\_rejected: 1 \|", md)


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_rerun_after_change_matrix(tmp_path, change):
    """Every stage, from a concept seed list to export: one change, rerun, compare with a fresh run."""
    base = SEED[:4] + SEED[6:10]  # Chinese and Japanese clothing and cuisine: twins exist among them
    make, extra, edits = CHANGES[change]
    v1 = seed_file(tmp_path / "seed1.jsonl", base)
    v2 = seed_file(tmp_path / "seed2.jsonl", make(base) if make else base)
    common = ["concepts.sources=[seed]"]
    a, b = tmp_path / "a", tmp_path / "b"
    chain(tmp_path, a, *common, f"concepts.seed.file={v1}")
    original = export_bytes(a)
    before = finished(a)
    overrides = [*common, f"concepts.seed.file={v2}", *extra]
    if edits:
        pdir = tmp_path / "prompts"
        pdir.mkdir()
        for name, suffix in edits.items():
            (pdir / f"{name}.txt").write_text(prompts.load(name) + suffix)
        overrides.append(f"prompts_dir={pdir}")
    ran = check_rerun(tmp_path, a, b, overrides, before)
    if change == "setting_that_does_not":
        assert set(ran.values()) == {0}
    elif change == "prompt_file":
        assert ran["judge"] == len(views(a)["judge"]) and sum(v for s, v in ran.items() if s != "judge") == 0
    elif change == "caption_prompt_file":  # the sets are asked again; the stand-in gives the same captions,
        assert ran["captions"] == 0 and ran["render"] == 0  # so no pair and no image changes (Merkle on content)
    else:
        assert sum(ran.values()) > 0
    shutil.rmtree(b)
    back = chain(tmp_path, a, *common, f"concepts.seed.file={v1}")
    assert {s: r.processed for s, r in back.items() if s != "export"} == {s: 0 for s in back if s != "export"}
    assert export_bytes(a) == original
