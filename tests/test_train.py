"""The training app: every config composes and instantiates, a smoke run trains and exports a model
plain open_clip loads, resume continues, accumulation keeps the full negative pool, DDP on 2 CPUs."""
import json
import math
import os
import warnings
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import open_dict

import cultureclip
from cultureclip import resolvers, schema
from cultureclip.errors import ConfigError
from cultureclip.eval import tasks
from cultureclip.lit_module import CultureCLIPModule
from cultureclip.loss import VARIANTS, CultureCLIPLoss
from cultureclip.optim import schedule_length
from cultureclip.train import train

CONF = Path(cultureclip.__file__).parent / "conf"
# the curate_* experiments are of `python -m cultureclip.curate` (conf/curate.yaml): tests/test_curate_app.py
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("curate"))


@pytest.fixture(scope="session")
def toy_root(toy_shards):
    """The data dir holding the session's toy set (``toy/train``, ``toy/val``): read only."""
    return toy_shards.parent


@pytest.fixture(scope="session")
def tiny_spec():
    return cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny").data_spec()


def make_cfg(overrides, run_dir, data_dir):
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        cfg.paths.data_dir = str(data_dir)
        cfg.callbacks.pop("progress_bar", None)
    return cfg


@pytest.mark.parametrize("experiment", [None] + EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path, toy_root, tiny_spec):
    overrides = [] if experiment is None else [f"+experiment={experiment}"]
    if experiment and experiment.startswith("cultwin"):
        overrides += [f"data.train_shards={toy_root}/toy/train", f"data.val_shards={toy_root}/toy/val",
                      "model.pretrained=null"]  # no download in tests
    cfg = make_cfg(overrides, tmp_path / "run", toy_root)
    assert "experiment" not in cfg  # the overlay merged into the root, nothing left behind
    instantiate(cfg.data, spec=tiny_spec)
    instantiate(cfg.loss)
    instantiate(cfg.optim.optimizer)(params=[torch.nn.Parameter(torch.zeros(2, 2))])
    # GPU trainer configs are instantiated on the CPU here (no GPU in CI); the rest is as configured
    instantiate(cfg.trainer, logger=False,
                **({} if torch.cuda.is_available() else {"accelerator": "cpu", "devices": 1, "strategy": "auto"}))
    if experiment and experiment.startswith("cultwin"):
        assert cfg.model.name == {"cultwin_siglip2": "ViT-B-16-SigLIP2"}.get(experiment, "ViT-B-32-quickgelu")
    else:
        instantiate(cfg.model)


def test_cultwin_recipe_values(tmp_path, toy_root):
    cfg = make_cfg(["+experiment=cultwin"], tmp_path, toy_root)
    assert cfg.model.lora == {"r": 4, "alpha": 16, "dropout": 0.1, "targets": "qv", "towers": ["image", "text"],
                              "layers": "all"}
    assert cfg.optim.optimizer.lr == 3e-6 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.scheduler.warmup_steps == 100 and cfg.optim.scheduler.decay == "linear"
    assert cfg.trainer.max_epochs == 10 and cfg.data.batch_size * cfg.optim.accum_freq == 2048
    assert cfg.trainer.accumulate_grad_batches == 1
    assert (cfg.loss.variant, cfg.loss.lambda_caption, cfg.loss.lambda_concept) == ("cultureclip", 0.7, 0.3)


def test_cultwin_siglip2_recipe(tmp_path, toy_root):
    cfg = make_cfg(["+experiment=cultwin_siglip2"], tmp_path, toy_root)
    base = make_cfg(["+experiment=cultwin"], tmp_path, toy_root)
    assert (cfg.model.name, cfg.model.pretrained, cfg.loss.family) == ("ViT-B-16-SigLIP2", "webli", "sigmoid")
    assert cfg.model.lora.towers == ["image", "text"] and cfg.model.lora.targets == "qv"
    assert instantiate(cfg.loss).family == "sigmoid"
    assert cfg.optim == base.optim and cfg.data.batch_size == base.data.batch_size  # the recipe is cultwin's


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_loss_config_carries_only_the_weights_it_uses(variant, tmp_path, toy_root):
    # the ablation grid is `-m loss=clip,...,cultureclip`, also on top of the recipe
    cfg = make_cfg(["+experiment=cultwin", f"loss={variant}"], tmp_path, toy_root)
    loss = instantiate(cfg.loss)
    assert cfg.loss.variant == loss.variant == variant
    lambdas = {k for k in cfg.loss if k.startswith("lambda_")} - {"lambda_replay", "lambda_distill"}
    assert lambdas == ({"lambda_caption", "lambda_concept"} if len(loss.terms) == 2 else set())


