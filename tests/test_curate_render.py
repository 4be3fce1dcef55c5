"""The render stage on the tiny random-weight SD3 pipeline (offline, CPU)."""
import copy
import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cultureclip import schema
from cultureclip.curate.stages import render
from cultureclip.curate.backends import t2i
from cultureclip.curate.registry import Context
from cultureclip.curate.runner import Store, digest, seed_from_key
from cultureclip.curate.runner.jobs import keyed

pytest.importorskip("diffusers")

CFG = {"model": "tiny-sd3", "dtype": "float32", "device": "cpu", "width": 32, "height": 32, "steps": 2,
       "batch_size": 3, "part_size": 4}


def pair(pos, neg, pos_caps, neg_caps, category="Cuisine", pos_country="Japan", neg_country="Korea"):
    return {schema.TWIN_ID: digest({"p": pos, "n": neg}), schema.CATEGORY: category,
            schema.POS_CONCEPT: pos, schema.POS_COUNTRY: pos_country, schema.POS_CONTEXT: None,
            schema.POS_FEATURES: [], schema.POS_CAPTIONS: pos_caps,
            schema.NEG_CONCEPT: neg, schema.NEG_COUNTRY: neg_country, schema.NEG_CONTEXT: None,
            schema.NEG_FEATURES: [], schema.NEG_CAPTIONS: neg_caps}


# "onigiri" is twinned with two concepts: its two captions must be rendered once each, not twice
PAIRS = [pair("onigiri", "gimbap", ["onigiri on a plate", "onigiri in a bento box"], ["gimbap slices on a board"]),
         pair("onigiri", "zongzi", ["onigiri on a plate", "onigiri in a bento box"], ["zongzi wrapped in leaves"],
              neg_country="China"),
         pair("kimono", "hanbok", ["a woman in a red kimono"], ["a girl in a hanbok", "hanbok at a festival"],
              category="Clothing")]
N_UNIQUE = 2 + 1 + 1 + 1 + 2


@pytest.fixture(scope="module")
def pipe():
    """The stage's own cached tiny pipeline: other test files rendering with tiny-sd3 on CPU reuse it.
    Tests must leave it as they found it (hooks removed; poisoning works on a copy)."""
    return render.get_pipeline(render.settings(CFG), "cpu")


class RenderStore(Store):
    """The render store, read as sorted lists (what these tests compare)."""

    def recs(self):
        return sorted(self.records(), key=lambda r: r[schema.REC_KEY])

    def errs(self):
        return {e[schema.REC_KEY]: e for e in self.errors()}


def run(tmp, pipeline, cfg=None, pairs=PAIRS, **ctx):
    report = render.run_pairs(pairs, {**CFG, **(cfg or {})}, Context(out_dir=tmp, **ctx), pipeline=pipeline)
    return report, RenderStore(Path(tmp) / "render", "render")


def planned(pairs, cfg, seed=0):
    """The job dicts the runner makes of the stage's jobs (keys computed, duplicates merged, sorted)."""
    return keyed("render", render.render_jobs(pairs, cfg, seed=seed))[0]


def images(tmp):
    root = Path(tmp) / "render"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*.png"))
            if not p.name.startswith(".tmp-")}  # a kill during a write may leave a temporary file


def test_tokenizer_matches_open_clip(pipe):
    from open_clip.tokenizer import SimpleTokenizer
    ref = SimpleTokenizer()
    for text in ["a bowl of pho with fresh herbs", "Hanbok, at Chuseok!", "onigiri"]:
        assert pipe.tokenizer(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]


