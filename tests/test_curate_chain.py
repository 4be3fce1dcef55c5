"""The whole curation chain in one command: from a concept seed list to exported twin-pair shards,
which then train (the demo's stand-in backends: stand-in chat server, tiny random-weight pipeline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("diffusers")

from cultureclip.curate.runner import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = [
    {"concept": "Kimono", "native_name": "着物", "country": "Japan", "category": "Clothing",
     "context": "a T-shaped robe worn at ceremonies", "features": ["wide obi sash", "long rectangular sleeves"]},
    {"concept": "Hanbok", "native_name": "한복", "country": "South Korea", "category": "Clothing",
     "context": "the traditional Korean dress", "features": ["high-waisted skirt", "short jacket", "long ribbon tie"]},
    {"concept": "Ramen", "native_name": "ラーメン", "country": "Japan", "category": "Cuisine",
     "context": "noodle soup", "features": ["wheat noodles", "rich pork broth"]},
    {"concept": "Phở", "native_name": "phở", "country": "Vietnam", "category": "Cuisine",
     "context": "rice noodle soup from Hanoi", "features": ["rice noodles", "clear beef broth", "fresh herbs"]},
]


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


SMALL = ["captions.n=2", "render.images_per_caption=1", "export.pairs_per_twin=null", "export.val_fraction=0.5",
         "export.plots=false", "twins.keep=1", "twins.mined_candidates=1", "twins.llm_candidates=1"]


@pytest.mark.slow
def test_seed_list_to_shards_in_one_command_then_train(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SEED))
    proc = _cli(["cultureclip.curate", "+experiment=curate_demo", "concepts=seed", f"concepts.seed.file={seed}",
                 f"paths.root_dir={tmp_path}", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "data" / "curate_demo"
    for stage in ("concepts", "dedup", "twins", "captions", "render", "judge", "export"):
        assert f"{stage} [00000of00001]" in proc.stdout
    pairs = list(Store(out / "captions", "captions").records())
    assert {frozenset((p["pos_concept"], p["neg_concept"])) for p in pairs} == {
        frozenset(("Kimono", "Hanbok")), frozenset(("Ramen", "Phở"))}
    card = json.loads((out / "export" / "card.json").read_text())
    assert card["export"]["train_pairs"] + card["export"]["val_pairs"] >= 1, card["export"]
    # the stand-in judge passes ~40% of the noise images and the split is by a hash of each twin id: with
    # two twin pairs one split may be empty, so train and validate on whichever has pairs
    train_dir = out / "export" / ("train" if card["export"]["train_pairs"] else "val")
    val = out / "export" / ("val" if card["export"]["val_pairs"] else "train")
    train = _cli(["cultureclip.train", "+experiment=smoke", "data=cultwin", f"data.train_shards={train_dir}",
                  f"data.val_shards={val}", "data.batch_size=1", "trainer.max_steps=1", "trainer.val_check_interval=1",
                  f"paths.output_dir={tmp_path / 'runs'}", "callbacks=none"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "smoke-cultureclip-s0" / "metrics.json").read_text())
    assert metrics["global_step"] == 1