def test_held_out_and_evaluation_groups_are_separate(tmp_path, toy_root):
    cfg = make_cfg(["heldout=after_only"], tmp_path, toy_root)
    assert cfg.heldout == {"before_after": False} and "eval" not in cfg
    with pytest.raises(ConfigCompositionException):
        make_cfg(["eval=heldout"], tmp_path, toy_root)  # the old mixed group is gone
    with initialize_config_dir(str(CONF), version_base="1.3"):
        ev = compose("evaluate", overrides=["eval=[twins,cultural]"])
    assert set(ev.eval) == {"tasks"} and "heldout" not in ev
    assert "seeds" not in ev.eval.tasks.cultureverse and "protocol" not in ev.eval.tasks.cultureverse


def test_resolvers_compose_from_any_entry_point(tmp_path, toy_root, monkeypatch):
    cfg = make_cfg(["trainer=gpu", "data.num_workers=${cc_workers:64}"], tmp_path, toy_root)
    assert cfg.trainer.precision in ("bf16-mixed", "32-true")
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert cfg.data.num_workers == 3  # never more loader processes than cores
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cfg.data.num_workers == 16 and make_cfg([], tmp_path, toy_root).data.num_workers == 2


def test_config_errors_are_clear(tmp_path, toy_root, monkeypatch, tiny_spec):
    with pytest.raises(ConfigCompositionException):
        make_cfg(["no_such_key=1"], tmp_path, toy_root)
    with pytest.raises(ConfigCompositionException):
        make_cfg(["model=no_such_model"], tmp_path, toy_root)
    # CulTwin shard paths are mandatory, and a pattern that matches nothing is named
    cfg = make_cfg(["+experiment=cultwin"], tmp_path, toy_root)
    with pytest.raises(Exception, match="train_shards"):
        instantiate(cfg.data, spec=tiny_spec)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")
    monkeypatch.setattr("cultureclip.model.build_encoder", no_model)
    shards = [f"data.train_shards={toy_root}/toy/train", f"data.val_shards={toy_root}/toy/val"]
    cfg = make_cfg(["+experiment=cultwin", "trainer=cpu", "data.train_shards=/nonexistent/shard-*.tar",
                    f"data.val_shards={toy_root}/toy/val"], tmp_path, toy_root)
    with pytest.raises(Exception, match="no shard matches '/nonexistent/shard-"):
        train(cfg)
    # Lightning's accumulation would give each micro-batch its own negatives: refused, pointing at the home
    cfg = make_cfg(["+experiment=smoke", "trainer.accumulate_grad_batches=4"], tmp_path, toy_root)
    with pytest.raises(ValueError, match="set optim.accum_freq=4 instead"):
        train(cfg)
    # the recipe on a machine without a GPU: say so, and how to run it on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU.*add trainer=cpu"):
        train(make_cfg(["+experiment=cultwin", *shards], tmp_path, toy_root))


