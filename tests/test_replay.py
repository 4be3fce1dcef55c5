"""General-data replay: the open_clip-layout stream (decode, skips, tokens), its mixing into training
batches with exact resume, the replay CLIP loss against open_clip's ClipLoss, the distillation term,
the frozen teacher kept out of optimizer and checkpoint, the config checks and the toy general set."""
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from open_clip import ClipLoss
from PIL import Image
from safetensors.torch import load_file

import cultureclip
from cultureclip import resolvers, schema
from cultureclip.data.datamodule import TwinDataModule
from cultureclip.data.replay import (BAD_TEXT, ReplayMixer, build_replay_pipeline, is_replay_skip_report,
                                     replay_batch_size)
from cultureclip.data.stages import BAD_IMAGE, MISSING_MEMBER, SkipCounter
from cultureclip.data.toy_general import CLASSNAMES_FILE, COLOURS, SHAPES, ensure_general_set
from cultureclip.eval import tasks
from cultureclip.lit_module import CultureCLIPModule
from cultureclip.loss import CultureCLIPLoss
from cultureclip.train import train

CONF = Path(cultureclip.__file__).parent / "conf"


@pytest.fixture(scope="session")
def general(tmp_path_factory):
    """A small toy general set (20 train samples and 3 eval images per shape): read only."""
    return ensure_general_set(tmp_path_factory.mktemp("general") / "toy_general", train_per_class=20,
                              eval_per_class=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")


def _jpg(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_open_clip_shard(path):
    """Three good samples (png images), and one each of: no txt, non-UTF-8 txt, blank txt, broken image."""
    good = [("a", (255, 0, 0), "a red square"), ("b", (0, 255, 0), "a green square"), ("c", (0, 0, 255), "blue")]
    with wds.TarWriter(str(path)) as w:
        for key, color, text in good[:2]:
            w.write({"__key__": key, "png": _jpg(color), "txt": text.encode()})
        w.write({"__key__": "notxt", "png": _jpg((1, 2, 3))})
        w.write({"__key__": "latin1", "png": _jpg((1, 2, 3)), "txt": "caf\xe9".encode("latin-1")})
        w.write({"__key__": "blank", "png": _jpg((1, 2, 3)), "txt": b"  \n"})
        w.write({"__key__": "broken", "jpg": b"\xff\xd8not a jpeg", "txt": b"broken"})
        key, color, text = good[2]
        w.write({"__key__": key, "png": _jpg(color), "txt": text.encode()})
    return good


def test_replay_stream_decodes_tokenizes_and_counts_skips(tmp_path, tiny):
    good = write_open_clip_shard(tmp_path / "shard-000000.tar")
    counter = SkipCounter()
    pipeline = build_replay_pipeline(str(tmp_path / "shard-000000.tar"), tiny.preprocess_val, tiny.tokenizer, 3,
                                     seed=0, shuffle_buffer=0, skip_counter=counter)
    batch = next(iter(pipeline))  # one pass of the resampled shard holds the 3 good samples
    # the skip count stage holds one batch back, so the first batch reports the passes read so far
    passes = batch[schema.N_SKIPPED] // 4
    assert not is_replay_skip_report(batch) and passes >= 1 and batch[schema.N_SKIPPED] == 4 * passes
    assert counter.by_reason == {MISSING_MEMBER: passes, BAD_TEXT: 2 * passes, BAD_IMAGE: passes}
    by_key = dict(zip(batch[schema.KEY], range(3)))
    assert set(by_key) == {"a", "b", "c"}
    for key, color, text in good:
        i = by_key[key]
        ref = tiny.preprocess_val(Image.new("RGB", (40, 30), color))  # the PIL reference path
        torch.testing.assert_close(batch[schema.REPLAY_IMAGE][i], ref, atol=0, rtol=0)
        assert batch[schema.REPLAY_TEXT + schema.TEXT_SUFFIX][i] == text
        assert torch.equal(batch[schema.REPLAY_TEXT][i], tiny.tokenizer([text])[0])


def test_replay_batch_size_definitions():
    assert replay_batch_size(None, 0.5, 64) == 32  # ratio: replay samples per twin pair
    assert replay_batch_size(12, None, 64) == 12
    with pytest.raises(ValueError, match="exactly one of batch_size and ratio"):
        replay_batch_size(12, 0.5, 64)
    with pytest.raises(ValueError, match="exactly one"):
        replay_batch_size(None, None, 64)
    with pytest.raises(ValueError, match="ratio=0.01 x 8 pairs rounds to 0"):
        replay_batch_size(None, 0.01, 8)


def test_mixer_pairs_batches_passes_skip_reports_and_resumes(tmp_path):
    twin = [{schema.POS_IMAGE: torch.tensor([i])} for i in range(5)]
    twin.insert(2, {schema.N_SKIPPED: 3})  # a twin skip report takes no replay batch
    replay = [{schema.REPLAY_IMAGE: torch.tensor([10 + i]), schema.REPLAY_TEXT: torch.tensor([20 + i]),
               schema.N_SKIPPED: i} for i in range(8)]
    replay.insert(1, {schema.N_SKIPPED: 5})  # a replay skip report: counted into the next merged batch
    full = list(ReplayMixer(twin, replay))
    assert len(full) == 6 and full[2] == {schema.N_SKIPPED: 3}
    pairs = [(int(b[schema.POS_IMAGE]), int(b[schema.REPLAY_IMAGE]), b[schema.REPLAY_N_SKIPPED])
             for b in full if schema.POS_IMAGE in b]
    assert pairs == [(0, 10, 0), (1, 11, 6), (2, 12, 2), (3, 13, 3), (4, 14, 4)]
    resumed = list(ReplayMixer(twin, replay, skip=3))
    assert [(int(b[schema.POS_IMAGE]), int(b[schema.REPLAY_IMAGE])) for b in resumed] == [(2, 12), (3, 13), (4, 14)]
    with pytest.raises(RuntimeError, match="replay stream ended"):
        list(ReplayMixer(twin, replay[:3]))


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_resumed_epoch_sees_the_same_twin_and_replay_batches(toy_shards, general, tiny, workers):
    def batches(resume, epoch=1):
        dm = TwinDataModule(tiny.data_spec(), f"{toy_shards}/train", batch_size=8, num_workers=workers,
                            train_pairs_per_epoch=48, shuffle_buffer=50,
                            replay={"shards": f"{general}/train", "ratio": 0.5, "shuffle_buffer": 20})
        dm.trainer = SimpleNamespace(current_epoch=epoch, world_size=1)
        dm.load_state_dict(resume)
        return list(dm.train_dataloader())

    full = batches({})
    resumed = batches({"epoch": 1, "batches_in_epoch": 4})
    assert len(full) == 6 and len(resumed) == 2
    assert full[0][schema.REPLAY_IMAGE].shape[0] == 4  # ratio 0.5 x 8 pairs
    for got, ref in zip(resumed, full[4:]):
        for k in (schema.POS_IMAGE, schema.NEG_IMAGE, schema.POS_CAPTION, schema.REPLAY_IMAGE, schema.REPLAY_TEXT):
            assert torch.equal(got[k], ref[k]), k
    # another epoch is another replay draw
    assert not torch.equal(full[0][schema.REPLAY_IMAGE], batches({}, epoch=0)[0][schema.REPLAY_IMAGE])


def _features(b, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {k: F.normalize(torch.randn(b, 16, generator=g), dim=-1) for k in schema.FEATURE_KEYS}
    for k in (schema.REPLAY_IMAGE, schema.REPLAY_TEXT, schema.REPLAY_TEACHER_IMAGE):
        feats[k] = F.normalize(torch.randn(r, 16, generator=g), dim=-1)
    return feats


def test_replay_terms_match_open_clip_and_the_distillation_formula():
    feats, scale = _features(6, 10), torch.tensor(14.3)
    twin = CultureCLIPLoss("cultureclip")(feats, scale)
    out = CultureCLIPLoss("cultureclip", lambda_replay=0.5, lambda_distill=2.0)(feats, scale)
    ref_replay = ClipLoss()(feats[schema.REPLAY_IMAGE], feats[schema.REPLAY_TEXT], scale)
    torch.testing.assert_close(out["loss_replay"], ref_replay)
    cos = (feats[schema.REPLAY_IMAGE] * feats[schema.REPLAY_TEACHER_IMAGE]).sum(1)
    torch.testing.assert_close(out["loss_distill"], (2 * (1 - cos)).mean())  # L2 of unit vectors
    torch.testing.assert_close(out["loss"], twin["loss"] + 0.5 * ref_replay + 2.0 * out["loss_distill"])
    for k in twin:
        torch.testing.assert_close(out[k] if k != "loss" else twin[k], twin[k])
    # the terms a trainer must encode, and a validation copy without them
    loss = CultureCLIPLoss("clip", lambda_distill=1.0)
    assert loss.required_keys == (schema.POS_IMAGE, schema.POS_CAPTION, schema.REPLAY_IMAGE,
                                  schema.REPLAY_TEACHER_IMAGE)
    assert loss.twin_only().required_keys == (schema.POS_IMAGE, schema.POS_CAPTION) and loss.uses_replay
    with pytest.raises(ValueError, match="lambda_replay must be >= 0"):
        CultureCLIPLoss("clip", lambda_replay=-1)
    with pytest.raises(ValueError, match="replay features must share one"):
        bad = dict(feats, **{schema.REPLAY_TEXT: feats[schema.REPLAY_TEXT][:3]})
        CultureCLIPLoss("clip", lambda_replay=1.0)(bad, scale)


def _batch(tok, b, r, seed):
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(b, 3, 64, 64, generator=g) for k in schema.IMAGE_KEYS}
    for k in schema.TEXT_KEYS:
        batch[k] = tok([f"a {k} number {seed} {i}" for i in range(b)])
    batch[schema.REPLAY_IMAGE] = torch.randn(r, 3, 64, 64, generator=g)
    batch[schema.REPLAY_TEXT] = tok([f"a red star {seed} {i}" for i in range(r)])
    return batch


def test_teacher_is_frozen_outside_checkpoint_and_accumulation_is_exact():
    torch.manual_seed(0)
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny").eval()
    plain = CultureCLIPModule(enc, CultureCLIPLoss("cultureclip"), optimizer=None)
    module = CultureCLIPModule(enc, CultureCLIPLoss("cultureclip", lambda_replay=0.5, lambda_distill=1.0),
                               optimizer=None)
    assert module.state_dict().keys() == plain.state_dict().keys()  # no teacher weights in a checkpoint
    assert all(not p.requires_grad for p in module._teacher.visual.parameters())
    teacher_before = {k: v.clone() for k, v in module._teacher.visual.state_dict().items()}
    micro = [_batch(enc.tokenizer, 4, 3, 1), _batch(enc.tokenizer, 4, 3, 2)]
    full = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    out_full = module.backward_over([full], backward=torch.Tensor.backward)
    assert set(out_full) >= {"loss_replay", "loss_distill"} and float(out_full["loss_distill"].detach()) == 0.0
    ref = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    out_acc = module.backward_over(micro, backward=torch.Tensor.backward)  # one negative pool over both
    torch.testing.assert_close(out_acc["loss"], out_full["loss"])
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    # a changed student pulls towards the unchanged teacher
    with torch.no_grad():
        enc.model.visual.proj.add_(0.1 * torch.randn(enc.model.visual.proj.shape))
    out = module.backward_over([full], backward=lambda loss: None)
    assert float(out["loss_distill"].detach()) > 1e-3
    for k, v in module._teacher.visual.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    with pytest.raises(ValueError, match="set data.replay.shards"):
        module.training_step({k: v for k, v in full.items() if k not in schema.REPLAY_KEYS}, 0)


def make_cfg(overrides, run_dir, data_dir):
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=smoke", *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir, cfg.paths.data_dir = str(run_dir), str(data_dir)
        cfg.callbacks.pop("progress_bar", None)
    return cfg


def test_config_checks_pair_replay_data_and_weights(tmp_path, toy_shards, general):
    data = toy_shards.parent
    with pytest.raises(ValueError, match="data.replay.shards is set but loss.lambda_replay=0.0"):
        train(make_cfg([f"data.replay.shards={general}/train"], tmp_path / "a", data))
    with pytest.raises(ValueError, match="data.replay.shards is null but loss.lambda_replay=0.5"):
        train(make_cfg(["loss.lambda_replay=0.5"], tmp_path / "b", data))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        train(make_cfg(["data.replay.shards=/nonexistent/*.tar", "loss.lambda_replay=0.5"], tmp_path / "c", data))
    assert not (tmp_path / "a").exists()  # refused before the run directory was claimed


REPLAY_RUN = ["trainer.max_steps=6", "+data.train_pairs_per_epoch=24", "trainer.max_epochs=100",
              "callbacks.step_checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=1",
              "heldout=after_only", "loss.lambda_replay=0.5", "loss.lambda_distill=1.0", "data.replay.ratio=0.5"]


@pytest.mark.slow  # two short trainings in-process (~30 s)
def test_resume_with_replay_is_exact(tmp_path, toy_shards, general):
    common = [*REPLAY_RUN, f"data.replay.shards={general}/train"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(make_cfg(common, full, toy_shards.parent))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step0000004.ckpt", resumed / "checkpoints" / "last.ckpt")
    shutil.copytree(full / "csv", resumed / "csv")
    train(make_cfg([*common, "ckpt_path=last"], resumed, toy_shards.parent))
    got = load_file(resumed / "model" / "open_clip_model.safetensors")
    ref = load_file(full / "model" / "open_clip_model.safetensors")
    for k in ref:  # same twin and replay batches, same teacher: bitwise on the CPU
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)
    import csv
    rows = [r for r in csv.DictReader(open(resumed / "csv" / "metrics.csv")) if r.get("train/loss")]
    ref_rows = [r for r in csv.DictReader(open(full / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert [r["train/loss_replay"] for r in rows] == [r["train/loss_replay"] for r in ref_rows] != []
    assert [r["train/loss_distill"] for r in rows] == [r["train/loss_distill"] for r in ref_rows]


def test_toy_general_set_is_open_clip_layout_with_a_zero_shot_split(general, tiny):
    # read back the way open_clip_train reads its shards: decode("pilrgb"), to_tuple("jpg;png", "txt")
    urls = sorted(str(p) for p in (general / "train").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png;jpeg;webp", "txt"))
    assert len(samples) == sum(json.loads((general / "train" / schema.SIZES_FILE).read_text()).values()) == 240
    shapes = list(SHAPES)
    assert all(any(s in text for s in shapes) and img.size == (64, 64) for img, text in samples)
    assert (general / CLASSNAMES_FILE).read_text().split("\n")[:-1] == list(COLOURS)
    assert {p.name for p in (general / "eval").iterdir()} <= set(COLOURS)
    metrics, header, _ = tasks.toy_general(tiny, str(general), amp=False)
    assert header["n"] == 36 and 0.0 <= metrics["acc1"] <= 1.0
    # the eval images are a held-out random stream: none equals a training image
    train_pixels = {np.asarray(img).tobytes() for img, _ in samples}
    assert not any(np.asarray(Image.open(p).convert("RGB")).tobytes() in train_pixels
                   for p in (general / "eval").rglob("*.png"))
