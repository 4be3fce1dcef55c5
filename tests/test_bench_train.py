"""The training benchmark (``benchmarks/train_harness.py``): the plain open_clip copy holds the same
images and captions, and both sides and the pipeline run end to end and count the images they were
given (no timing assertions)."""
import collections
import json
import sys
from pathlib import Path

import pytest
import webdataset as wds

from cultureclip import schema
from cultureclip.data.shards import read_sizes
from cultureclip.data.toy import ensure_toy_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # scripts, not a package
import train_harness as bench  # noqa: E402


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    """One variant per concept (48 training pairs): the copy is the point here, not the set's size."""
    return ensure_toy_shards(tmp_path_factory.mktemp("toy") / "toy", train_variants=1, val_variants=1)


def _members(urls, keys):
    samples = wds.DataPipeline(wds.SimpleShardList([str(u) for u in urls]), wds.tarfile_to_samples())
    return collections.Counter(s[k] for s in samples for k in keys if k in s)


def test_plain_shards_hold_the_same_images_and_captions(tmp_path, small_toy):
    toy = small_toy
    twin_dir, plain_dir = bench.prepare_shards(str(toy / "train"), tmp_path / "cache")
    assert bench.prepare_shards(str(toy / "train"), tmp_path / "cache") == (twin_dir, plain_dir)  # reused
    twin_urls, plain_urls = sorted((toy / "train").glob("*.tar")), sorted(bench.Path(plain_dir).glob("*.tar"))
    pairs = sum(read_sizes(twin_dir).values())
    assert sum(read_sizes(plain_dir).values()) == 2 * pairs == sum(1 for _ in _members(plain_urls, ["__key__"]))
    images = _members(twin_urls, schema.POS_IMAGE_MEMBERS + schema.NEG_IMAGE_MEMBERS)
    assert _members(plain_urls, ["jpg"]) == images  # every image once per twin side, bytes untouched
    metas = [json.loads(m) for m in _members(twin_urls, [schema.META]).elements()]
    captions = collections.Counter(m[k].encode() for m in metas for k in schema.CAPTION_KEYS)
    assert _members(plain_urls, ["txt"]) == captions


@pytest.mark.slow
def test_both_sides_and_the_pipeline_count_their_images(tmp_path, small_toy):
    toy = small_toy
    twin_dir, plain_dir = bench.prepare_shards(str(toy / "train"), tmp_path / "cache")
    cfg = bench.BenchConfig(twin_dir=twin_dir, plain_dir=plain_dir, model="cultureclip-tiny", batch_size=4,
                            steps=2, warmup=1, workers=0, pipeline_workers=(0,), pipeline_batches=3)
    res = bench.run_benchmark(cfg, repeats=1, runner=bench.run_side)  # in-process: no subprocess start-up
    json.dumps(res)  # JSON-ready
    assert res["device"] == "cpu" and res["model"] == "cultureclip-tiny" and res["open_clip_batch_size"] == 8
    images = cfg.steps * 2 * cfg.batch_size  # B pairs = 2B images per step, on both sides
    for side in ("ours", "open_clip"):
        r = res[side]
        assert (r["steps"], r["images"]) == (cfg.steps, images), side
        assert r["images_total"] == (cfg.warmup + cfg.steps) * 2 * cfg.batch_size, side
        assert r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 and len(r["runs"]) == 1
    assert res["ours"]["texts_per_pair"] == 4 and res["open_clip"]["texts_per_pair"] == 2
    [row] = res["pipeline"]
    assert (row["workers"], row["pairs"]) == (0, cfg.pipeline_batches * cfg.batch_size)
    assert isinstance(res["pipeline_is_bottleneck"], bool)