def test_smoke_train_exports_model_and_metrics(tmp_path, toy_root):
    run = tmp_path / "run"
    cfg = make_cfg(["+experiment=smoke", "model.lora={r:2,alpha:8,dropout:0.0,targets:qv}"], run, toy_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record, objs = train(cfg)
    # step checkpoints of the manually optimised module are saved without Lightning's warning about them
    assert not [w for w in caught if "pre-optimization" in str(w.message)]
    assert (run / "checkpoints" / "step0000002.ckpt").is_file()
    assert objs["encoder"].has_lora
    assert objs["trainer"].global_step == 4
    trainer, module, dm = objs["trainer"], objs["module"], objs["datamodule"]
    # the epoch has a known length (progress bar total), from sizes.json
    assert trainer.num_training_batches == dm.batches_per_epoch() == math.ceil(dm.train_pairs_per_epoch / 8)
    assert module.total_steps == 4  # the lr schedule spans max_steps ...
    assert schedule_length(-1, 3, dm.batches_per_epoch(), 2) == 3 * dm.batches_per_epoch() // 2  # ... or the epochs
    metrics = json.loads((run / "metrics.json").read_text())
    for stage in ("before", "after"):
        assert {"val/twin_acc", "val/img2concept_recall@1", "val/twin_confusion_rate", "val/loss"} <= set(
            metrics[stage])
    assert metrics["after"]["val/loss"] != metrics["before"]["val/loss"]
    assert metrics["config"]["loss"]["variant"] == "cultureclip" and "torch" in metrics["versions"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the exported model is plain open_clip and matches the trained encoder
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(run / "model"))
    enc = objs["encoder"].eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(F.normalize(model.eval().encode_image(x), dim=-1), enc.encode_image(x),
                               atol=1e-5, rtol=1e-5)
    # a training checkpoint loads back as an encoder (adapters merged) with the same features
    from_ckpt = cultureclip.CultureCLIP.from_pretrained(str(run / "checkpoints" / "last.ckpt"))
    assert not from_ckpt.has_lora
    torch.testing.assert_close(from_ckpt.encode_image(x), enc.encode_image(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_ckpt.encode_text(["a hanbok"]), enc.encode_text(["a hanbok"]), atol=1e-5, rtol=1e-5)
    # a second fresh run over the same directory is refused rather than overwriting checkpoints
    with pytest.raises(FileExistsError, match="ckpt_path=last"):
        train(make_cfg(["+experiment=smoke"], run, toy_root))


def _batch(b, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    tok = open_clip.get_tokenizer("cultureclip-tiny")
    words = ["qipao", "ao dai", "hanbok", "kimono", "sari", "kebaya", "dirndl", "kilt"]
    batch = {k: torch.randn(b, 3, size, size, generator=g) for k in schema.IMAGE_KEYS}
    for k in schema.TEXT_KEYS:
        idx = torch.randint(0, len(words), (b,), generator=g).tolist()
        batch[k] = tok([f"a {words[i]} number {seed}" for i in idx])
    return batch


def test_accumulation_keeps_full_negative_pool():
    torch.manual_seed(0)
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny").eval()  # eval: no dropout noise
    module = CultureCLIPModule(enc, CultureCLIPLoss("cultureclip"), optimizer=None)
    micro = [_batch(4, 1), _batch(4, 2)]
    full = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    out_full = module.backward_over([full], backward=torch.Tensor.backward)
    ref = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    out_acc = module.backward_over(micro, backward=torch.Tensor.backward)
    torch.testing.assert_close(out_acc["loss"], out_full["loss"])
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    # Lightning-style accumulation (a separate loss per micro-batch) gives a different gradient
    enc.zero_grad(set_to_none=True)
    for m in micro:
        module.backward_over([m], backward=lambda loss: (loss / 2).backward())
    assert not torch.allclose(enc.model.visual.conv1.weight.grad, ref["model.visual.conv1.weight"], atol=1e-6)


def test_non_finite_loss_stops_with_the_step():
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    module = CultureCLIPModule(enc, CultureCLIPLoss("clip"), optimizer=None)
    with torch.no_grad():
        enc.model.visual.proj.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="global step 0"):
        module.backward_over([_batch(2, 0)], backward=torch.Tensor.backward)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, toy_root):
    # Lightning's own DDP launcher re-runs the command for rank 1 (as with torchrun); gloo on CPU
    cmd = [sys.executable, "-m", "cultureclip.train", "+experiment=smoke", "trainer.strategy=ddp",
           "trainer.devices=2", "trainer.max_steps=2", f"paths.data_dir={toy_root}",
           f"paths.output_dir={tmp_path}", "callbacks=none", "logger=csv"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "smoke-cultureclip-s0" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["config"]["trainer"]["devices"] == 2


def test_validation_metrics_equal_offline_twin_evaluation(toy_root):
    # one twin-metric definition: the module's validation and cultureclip.eval.twins agree on a split
    torch.manual_seed(0)
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    from cultureclip.data.datamodule import TwinDataModule
    dm = TwinDataModule(enc.data_spec(), f"{toy_root}/toy/train", f"{toy_root}/toy/val", batch_size=16,
                        num_workers=0)
    dm.setup("validate")
    module = CultureCLIPModule(enc, CultureCLIPLoss("cultureclip"), optimizer=None, val_concepts=dm.val_concepts,
                               val_shards=dm.val_urls)
    import lightning as L
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, inference_mode=False)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    offline, header, _ = tasks.twins(enc, f"{toy_root}/toy/val", batch_size=16, amp=False)
    assert header["n"] > 0
    for name in ("twin_acc", "img2concept_recall@1", "twin_confusion_rate"):
        assert val[f"val/{name}"] == pytest.approx(offline[name], abs=1e-6), name


def test_skip_reports_are_counted_and_an_empty_split_is_an_error():
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    module = CultureCLIPModule(enc, CultureCLIPLoss("clip"), optimizer=None, val_concepts=["qipao", "ao dai"],
                               val_shards=["/data/val/shard-000000.tar", "/data/val/shard-000001.tar"])
    report = {schema.N_SKIPPED: 3}  # a batch that only reports skipped samples
    assert module.training_step(report, 0) is None and module._skipped_total == 3
    import lightning as L
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    with pytest.raises(RuntimeError, match=r"no pair \(5 samples skipped.*shard-000000.tar, /data/val/shard-000001"):
        trainer.validate(module, dataloaders=torch.utils.data.DataLoader([report, {schema.N_SKIPPED: 2}],
                                                                         batch_size=None), verbose=False)


def test_toy_set_is_built_in_prepare_data_not_at_construction(tmp_path, toy_root, tiny_spec):
    from cultureclip.data.datamodule import TwinDataModule
    fresh = tmp_path / "toy"
    TwinDataModule(tiny_spec, f"{fresh}/train", f"{fresh}/val", toy_dir=str(fresh))
    assert not fresh.exists()  # construction touches no file (it runs on every rank)
    dm = TwinDataModule(tiny_spec, f"{toy_root}/toy/train", f"{toy_root}/toy/val", toy_dir=f"{toy_root}/toy",
                        batch_size=8)
    dm.prepare_data()  # complete set: kept as is
    dm.setup("fit")
    assert dm.val_concepts == sorted(set(dm.val_concepts)) and len(dm.val_concepts) > 2
    assert dm.batches_per_epoch(2) == math.ceil(dm.train_pairs_per_epoch / 16)


def test_pixel_cap_and_no_progress_limit_reach_the_stream_from_the_config(tmp_path, toy_root, tiny_spec):
    # every toy image is over a 100-pixel cap: all samples are skipped as too_large, and the stream
    # stops after max_consecutive_skips instead of spinning forever
    from cultureclip.data.pipeline import NoProgressError
    cfg = make_cfg(["data.max_pixels=100", "data.max_consecutive_skips=20", "data.num_workers=0"], tmp_path, toy_root)
    dm = instantiate(cfg.data, spec=tiny_spec)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(NoProgressError, match="shard-"):
        next(iter(dm.train_dataloader()))


def test_skip_count_survives_a_checkpoint_round_trip():
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    saved = CultureCLIPModule(enc, CultureCLIPLoss("clip"), optimizer=None)
    saved.training_step({schema.N_SKIPPED: 7}, 0)  # a skip report: counted, nothing trained
    checkpoint = {}
    saved.on_save_checkpoint(checkpoint)
    resumed = CultureCLIPModule(enc, CultureCLIPLoss("clip"), optimizer=None)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._skipped_total == 7


# ---------------------------------------------------------------- GPU-ready step: lazy finite checks, throughput

def _fit(module, steps, callbacks=()):
    import lightning as L
    batches = [_batch(2, i) for i in range(steps)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _module(**kwargs):
    from cultureclip.optim import adamw
    torch.manual_seed(0)
    enc = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    return CultureCLIPModule(enc, CultureCLIPLoss("clip"), optimizer=lambda params: adamw(params, lr=1e-4), **kwargs)


def test_nan_is_caught_within_check_finite_every_steps_naming_the_step():
    import lightning as L

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                with torch.no_grad():
                    module.encoder.model.visual.proj.fill_(float("nan"))

    module = _module(check_finite_every=4)
    with pytest.raises(FloatingPointError, match=r"global step 5 \(checked every 4 steps; this check covered "
                                                 r"steps 4\.\.7\).*'loss': nan"):
        _fit(module, 12, [Poison()])
    assert module.global_step == 7  # found by the check after step 7, before its optimizer step


def test_throughput_and_flops_are_logged_and_summarised():
    from cultureclip import flops
    module = _module(check_finite_every=2)
    trainer = _fit(module, 4)
    logged = trainer.logged_metrics
    assert float(logged["train/images_per_s"]) > 0 and float(logged["train/tflops"]) > 0
    assert "train/mfu" not in logged  # CPU: no peak, no MFU
    assert trainer.progress_bar_metrics["loss"] == pytest.approx(float(logged["train/loss"]))
    summary = module.throughput_summary()
    assert summary["steps_timed"] == 4 and "mfu" not in summary
    # the step FLOPs are those of one forward + backward of the first batch, counted independently here
    mb = _batch(2, 0)
    _, fwd_bwd = flops.count_train_flops(module.encoder, lambda: module.loss(
        module.encode(mb, module.loss.required_keys), module.encoder.logit_scale.exp())["loss"])
    assert summary["step_tflop"] * 1e12 == pytest.approx(fwd_bwd)
    assert summary["tflops"] == pytest.approx(fwd_bwd * 4 / module.speed.totals["seconds"] / 1e12)


def test_compile_is_ignored_on_cpu_with_a_warning():
    module = _module(compile=True)
    with pytest.warns(UserWarning, match="compile=true is ignored on cpu"):
        _fit(module, 1)
    assert module.encoder.model.visual._compiled_call_impl is None
