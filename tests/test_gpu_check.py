"""``benchmarks/gpu_check.py``: the dry run end to end on the CPU (tiny sizes, every section, the real code
paths: Lightning and open_clip training steps on streamed shards, a diffusers SD3 pipeline through our render
stage, the embedding loops), its self-checks, and how failing, late and killed work is reported.
No timing is asserted."""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # scripts, not a package
import gpu_check  # noqa: E402
import gpu_train  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--dry-run", "--in-process", "--out", str(out)]) == 0
    return out, json.loads((out / gpu_check.JSON_NAME).read_text())


def _rows(state, section):
    return state["sections"][section]["rows"]


def test_dry_run_trains_both_sides_on_the_same_images(dry_run):
    _, state = dry_run
    assert state["dry_run"] and set(state["sections"]) == set(gpu_check.SECTIONS)
    assert all(s["status"] == "done" for s in state["sections"].values()), state["sections"]
    env = state["environment"]
    assert env["torch"] and env["open_clip_torch"] and env["diffusers"] and env["device"] == "cpu"
    rows = _rows(state, "train")
    ours = next(r for r in rows if r.get("side") == "ours" and r["status"] == "ok")
    theirs = next(r for r in rows if r.get("side") == "open_clip" and r["config"] == ours["config"])
    [comp] = [r for r in rows if r.get("kind") == "comparison" and r["config"] == ours["config"]]
    steps, warmup, batch = ours["steps"], ours["warmup"], ours["batch_pairs"]
    # the paper's LoRA recipe on both sides: r=4 adapters on q and v of every block of both towers,
    # A [r, width] + B [width, r] each: 2 targets * 2 * r * width parameters per block
    cfg = open_clip.get_model_config(ours["model"])
    adapters = sum(2 * 2 * 4 * c["width"] * c["layers"] for c in (cfg["vision_cfg"], cfg["text_cfg"]))
    for r in (ours, theirs):
        assert r["status"] == "ok" and r["method"] == "lora", r
        assert (r["steps"], r["images"], r["images_total"]) == (steps, steps * 2 * batch, (steps + warmup) * 2 * batch)
        assert len(r["loss_per_step"]) == len(r["mem_mib_per_step"]) == steps + warmup
        assert all(math.isfinite(x) for x in r["loss_per_step"]) and r["checks"]["finite"]["ok"]
        assert r["trainable_params"] == adapters
        assert r["optimizer"] == "foreach" and r["mfu"] is None  # CPU: no fused kernel, no peak to divide by
        assert r["step_flops"] > 0 and r["tflops"] > 0
    assert comp["ratio_images_per_s"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    assert comp["flop_limit"] == pytest.approx(theirs["step_flops"] / ours["step_flops"])
    supported, why = gpu_train.sigmoid_loss_support()
    for r in rows:
        assert r["status"] in ("ok", "skipped") and (r["status"] == "ok" or r["reason"]), r
        if r["config"].startswith("SigLIP2") and r["method"] == "lora" and not supported:
            assert r["reason"] == why and "family" in why
    if supported:  # the sigmoid twin loss is there: the SigLIP-shaped row trains on both sides
        sig = [r for r in rows if r["config"].startswith("SigLIP2") and r["method"] == "lora" and r.get("side")]
        assert {r["side"] for r in sig if r["status"] == "ok"} == {"ours", "open_clip"}, sig
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in _rows(state, "compile"))


def test_dry_run_renders_through_the_stage_and_embeds(dry_run):
    out, state = dry_run
    build, batch = _rows(state, "render")
    assert build["status"] == "ok" and build["weights"] == "random" and build["parameters"]["transformer"] > 0
    assert batch["status"] == "ok" and batch["images"] == 4, batch
    assert batch["checks"]["stage_wrote_all"]["ok"] and batch["checks"]["finite"]["ok"]
    assert batch["bare_images_per_s"] > 0 and batch["stage_images_per_s"] > 0
    embed, search = _rows(state, "eval")
    assert embed["status"] == "ok" and embed["ours_images_processed"] == embed["theirs_images_processed"] == 8
    assert embed["checks"]["same_outputs"]["ok"]
    assert search["status"] == "skipped" and search["reason"] == "no CUDA device"
    md = (out / gpu_check.MD_NAME).read_text()
    assert "DRY RUN" in md and "**ours / open_clip**" in md and "render b2" in md and "## Targets" in md
    assert "MFU >= 45%, ViT-B/32 LoRA bf16, ours: not measured" in md  # tiny model, CPU: no verdict


