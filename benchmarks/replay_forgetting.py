"""Does general-data replay keep general zero-shot accuracy during twin fine-tuning? Toy, offline, CPU.

1. *pre-train* the tiny random-init model (``cultureclip-tiny``) once with the plain CLIP loss on the
   toy general set (:mod:`cultureclip.data.toy_general`: 12 shapes in 8 colours, captioned), so that
   it starts fine-tuning with a general zero-shot skill (naming colours), as a real CLIP does;
2. per seed, fine-tune it on the embedded toy twin set with ``python -m cultureclip.train``'s own code
   path (in-process), once without and once with replay (``data.replay.shards`` = the general train
   shards, ``loss.lambda_replay``, optionally ``loss.lambda_distill``), for the same number of steps;
3. score the held-out general split (zero-shot over the 8 colour names) and the twin validation split
   (``twin_acc``) before and after.

Prints one markdown table (mean ± std over the seeds, then one row per seed). Usage::

    python benchmarks/replay_forgetting.py [--seeds 0 1 2] [--steps 120] [--work DIR]

Everything is synthetic: it shows that the mechanism works, not how much a real model forgets.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from open_clip.loss import ClipLoss

import cultureclip
from cultureclip import CultureCLIP, resolvers, schema
from cultureclip.data.replay import build_replay_pipeline
from cultureclip.data.toy import ensure_toy_shards
from cultureclip.data.toy_general import ensure_general_set
from cultureclip.eval import tasks
from cultureclip.train import train

CONF = Path(cultureclip.__file__).parent / "conf"


def pretrain(general: Path, out: Path, seed: int, steps: int, batch_size: int = 64, lr: float = 2e-3) -> Path:
    """Plain CLIP training of the random-init tiny model on the general train shards; saves ``out``."""
    torch.manual_seed(seed)
    model = CultureCLIP.from_pretrained("cultureclip-tiny")
    stream = iter(build_replay_pipeline(str(general / "train"), model.preprocess_train, model.tokenizer, batch_size,
                                        seed=seed, shuffle_buffer=500))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    clip_loss = ClipLoss()
    model.train()
    for _ in range(steps):
        batch = next(stream)
        loss = clip_loss(model.encode_image(batch[schema.REPLAY_IMAGE]), model.encode_text(batch[schema.REPLAY_TEXT]),
                         model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    model.eval().save_pretrained(out)
    return out


def scores(model_dir: Path, general: Path, toy: Path) -> dict[str, float]:
    model = CultureCLIP.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        general_acc = tasks.toy_general(model, str(general), amp=False)[0]["acc1"]
        twin_acc = tasks.twins(model, str(toy / "val"), amp=False)[0]["twin_acc"]
    return {"general": general_acc, "twin": twin_acc}


def finetune(base: Path, data_dir: Path, run_dir: Path, seed: int, steps: int, batch_size: int,
             replay: list[str]) -> Path:
    resolvers.register()
    overrides = [f"model.name={base}", f"seed={seed}", f"trainer.max_steps={steps}", "trainer.max_epochs=1000",
                 f"data.batch_size={batch_size}",
                 "trainer.accelerator=cpu", "+trainer.limit_val_batches=0", "heldout=after_only", "callbacks=none",
                 "logger=none", "data.num_workers=0", "module.count_flops=false", *replay]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.run_dir, cfg.paths.data_dir = str(run_dir), str(data_dir)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    train(cfg)
    return run_dir / "model"


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--base", type=Path, default=None, help="a pre-trained base to reuse (skips step 1)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=32, help="twin pairs per fine-tuning step")
    parser.add_argument("--ratio", type=float, default=0.5, help="data.replay.ratio: replay samples per twin pair")
    parser.add_argument("--lambda-replay", type=float, default=1.0)
    parser.add_argument("--lambda-distill", type=float, default=0.0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="replay_forgetting-"))
    data_dir = work / "data"
    toy, general = ensure_toy_shards(data_dir / "toy"), ensure_general_set(data_dir / "toy_general")
    replay = [f"data.replay.shards={general}/train", f"data.replay.ratio={args.ratio}",
              f"loss.lambda_replay={args.lambda_replay}", f"loss.lambda_distill={args.lambda_distill}"]
    t0 = time.time()
    base = args.base or pretrain(general, work / "base", 0, args.pretrain_steps, lr=args.pretrain_lr)
    before, rows = scores(base, general, toy), []
    print(f"base ready after {time.time() - t0:.0f} s: {before}", flush=True)
    for seed in args.seeds:
        row = {"seed": seed, "before": before}
        for name, extra in (("no_replay", []), ("replay", replay)):
            model_dir = finetune(base, data_dir, work / f"{name}-s{seed}", seed, args.steps, args.batch_size, extra)
            row[name] = scores(model_dir, general, toy)
        rows.append(row)
        print(f"seed {seed} done after {time.time() - t0:.0f} s: {row}", flush=True)
    cols = [("general acc before", "before", "general"), ("general acc, no replay", "no_replay", "general"),
            ("general acc, replay", "replay", "general"), ("twin acc before", "before", "twin"),
            ("twin acc, no replay", "no_replay", "twin"), ("twin acc, replay", "replay", "twin")]
    lines = ["| seeds | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, group in itertools.chain([(f"mean ± std ({len(rows)})", rows)], ((str(r["seed"]), [r]) for r in rows)):
        lines.append(f"| {label} | " + " | ".join(_fmt([r[k][m] for r in group]) for _, k, m in cols) + " |")
    table = "\n".join(lines)
    print(f"\n{args.steps} fine-tuning steps each ({args.batch_size} twin pairs per step; replay: ratio {args.ratio}, "
          f"lambda_replay {args.lambda_replay}, lambda_distill {args.lambda_distill}); "
          f"{time.time() - t0:.0f} s in all\n\n{table}")
    return table


if __name__ == "__main__":
    main()