def test_jobs_dedup_and_keys():
    jobs = planned(PAIRS, CFG)
    assert len(jobs) == N_UNIQUE
    caps = [(j[schema.CONCEPT], j[schema.CAPTION]) for j in jobs]
    assert len(set(caps)) == len(caps) and ("onigiri", "onigiri on a plate") in caps
    assert planned(PAIRS[::-1], CFG) == jobs  # input order does not matter
    keys = {j[schema.REC_KEY] for j in jobs}
    two = planned(PAIRS, {**CFG, "images_per_caption": 2})
    assert len(two) == 2 * N_UNIQUE and keys <= {j[schema.REC_KEY] for j in two}
    assert not keys & {j[schema.REC_KEY] for j in planned(PAIRS, CFG, seed=1)}
    for matters in ({"steps": 3}, {"width": 40}, {"dtype": "float16"}, {"model": "other"}, {"negative_prompt": "x"}):
        assert not keys & {j[schema.REC_KEY] for j in planned(PAIRS, {**CFG, **matters})}, matters
    for not_matters in ({"batch_size": 1}, {"device": "cuda"}, {"part_size": 99}, {"cpu_offload": True}):
        assert planned(PAIRS, {**CFG, **not_matters}) == jobs, not_matters
    tmpl = planned(PAIRS, {**CFG, "prompt_template": "{concept} ({country}): {caption}"})
    assert "onigiri (Japan): onigiri on a plate" in {j[schema.PROMPT] for j in tmpl}
    assert planned(PAIRS, {**CFG, "guidance": 0}) == jobs  # 0 and 0.0 are one setting
    with pytest.raises(ValueError, match="neg_captions"):
        list(render.render_jobs([{**PAIRS[0], schema.NEG_CAPTIONS: ["ok", ""]}], CFG))
    with pytest.raises(ValueError, match=r"unknown render settings \[.stepz.\]"):
        render.settings({"steps": 2, "stepz": 3})
    with pytest.raises(ValueError, match="multiples of 8"):
        render.settings({"width": 30})
    with pytest.raises(ValueError, match="prompt_template"):
        render.settings({"prompt_template": "{caption} {place}"})


def test_seeded_render_reproduces_bit_exactly(pipe, tmp_path):
    rep, store = run(tmp_path / "a", pipe)
    assert (rep.ok, rep.errors, rep.jobs_total) == (N_UNIQUE, 0, N_UNIQUE)
    recs = store.recs()
    assert all(r[schema.SEED] == seed_from_key(r[schema.REC_KEY]) for r in recs)
    imgs = images(tmp_path / "a")
    assert len(imgs) == N_UNIQUE and len(set(imgs.values())) == N_UNIQUE  # every image differs
    for r in recs:
        assert hashlib.sha256(imgs[r[schema.IMAGE_FILE]]).hexdigest() == r[schema.IMAGE_SHA256]
        assert r[schema.IMAGE_FILE] == f"images/{r[schema.REC_KEY][:2]}/{r[schema.REC_KEY]}.png"
    # a second run elsewhere: the same records and the same bytes
    _, store_b = run(tmp_path / "b", pipe)
    assert store_b.recs() == recs and images(tmp_path / "b") == imgs
    # independent reference: a plain diffusers call with the record's seed (batch padded like the stage)
    from PIL import Image
    r = recs[0]
    g = [torch.Generator("cpu").manual_seed(r[schema.SEED]) for _ in range(CFG["batch_size"])]
    with torch.inference_mode():
        ref = pipe([r[schema.PROMPT]] * CFG["batch_size"], generator=g, num_inference_steps=2,
                   guidance_scale=0.0, height=32, width=32, output_type="pil").images[0]
    got = Image.open(io.BytesIO(imgs[r[schema.IMAGE_FILE]]))
    assert got.size == (32, 32) and np.array_equal(np.asarray(got), np.asarray(ref))


def test_batch_mates_do_not_change_pixels(pipe):
    s = render.settings(CFG)
    a = t2i.render_batch(pipe, ["a lantern", "a temple roof", "a tea house"], [1, 2, 3], s, pad_to=3)
    b = t2i.render_batch(pipe, ["a dragon dance", "a lantern"], [4, 1], s, pad_to=3)
    assert np.array_equal(a[0], b[1]) and not np.array_equal(a[0], a[1])