def test_self_checks_catch_nan_rising_loss_and_growing_memory():
    assert gpu_check.check_finite([2.0, 1.0])["ok"]
    nan = gpu_check.check_finite([2.0, float("nan"), 1.0])
    assert not nan["ok"] and "step 1" in nan["detail"]
    assert not gpu_check.check_finite([])["ok"]
    # warm-up steps are left out: a huge first loss does not make a flat run "fall"
    assert not gpu_check.check_loss_falls([99.0, 3.0, 3.0, 3.1, 3.0, 3.2, 3.1], warmup=1)["ok"]
    assert gpu_check.check_loss_falls([1.0, 3.0, 2.9, 2.5, 2.4, 2.0, 1.9], warmup=1)["ok"]
    assert not gpu_check.check_loss_falls([3.0, 2.0], warmup=0)["ok"]  # too few steps to say
    assert gpu_check.check_memory_flat([100, 5000, 5000, 5010, 5020], warmup=1, cuda=True)["ok"]  # 20 <= 50
    assert not gpu_check.check_memory_flat([100, 5000, 5030, 5060, 5090], warmup=1, cuda=True)["ok"]  # 90 > 50
    assert gpu_check.check_memory_flat([100, 1000, 1050], warmup=1, cuda=False)["ok"]  # RSS: 64 MiB allowed


def test_a_failing_row_is_reported_and_the_rest_still_run(tmp_path):
    args = argparse.Namespace(dry_run=True)
    sec = gpu_check.Section("eval", tmp_path, time.time() + 60, args)
    bad = sec.attempt("bad", lambda: {"x": 1 / 0}, need_s=0)
    good = sec.attempt("good", lambda: {"x": 2}, need_s=0)
    assert bad["status"] == "failed" and bad["error"].startswith("ZeroDivisionError") and "x" not in bad
    assert good["status"] == "ok" and good["x"] == 2
    late = gpu_check.Section("render", tmp_path, time.time() - 1, args)
    skipped = late.attempt("late", lambda: pytest.fail("a row past the budget must not start"), need_s=1)
    assert skipped["status"] == "skipped" and "budget" in skipped["reason"]
    state = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())  # written as each row finished
    assert [r["name"] for r in state["sections"]["eval"]["rows"]] == ["bad", "good"]
    assert state["sections"]["render"]["rows"][0]["status"] == "skipped"
    assert "failed: ZeroDivisionError" in (tmp_path / gpu_check.MD_NAME).read_text()


@pytest.mark.slow
def test_cli_stops_a_section_at_its_budget_and_runs_the_next(tmp_path):
    """Through the command line, each section in its own process: a train section with a budget far below what
    it needs measures nothing (killed, or its rows skipped), and the render section after it still measures."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--sections", "train", "render", "--budget", "train", "0.5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / gpu_check.JSON_NAME).read_text())
    train, render = state["sections"]["train"], state["sections"]["render"]
    assert train["status"] == "killed" or all(r["status"] == "skipped" and "budget" in r["reason"]
                                               for r in train["rows"] if r.get("kind") != "comparison"), train
    assert not any(r["status"] == "ok" for r in train["rows"])
    assert render["status"] == "done" and all(r["status"] == "ok" for r in render["rows"]), render
    assert "## train: " in (out / gpu_check.MD_NAME).read_text()


def test_a_rerun_into_the_same_folder_keeps_the_earlier_figures(dry_run, tmp_path):
    """A second run starts its own report; the first one's files are renamed after its start time, not lost."""
    first_out, first = dry_run
    out = tmp_path / "out"
    out.mkdir()
    for name in (gpu_check.JSON_NAME, gpu_check.MD_NAME):
        (out / name).write_bytes((first_out / name).read_bytes())
    # the second run measures only the evaluation section, with another budget
    assert gpu_check.main(["--dry-run", "--in-process", "--out", str(out), "--sections", "eval",
                           "--budget", "eval", "30"]) == 0
    second = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert set(second["sections"]) == {"eval"} and second["sections"]["eval"]["budget_s"] == 30
    stamp = "".join(c for c in first["started"] if c.isdigit())
    kept = json.loads((out / f"gpu_check-{stamp}.json").read_text())
    assert kept == first and (out / f"gpu_check-{stamp}.md").read_text() == (first_out / gpu_check.MD_NAME).read_text()
