"""``python -m cultureclip.curate``: stage selection, config composition, the stand-in wiring, exit codes,
and the embedded demo end to end (its shards then train)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_curate_export import make_run, read_shards

from cultureclip import resolvers, schema
from cultureclip.curate import app
from cultureclip.curate.stages.importer import read_pairs
from cultureclip.curate.runner import in_val

CONF = Path(__file__).resolve().parents[1] / "cultureclip" / "conf"
ROOT = Path(__file__).resolve().parents[1]


def compose_curate(overrides):
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("curate", overrides=overrides)
    cfg.paths.run_dir = cfg.out_dir  # what Hydra's run dir would be (no HydraConfig outside @hydra.main)
    return OmegaConf.to_container(cfg, resolve=True)


def test_stage_list():
    cfg = {"render": {}, "judge": {}, "export": {}, "captions": {}, "input": None}
    assert app.stage_list("all", cfg) == ["captions", "render", "judge", "export"]
    assert app.stage_list("all", {**cfg, "input": "x.jsonl"}) == ["render", "judge", "export"]
    assert app.stage_list(["export", "render", "export"], cfg) == ["render", "export"]
    with pytest.raises(app.CurateError, match=r"unknown stage\(s\) \['rendr'\]"):
        app.stage_list(["rendr"], cfg)
    assert app.stage_list("import", {**cfg, "input": "x.jsonl"}) == []
    with pytest.raises(app.CurateError, match="stage=import needs input="):
        app.stage_list("import", cfg)
    # input= replaces the caption sets: together with a stage that makes them it is refused, never ignored
    with pytest.raises(app.CurateError, match=r"input= replaces the caption sets that stage\(s\) \['captions'\]"):
        app.stage_list(["captions", "render"], {**cfg, "input": "x.jsonl"})
    assert app.stage_list("gc", cfg) == []


def test_gc_through_the_app_lists_then_removes(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    src = tmp_path / "fewer.jsonl"  # re-import without the last twin pair: its records leave the view
    rows = [json.loads(x) for x in (tmp_path / "pairs_in.jsonl").read_text().splitlines()]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    app.run({"out_dir": str(out), "stage": "import", "input": str(src)}, echo=lambda line: None)
    lines = []
    app.run({"out_dir": str(out), "stage": "gc"}, echo=lines.append)
    pairs_line = next(x for x in lines if x.startswith(f"gc {out / 'pairs'}:"))
    assert "would remove 1 records" in pairs_line and (out / "pairs" / "parts").exists()
    lines.clear()
    app.run({"out_dir": str(out), "stage": "gc", "gc_dry_run": False}, echo=lines.append)
    assert any(x.startswith(f"gc {out / 'pairs'}: removed 1 records") for x in lines)
    lines.clear()
    app.run({"out_dir": str(out), "stage": "gc"}, echo=lines.append)
    assert all("would remove 0 records" in x for x in lines)


def test_demo_config_composes(tmp_path):
    cfg = compose_curate(["+experiment=curate_demo", f"paths.root_dir={tmp_path}"])
    assert cfg["standin"] is True and cfg["render"]["model"] == "tiny-sd3" and cfg["out_dir"].startswith(str(tmp_path))
    assert cfg["input"] is None and cfg["concepts"]["top_down"]["countries"]  # the whole chain, from concepts
    pairs, report = read_pairs([resolvers.data_file("curate_demo_pairs.jsonl")])  # the packaged set loads
    assert 6 <= len(pairs) <= 10 and report.skipped == 0
    assert all(2 <= len(p[k]) <= 3 for p in pairs for k in (schema.POS_CAPTIONS, schema.NEG_CAPTIONS))
    default = compose_curate([f"paths.root_dir={tmp_path}"])
    assert default["render"]["model"] == "stabilityai/stable-diffusion-3.5-large-turbo"
    assert default["judge"]["chat"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and default["standin"] is False
    assert set(default["chat"].values()) == {None}  # run-wide overrides: none unless the command sets one
    assert app.stage_list(default["stage"], default) == ["concepts", "dedup", "twins", "captions", "render", "judge",
                                                         "export"]
    assert app.stage_list(default["stage"], {**default, "input": "x.jsonl"}) == ["render", "judge", "export"]


def test_judge_and_export_through_the_standin_server(tmp_path):
    out = tmp_path / "run"
    made = make_run(out, judge=False)  # pairs and renders on disk; judge and export by the app
    cfg = compose_curate(["judge=standin", f"out_dir={out}", "stage=[judge,export]", "standin=true",
                          "export.plots=false", "export.pairs_per_twin=null"])
    lines = []
    reports = app.run(cfg, echo=lines.append)
    assert [r.stage for r in reports] == ["judge", "export"] and app.failed_jobs(reports) == 0
    assert reports[0].ok == len(made["renders"]) == 16
    assert lines[0].startswith("stand-in chat server") and lines[1].startswith("judge [00000of00001]: 16 of 16")
    judged = [json.loads(line) for p in sorted((out / "judge" / "parts").glob("*.jsonl")) for line in p.open()]
    n_train = len(read_shards(out / "export" / "train")) + len(read_shards(out / "export" / "val"))
    assert reports[1].extra["train_pairs"] + reports[1].extra["val_pairs"] == n_train
    card = json.loads((out / "export" / "card.json").read_text())
    assert card["judge"]["images_judged"] == len(judged) == 16
    # a second run does nothing new: every image is judged already
    again = app.run(cfg, echo=lines.append)
    assert again[0].done_before == 16 and again[0].processed == 0


def test_export_with_num_shards_is_refused(tmp_path):
    cfg = compose_curate([f"out_dir={tmp_path}", "stage=export", "num_shards=2"])
    with pytest.raises(app.CurateError, match="export runs once"):
        app.run(cfg)


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_error_exit(tmp_path):
    proc = _cli(["cultureclip.curate", "stage=export", f"out_dir={tmp_path / 'empty'}"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: FileNotFoundError:" in proc.stderr and "import them (input=...) or run stage=captions" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pos_captions": ["a"], "neg_captions": ["b"], "category": "Art"}\n')
    proc = _cli(["cultureclip.curate", f"input={bad}", f"out_dir={tmp_path / 'run'}", "stage=render"], tmp_path)
    assert proc.returncode == 1 and f"{bad}:1: missing field 'pos_concept'" in proc.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo command on 2 of its twin pairs (to stay quick), one image per caption, with a pass rule
    that keeps every image (so both splits have pairs whatever the stand-in answers)."""
    home = tmp_path_factory.mktemp("demo")
    pairs = Path(resolvers.data_file("curate_demo_pairs.jsonl")).read_text().splitlines()[:2]
    (home / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    twin_ids = [p[schema.TWIN_ID] for p in read_pairs([home / "pairs.jsonl"])[0]]
    # the split rule is a hash of each twin id: the first split seed that puts one pair on each side
    split_seed = next(s for s in range(100) if sum(in_val(t, s, 0.5) for t in twin_ids) == 1)
    proc = _cli(["cultureclip.curate", "+experiment=curate_demo", f"paths.root_dir={home}",
                 f"input={home / 'pairs.jsonl'}", "render.images_per_caption=1", "export.val_fraction=0.5",
                 f"export.split_seed={split_seed}",
                 "export.pairs_per_twin=null", "export.plots=false", "export.rule.min_score=1",
                 "export.rule.min_mean=1.0", "export.rule.require_twin_check=false"], home)
    return home, proc


@pytest.mark.slow
def test_demo_command_end_to_end(demo_run):
    home, proc = demo_run
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    out = home / "data" / "curate_demo"
    assert "stand-in chat server" in proc.stdout and "export [00000of00001]" in proc.stdout
    card = json.loads((out / "export" / "card.json").read_text())
    assert card["stages"]["render"]["done"] == 10 and card["judge"]["images_judged"] == 10
    pairs = [json.loads(line) for line in (home / "pairs.jsonl").open()]
    n_pairs = sum(len(p[schema.POS_CAPTIONS]) * len(p[schema.NEG_CAPTIONS]) for p in pairs)  # every image passes
    assert card["export"]["train_pairs"] + card["export"]["val_pairs"] == n_pairs
    assert card["export"]["train_pairs"] and card["export"]["val_pairs"]
    assert (out / "export" / "card.md").is_file() and (out / "curate.log").is_file()


@pytest.mark.slow
def test_demo_shards_train(demo_run):
    home, _ = demo_run
    out = home / "data" / "curate_demo" / "export"
    proc = _cli(["cultureclip.train", "+experiment=smoke", "data=cultwin", f"data.train_shards={out / 'train'}",
                 f"data.val_shards={out / 'val'}", "data.batch_size=2", "trainer.max_steps=2",
                 f"paths.output_dir={home / 'runs'}", "callbacks=none"], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((home / "runs" / "smoke-cultureclip-s0" / "metrics.json").read_text())
    assert metrics["global_step"] == 2


@pytest.mark.slow
def test_authors_caption_rows_import_render_judge_export_train(tmp_path):
    """The real-run path from the authors' files: the built-in rows in their caption-file and render-input
    layouts (no countries, contexts or features; the category under ``metadata``) go import -> render ->
    judge -> export as separate commands on the stand-ins, and the shards train."""
    rows = Path(resolvers.data_file("curate_demo_pairs.jsonl")).read_text().splitlines()
    ref = [r for r in rows if "pos_all_captions" in r or "pos_caption_id" in r]
    assert len(ref) == 3 and not any("pos_country" in r for r in ref)
    (tmp_path / "ref.jsonl").write_text("\n".join(ref) + "\n")
    base = ["cultureclip.curate", "+experiment=curate_demo", f"paths.root_dir={tmp_path}"]
    proc = _cli([*base, f"input={tmp_path / 'ref.jsonl'}", "stage=[render,judge]", "render.images_per_caption=1"],
                tmp_path)
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    proc = _cli([*base, "stage=export", "export.val_fraction=0.5", "export.pairs_per_twin=null", "export.plots=false",
                 "export.rule.min_score=1", "export.rule.min_mean=1.0", "export.rule.require_twin_check=false"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "data" / "curate_demo" / "export"
    card = json.loads((out / "card.json").read_text())
    assert card["groups"]["country"]["(none)"]["twin_pairs"] == 2 and card["judge"]["images_judged"] == 8
    assert card["export"]["train_pairs"] == card["export"]["val_pairs"] == 4  # 2 x 2 captions per twin pair
    meta = [json.loads(v["json"]) for v in {**read_shards(out / "train"), **read_shards(out / "val")}.values()]
    assert {m["category"] for m in meta} == {"Symbol", "Cuisine"} and not any("pos_country" in m for m in meta)
    proc = _cli(["cultureclip.train", "+experiment=smoke", "data=cultwin", f"data.train_shards={out / 'train'}",
                 f"data.val_shards={out / 'val'}", "data.batch_size=2", "trainer.max_steps=2",
                 f"paths.output_dir={tmp_path / 'runs'}", "callbacks=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