def test_two_job_ranges_make_the_union(pipe, tmp_path):
    run(tmp_path / "one", pipe)
    r0, _ = run(tmp_path / "two", pipe, shard_index=0, num_shards=2)
    r1, store = run(tmp_path / "two", pipe, shard_index=1, num_shards=2)
    assert r0.jobs_in_range + r1.jobs_in_range == N_UNIQUE and min(r0.ok, r1.ok) > 0
    parts = {}
    for p in sorted((tmp_path / "two" / "render" / "parts").glob("part-*.jsonl")):
        parts[p.name] = [json.loads(x)[schema.REC_KEY] for x in p.read_text().splitlines()]
    all_keys = [k for ks in parts.values() for k in ks]
    assert len(all_keys) == len(set(all_keys)) == N_UNIQUE  # no overlap, no gap
    assert store.recs() == RenderStore(tmp_path / "one" / "render", "render").recs()
    assert images(tmp_path / "two") == images(tmp_path / "one")
    rerun, _ = run(tmp_path / "two", pipe, shard_index=1, num_shards=2)
    assert (rerun.done_before, rerun.processed) == (r1.jobs_in_range, 0)


def poisoned(pipe, word):
    """A copy of the pipeline whose first text encoder turns ``word`` into NaN: its prompts give NaN images."""
    bad = copy.deepcopy(pipe)
    (tok,) = bad.tokenizer(word, add_special_tokens=False).input_ids
    with torch.no_grad():
        bad.text_encoder.get_input_embeddings().weight[tok] = float("nan")
    return bad


def test_nan_images_are_rejected_not_kept_and_not_rendered_again(pipe, tmp_path):
    pairs = [pair("kimono", "hanbok", ["a cursed kimono", "a red kimono"], ["a hanbok"])]
    rep, store = run(tmp_path, poisoned(pipe, "cursed"), pairs=pairs)
    assert (rep.ok, rep.rejected, rep.rejected_by_reason, rep.errors) == (2, 1, {"nan_image": 1}, 0)
    (rej,) = store.rejections()
    bad_key = next(j[schema.REC_KEY] for j in planned(pairs, CFG) if "cursed" in j[schema.CAPTION])
    assert rej[schema.REC_KEY] == bad_key and "non-finite" in rej[schema.REC_MESSAGE]
    assert not render.image_path(tmp_path / "render", bad_key).exists() and len(images(tmp_path)) == 2
    assert render.card_section(tmp_path)["data"]["rejected_by_reason"] == {"nan_image": 1}
    store.require_complete("judge")  # a rejection is final: the view is complete
    # the same seed gives the same pixels: a rerun does not render it again
    rep2, store = run(tmp_path, pipe, pairs=pairs)
    assert (rep2.done_before, rep2.processed) == (3, 0)


def test_a_device_error_that_persists_stops_the_stage(pipe, tmp_path):
    calls = []

    def broken(module, args, kwargs):
        calls.append(1)
        if len(calls) > 2:  # the first batch (2 denoising steps) renders, then the device breaks
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    handle = pipe.transformer.register_forward_pre_hook(broken, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="device keeps failing"):
            run(tmp_path, pipe)
    finally:
        handle.remove()
    store = RenderStore(tmp_path / "render", "render")
    assert len(store.recs()) == 3 and not store.errs()  # the first batch is kept; no error records
    rep, _ = run(tmp_path, pipe)
    assert (rep.done_before, rep.ok) == (3, N_UNIQUE - 3)


def test_oom_batch_is_retried_image_by_image_at_the_batch_shape(pipe, tmp_path):
    """A transformer that runs out of memory (a real forward hook raising torch's OOM error) on its first
    call of each batch: the image-by-image retry runs at the padded batch shape, so its pixels equal an
    undisturbed run's, bit for bit; an OOM that persists is an error with 2 attempts."""
    seen = []

    def oom_first(module, args, kwargs):
        seen.append(kwargs["hidden_states"].shape[0])
        if mode == "always" or (mode == "first" and len(seen) == 1):
            raise torch.OutOfMemoryError(f"batch of {kwargs['hidden_states'].shape[0]} does not fit")
    mode = "first"
    handle = pipe.transformer.register_forward_pre_hook(oom_first, with_kwargs=True)
    try:
        rep, store = run(tmp_path / "a", pipe)
        assert (rep.ok, rep.errors) == (N_UNIQUE, 0) and set(seen) == {CFG["batch_size"]}
        mode = "always"
        rep, store = run(tmp_path / "b", pipe)
        assert (rep.ok, rep.errors_by_reason) == (0, {"oom": N_UNIQUE})
        assert {e[schema.REC_ATTEMPTS] for e in store.errs().values()} == {2} and not images(tmp_path / "b")
    finally:
        handle.remove()
    run(tmp_path / "c", pipe)
    assert images(tmp_path / "a") == images(tmp_path / "c")


