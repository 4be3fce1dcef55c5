"""The training section of ``gpu_check.py``: ours (Lightning module, twin loss) against open_clip's own
``train_one_epoch``, same model, same images per step, in one process (``train_harness.py`` runs both sides),
ViT-B/32 with random weights, LoRA (the paper's recipe) and full fine-tuning, batch 256 and 128 pairs,
eager and compiled; a ViT-B/16-SigLIP2-size row where the installed loss has the sigmoid family.

The twin shards are the toy set written first at 256 px (14 loader workers on a 16-core machine decode and
crop them to 224 px as a real run's loader does), so the data path is in every timed step.
"""
from __future__ import annotations

import inspect
import os

import open_clip
import torch

from train_harness import BenchConfig, bench_open_clip, bench_ours, prepare_shards, resolve_device

import gpu_check as gc_

B32 = "ViT-B-32-quickgelu"
# the paper's LoRA recipe (conf/model/vit_b32_openai.yaml): r 4, alpha 16, dropout 0.1, q and v, both towers
PAPER_LORA = {"r": 4, "alpha": 16, "dropout": 0.1, "targets": "qv", "towers": ("image", "text"), "layers": "all"}
SIGLIP2 = "ViT-B-16-SigLIP2"
# learning rates that move random weights visibly within the timed steps (the loss-falls check); the speed of
# a step does not depend on them. The paper's 3e-6 is for pretrained weights.
LR = {"lora": 1e-3, "full": 1e-4}


def sigmoid_loss_support() -> tuple[bool, str]:
    """Whether the installed ``CultureCLIPLoss`` takes ``family="sigmoid"``; the reason when it does not."""
    from cultureclip.loss import CultureCLIPLoss
    if "family" not in inspect.signature(CultureCLIPLoss).parameters:
        return False, "the installed cultureclip's CultureCLIPLoss has no `family` argument (loss.family: sigmoid " \
                      "is not there yet), so a SigLIP2 model has no twin loss to train with"
    try:
        CultureCLIPLoss("cultureclip", family="sigmoid")
    except Exception as exc:  # present but refusing: say why
        return False, f"CultureCLIPLoss(family='sigmoid') fails: {type(exc).__name__}: {exc}"
    return True, ""


def siglip2_size_config() -> dict:
    """open_clip's ViT-B-16-SigLIP2 architecture (towers, widths, 256k-token embedding, context 64) with
    open_clip's own BPE tokenizer in place of SigLIP2's Hub tokenizer, which would need a download; token
    ids stay below the vocabulary size, so every tensor has its real shape."""
    cfg = open_clip.get_model_config(SIGLIP2)
    if cfg is None:
        raise RuntimeError(f"open_clip {open_clip.__version__} has no {SIGLIP2} config")
    cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    return cfg


def plan(dry: bool, cuda: bool, compiled: bool) -> list[dict]:
    """The settings of one section (eager or compiled) in the order they run, the most important first, so
    that a short budget keeps them. The dry run has one eager LoRA setting and lists the others unrun."""
    workers = 0 if dry else min(14, max(1, (os.cpu_count() or 2) - 2))
    base = dict(model="cultureclip-tiny", steps=3, warmup=1, workers=workers) if dry else \
        dict(model=B32, steps=30, warmup=8, workers=workers)
    b1, b2 = (4, 2) if dry else (256, 128)
    if compiled:  # more warm-up: ours recompiles for new text lengths and deduplicated concept counts
        order = [("lora", b1), ("full", b1), ("lora", b2), ("full", b2)]
        rows = [dict(base, method=m, batch=b, compile=True, warmup=base["warmup"] + 8) for m, b in order]
        if not cuda:  # the module compiles on CUDA only (tune_towers ignores it on a CPU)
            rows = [dict(r, skip="torch.compile of the towers runs on CUDA only") for r in rows]
        return rows
    order = [("lora", b1, False), ("full", b1, False), ("lora", b2, False), ("full", b2, False),
             ("lora", b1, True), ("full", b1, True)]
    rows = [dict(base, method=m, batch=b, compile=False, siglip2=sig) for m, b, sig in order]
    if dry:  # one setting measured; the others share its code path (full: no adapters; b2: another size)
        rows = [r if i in (0, 4) else dict(r, skip="dry run: one eager setting is measured") for i, r in enumerate(rows)]
    return rows


def _config_name(r: dict) -> str:
    model = "SigLIP2-size" if r.get("siglip2") else r["model"]
    return f"{model} {r['method']} b{r['batch']} {'compiled' if r['compile'] else 'eager'}"


def measure_side(side: str, cfg: BenchConfig, peak_name) -> dict:
    """One side of a setting: its figures, MFU (from the step's FLOP count) and self-checks."""
    from cultureclip.flops import compute_dtype, peak_flops
    cuda = cfg.device == "cuda"
    r = (bench_ours if side == "ours" else bench_open_clip)(cfg)
    peak = peak_flops(peak_name, compute_dtype(cfg.precision)) if cuda else None
    r["tflops"] = r["step_flops"] * r["steps"] / r["seconds"] / 1e12 if r.get("step_flops") else None
    r["mfu"] = r["tflops"] * 1e12 / peak if r["tflops"] and peak else None
    r["checks"] = {"finite": gc_.check_finite(r["loss_per_step"]),
                   "loss_falls": gc_.check_loss_falls(r["loss_per_step"], cfg.warmup),
                   "memory_flat": gc_.check_memory_flat(r["mem_mib_per_step"], cfg.warmup, cuda)}
    gc_._free_cuda()
    return r


def compare(ours: dict, theirs: dict) -> dict:
    """ours / open_clip images/s, and the FLOP-ratio limit (open_clip FLOPs per image / ours: the speed-up a
    FLOP-bound step would reach) with the fraction of it achieved."""
    out = {"ratio_images_per_s": ours["images_per_s"] / theirs["images_per_s"]}
    if ours.get("step_flops") and theirs.get("step_flops"):  # both steps train on the same images
        out["flop_limit"] = theirs["step_flops"] / ours["step_flops"]
        out["fraction_of_limit"] = out["ratio_images_per_s"] / out["flop_limit"]
    return out


def run_train(sec, compiled: bool = False) -> None:
    """Write the toy twin shards (or reuse them), then measure ours and open_clip's side of each setting of
    :func:`plan`, one row per side, within the section's budget."""
    dry, device = sec.args.dry_run, resolve_device("auto")
    cuda = device == "cuda"
    work = sec.out / "work"
    from cultureclip.data.toy import ensure_toy_shards
    toy = ensure_toy_shards(work / "toy", **(dict(image_size=64, train_variants=2, val_variants=1, maxcount=16)
                                             if dry else dict(image_size=256, train_variants=16, val_variants=1,
                                                              maxcount=64)))
    twin_dir, plain_dir = prepare_shards(str(toy / "train"), work / "cache")
    peak_name = torch.cuda.get_device_name() if cuda else None
    sigmoid_ok, sigmoid_why = sigmoid_loss_support()
    for r in plan(dry, cuda, compiled):
        config = _config_name(r)
        info = {"config": config, "model": SIGLIP2 + " size" if r.get("siglip2") else r["model"],
                "method": r["method"], "batch_pairs": r["batch"], "compile": r["compile"], "steps": r["steps"],
                "warmup": r["warmup"], "workers": r["workers"], "precision": "bf16-mixed" if cuda else "32-true",
                "variant": "cultureclip", "lr": LR[r["method"]],
                "lora": dict(PAPER_LORA) if r["method"] == "lora" else None}
        skip = r.get("skip") or (None if sigmoid_ok or not r.get("siglip2") else sigmoid_why)

        def bench_config(r=r, info=info) -> BenchConfig:  # built inside the row: a failure here is the row's
            model_cfg = (_tiny_sigmoid_config() if dry else siglip2_size_config()) if r.get("siglip2") \
                else None  # the dry run: SigLIP-shaped tiny towers, the same code path
            return BenchConfig(twin_dir=twin_dir, plain_dir=plain_dir, model="b16-sigmoid-size" if r.get("siglip2")
                               else r["model"], batch_size=r["batch"], steps=r["steps"], warmup=r["warmup"],
                               workers=r["workers"], precision=info["precision"], device=device,
                               variant="cultureclip", lr=info["lr"], lora=info["lora"], compile=r["compile"],
                               optimizer_impl="auto", count_open_clip_flops=True, model_cfg=model_cfg,
                               loss_family="sigmoid" if r.get("siglip2") else None)
        # seconds a side needs at least: a row that starts and overruns is killed with the section, rows that
        # cannot start are listed as skipped (optimistic, so no row that would fit is left out)
        need = (3 if dry else 10) * (3 if r["compile"] else 1) * (2 if r.get("siglip2") else 1)
        done: dict = {}
        for side in ("ours", "open_clip"):
            name = f"{config} / {side}"
            if skip:
                sec.emit({"name": name, "side": side, **info, "status": "skipped", "reason": skip})
                continue
            row = sec.attempt(name, lambda: measure_side(side, bench_config(), peak_name), need, side=side, **info)
            done[side] = row
        if all(done.get(s, {}).get("status") == "ok" for s in ("ours", "open_clip")):
            sec.emit({"name": f"{config} / ours vs open_clip", "kind": "comparison", **info, "status": "ok",
                      **compare(done["ours"], done["open_clip"])})


def _tiny_sigmoid_config() -> dict:
    """A SigLIP-shaped tiny config for the dry run (learned bias, non-causal text, last-token pooling)."""
    return {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                         "no_causal_mask": True, "pool_type": "last"}}