@pytest.mark.slow
def test_kill_during_render_then_rerun(pipe, tmp_path):
    pairs = [pair(f"dish{i}", f"twin{i}", [f"dish{i} on a plate", f"dish{i} at dinner"], [f"twin{i} in a bowl"])
             for i in range(8)]
    cfg = {**CFG, "batch_size": 2, "part_size": 2}
    out = tmp_path / "killed"
    # a forked child (the pipeline is built and imported already) renders with a slower backend, so that
    # the kill lands mid-run: each denoising step sleeps
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            pipe.transformer.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
            run(out, pipe, cfg=cfg, pairs=pairs)
            code = 0
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 60
        while not list((out / "render" / "parts").glob("part-*.jsonl")):  # not a .tmp- file
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the render exited before writing a part"
            assert time.monotonic() < deadline, "no part after 60 s"
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    store = RenderStore(out / "render", "render")
    assert 0 < len(store.index().done) < 24
    rep, store = run(out, pipe, cfg=cfg, pairs=pairs)
    assert rep.done_before + rep.processed == 24 and rep.errors == 0
    _, ref = run(tmp_path / "ref", pipe, cfg=cfg, pairs=pairs)
    assert store.recs() == ref.recs() and images(out) == images(tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_at_once(pipe, tmp_path):
    """Job ranges 0/2 and 1/2 rendered by two forked processes at the same time into one folder."""
    pids = []
    for shard in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(tmp_path / "two", pipe, shard_index=shard, num_shards=2)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.WEXITSTATUS(os.waitpid(p, 0)[1]) for p in pids] == [0, 0]
    run(tmp_path / "one", pipe)
    store = RenderStore(tmp_path / "two" / "render", "render")
    keys = [json.loads(x)[schema.REC_KEY] for p in sorted((tmp_path / "two" / "render" / "parts").glob("part-*"))
            for x in p.read_text().splitlines()]
    assert sorted(keys) == [r[schema.REC_KEY] for r in store.recs()] and len(keys) == N_UNIQUE
    assert store.recs() == RenderStore(tmp_path / "one" / "render", "render").recs()
    assert images(tmp_path / "two") == images(tmp_path / "one")
    assert sorted(r["job"] for r in store.reports()) == ["00000of00002", "00001of00002"]


def test_shipped_configs_are_valid():
    from omegaconf import OmegaConf
    conf = Path(render.__file__).parents[2] / "conf" / "render"
    base = OmegaConf.load(conf / "sd35_turbo.yaml")
    assert render.settings(base) == {**render.DEFAULTS, "ray": None}  # the yaml spells out every default
    tiny = OmegaConf.merge(base, {k: v for k, v in OmegaConf.load(conf / "tiny.yaml").items() if k != "defaults"})
    s = render.settings(tiny)
    assert t2i.is_tiny(s["model"]) and s["dtype"] == "float32"
    assert (base.steps, base.guidance, base.width, base.dtype) == (4, 0.0, 512, "float16")  # the authors' settings


@pytest.mark.slow
def test_load_pipeline_from_a_saved_folder(pipe, tmp_path):
    """The real loader (AutoPipelineForText2Image.from_pretrained) on the stand-in saved to disk, offline:
    the stage renders the same bytes through it as through the in-memory pipeline."""
    pipe.save_pretrained(tmp_path / "model")
    loaded = t2i.load_pipeline(str(tmp_path / "model"), dtype="float32", device="cpu", local_files_only=True,
                               text_encoder_3=None, tokenizer_3=None)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.dtype == torch.float32
    run(tmp_path / "a", pipe)
    run(tmp_path / "b", loaded)
    assert images(tmp_path / "a") == images(tmp_path / "b")
