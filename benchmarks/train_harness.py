"""Training throughput: our Lightning step against open_clip's own ``train_one_epoch``, same data.

The twin shards are copied into a plain open_clip WebDataset (``jpg`` + ``txt``, one pair -> two
samples), and open_clip gets ``2 * B`` images per batch when ours gets ``B`` pairs. Ours also encodes
up to four texts per pair (captions and concept names) against open_clip's one per image, hence
``texts/s``. Each side runs in its own process (``python benchmarks/train_harness.py SIDE CONFIG OUT``),
so its peak memory is its own. A step is timed from the end of the previous one (data wait included).

This is a benchmark helper, not part of the package: driving open_clip's trainer needs a stand-in
``pandas`` module and a patched ``open_clip_train.data`` function (see :func:`bench_open_clip`), which
no library code should do. Run it through ``benchmarks/bench_train.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, Optional

import open_clip
import open_clip.loss as open_clip_loss
import torch
import webdataset as wds

from cultureclip import schema
from cultureclip.data.pipeline import build_twin_pipeline, make_loader
from cultureclip.data.shards import read_sizes
from cultureclip.checkpoint_io import register_config
from cultureclip.loss import CultureCLIPLoss
from cultureclip.model import CultureCLIP, build_encoder  # also registers cultureclip-tiny with open_clip
from cultureclip.optim import adamw, param_groups, warmup_schedule

PLAIN_TEXT = "txt"  # open_clip's caption member; images keep their extension (it decodes jpg/png/webp)
OPEN_CLIP_PRECISION = {"32-true": "fp32", "bf16-mixed": "amp_bf16", "16-mixed": "amp"}
CONCEPT_CONTEXT = 16  # concept_context_length of the data configs (toy, cultwin)


@dataclasses.dataclass
class BenchConfig:
    """One benchmark setting; ``batch_size`` is in pairs (open_clip gets ``2 * batch_size`` images)."""
    twin_dir: str
    plain_dir: str
    model: str = "cultureclip-tiny"
    batch_size: int = 32
    steps: int = 20
    warmup: int = 5
    workers: int = 2
    precision: str = "32-true"
    device: str = "cpu"
    variant: str = "cultureclip"
    lr: float = 1e-4
    seed: int = 0
    pipeline_workers: tuple = (0, 1, 2)
    pipeline_batches: int = 50  # many more than the loader prefetches (2 per worker), which would flatter it
    threads: Optional[int] = None  # torch intra-op threads of each side; None: torch's default
    lora: Optional[dict] = None  # CultureCLIP.add_lora arguments for both sides; None: full fine-tuning
    compile: bool = False  # ours: the module's compile (towers, CUDA only); open_clip: torch.compile(model)
    optimizer_impl: str = "auto"  # cultureclip.optim.adamw: fused on CUDA, foreach elsewhere (both sides)
    check_finite_every: int = 25  # the module's default (conf/module): a check every step would stall a GPU
    model_cfg: Optional[dict] = None  # an open_clip architecture built with random weights instead of `model`
    loss_family: Optional[str] = None  # CultureCLIPLoss(family=...) where the installed loss has families
    count_open_clip_flops: bool = False  # count one open_clip step's FLOPs on its device after the run


def model_name(cfg: BenchConfig) -> str:
    """The open_clip registry name of the setting's model (``model_cfg`` registered under ``model``)."""
    return register_config(cfg.model, cfg.model_cfg) if cfg.model_cfg else cfg.model


def memory_now_mib(device: str) -> float:
    """Memory in use now: CUDA tensors allocated, or this process's resident set on a CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20  # the allocator's count: no device sync
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _start(cfg: BenchConfig) -> str:
    if cfg.threads:  # on a CPU shared with other jobs, spinning OpenMP threads can cost 10x
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return resolve_device(cfg.device)


def write_plain_shards(twin_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy twin shards into open_clip's image-text format, image bytes untouched: each pair becomes
    ``<key>_pos`` (pos image + caption) and ``<key>_neg``. Returns ``out_dir`` (``shard-*.tar`` and
    ``sizes.json``); one that already has ``sizes.json`` is reused."""
    out = Path(out_dir)
    if (out / schema.SIZES_FILE).is_file():
        return out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    urls = [str(p) for p in sorted(Path(twin_dir).glob("*.tar"))]
    with wds.ShardWriter(str(tmp / schema.SHARD_PATTERN), maxcount=2 * max(read_sizes(twin_dir).values()),
                         verbose=0) as writer:
        for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            meta = json.loads(raw[schema.META])
            for members, caption, side in ((schema.POS_IMAGE_MEMBERS, schema.POS_CAPTION, schema.POS_PREFIX),
                                           (schema.NEG_IMAGE_MEMBERS, schema.NEG_CAPTION, schema.NEG_PREFIX)):
                member = next(m for m in members if m in raw)
                writer.write({schema.KEY: f"{raw[schema.KEY]}_{side}", member.split(".", 1)[1]: raw[member],
                              PLAIN_TEXT: meta[caption]})
                name = os.path.basename(writer.fname)
                sizes[name] = sizes.get(name, 0) + 1
    (tmp / schema.SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    os.replace(tmp, out)  # readers never see a half-written set
    return out


def prepare_shards(shards: Optional[str], cache_dir: str | os.PathLike) -> tuple[str, str]:
    """``(twin_dir, plain_dir)``: ``shards`` (a twin shard folder; None: the toy train split, built in
    ``cache_dir/toy``) and its plain copy in ``cache_dir``, named after the twin folder's path and
    ``sizes.json`` so that a changed source never meets a stale copy."""
    cache = Path(cache_dir)
    if shards is None:
        from cultureclip.data.toy import ensure_toy_shards
        shards = str(ensure_toy_shards(cache / "toy") / "train")
    twin = Path(shards).resolve()
    tag = hashlib.sha1(f"{twin}\n{json.dumps(read_sizes(twin), sort_keys=True)}".encode()).hexdigest()[:10]
    return str(twin), str(write_plain_shards(twin, cache / f"plain-{tag}"))


def _summary(starts: list, ends: list, images: list, warmup: int, encoded_images: int, texts: int,
             device: str, losses: Optional[list] = None, memory: Optional[list] = None) -> dict:
    """Figures over the steps after warm-up; ``starts[i]``: batch ``i`` handed over, ``ends[i]``: step done.
    ``losses`` and ``memory`` (per step, all steps) are kept as ``loss_per_step`` and ``mem_mib_per_step``."""
    n = len(ends) - warmup
    if n < 1 or len(starts) != len(ends):
        raise RuntimeError(f"{len(ends)} steps ended, {len(starts)} started, {warmup} of them warm-up")
    seconds = ends[-1] - (ends[warmup - 1] if warmup else starts[0])
    # from one step's end to the next batch's arrival: data wait + loop overhead
    wait = sum(starts[i] - ends[i - 1] for i in range(max(1, warmup), len(ends)))
    imgs = sum(images[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"steps": n, "seconds": seconds, "images": imgs, "images_total": sum(images),
            "images_per_s": imgs / seconds, "encoded_images_per_s": n * encoded_images / seconds,
            "texts_per_s": n * texts / seconds, "ms_per_step": 1000 * seconds / n, "wait_frac": wait / seconds,
            "peak_mem_mib": peak, "mem_kind": "cuda_max_allocated" if device == "cuda" else "peak_rss_main_process",
            "torch_threads": torch.get_num_threads(),
            "loss_per_step": [float(x) for x in torch.stack(losses).float().cpu()] if losses else None,
            "mem_mib_per_step": memory or None}


def _now(device: str) -> float:
    if device == "cuda":  # kernels run asynchronously: a step ends when they do
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_ours(cfg: BenchConfig) -> dict:
    """Time :class:`CultureCLIPModule` in a real Lightning ``Trainer`` over ``TwinDataModule``."""
    import lightning as L  # imported here only, so that it never counts in open_clip's peak memory
    from cultureclip.data.datamodule import TwinDataModule
    from cultureclip.lit_module import CultureCLIPModule

    device, total = _start(cfg), cfg.warmup + cfg.steps
    starts, ends, images, losses, memory = [], [], [], [], []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            ends.append(_now(device))
            images.append(2 * batch[schema.POS_IMAGE].shape[0])
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:  # kept on the device: read once at the end
                losses.append(loss.detach())
            memory.append(memory_now_mib(device))

    encoder = build_encoder(model_name(cfg), pretrained=None, lora=cfg.lora)
    data = TwinDataModule(encoder.data_spec(), cfg.twin_dir, batch_size=cfg.batch_size, num_workers=cfg.workers,
                          seed=cfg.seed,
                          train_pairs_per_epoch=(total + cfg.workers) * cfg.batch_size,  # one epoch covers the run
                          concept_context_length=CONCEPT_CONTEXT)
    loss = CultureCLIPLoss(cfg.variant, **({"family": cfg.loss_family} if cfg.loss_family else {}))
    module = CultureCLIPModule(
        encoder, loss, optimizer=functools.partial(adamw, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                                   impl=cfg.optimizer_impl),
        scheduler=functools.partial(warmup_schedule, warmup_steps=cfg.warmup), weight_decay=0.1, total_steps=total,
        check_finite_every=cfg.check_finite_every, compile=cfg.compile)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=cfg.precision,
                        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[StepTimer()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    # the module encodes only what the variant's loss reads
    n_img, n_txt = (sum(k in loss.required_keys for k in keys) for keys in (schema.IMAGE_KEYS, schema.TEXT_KEYS))
    out = _summary(starts, ends, images, cfg.warmup, n_img * cfg.batch_size, n_txt * cfg.batch_size, device,
                   losses, memory)
    opt = module.optimizers(use_pl_optimizer=False)
    logged = trainer.callback_metrics.get("train/mfu")  # the module's own last window (warm-up included)
    return {**out, "pairs_per_s": out["images_per_s"] / 2, "batch": f"{cfg.batch_size} pairs", "texts_per_pair": n_txt,
            "step_flops": module._step_flops, "peak_flops": module._peak, "train_mfu_logged": _float(logged),
            "trainable_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "optimizer": _optimizer_impl(opt), "compiled": cfg.compile and device == "cuda"}


def _float(x) -> Optional[float]:
    return None if x is None else float(x)


def _optimizer_impl(opt: torch.optim.Optimizer) -> str:
    """Which AdamW implementation ran: ``fused``, ``foreach`` or ``for_loop``."""
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for_loop"


def _tarfile_to_samples_eof_safe(oc_data, src, handler=None):
    handler = handler or oc_data.log_and_continue
    files = wds.tariterators.tar_file_expander(wds.tariterators.url_opener(src, handler=handler),
                                               handler=handler, eof_value=None)
    return oc_data.group_by_keys_nothrow(files, handler=handler)


class _TimedLoader:
    """open_clip's loader, cut after ``n`` batches, recording when each batch arrived and its size."""

    def __init__(self, loader, n: int):
        self.loader, self.num_batches, self.num_samples = loader, n, loader.num_samples
        self.starts, self.images = [], []

    def __iter__(self):
        for images, texts in itertools.islice(self.loader, self.num_batches):
            self.starts.append(time.perf_counter()), self.images.append(images.shape[0])
            yield images, texts


def bench_open_clip(cfg: BenchConfig) -> dict:
    """Time ``open_clip_train.train.train_one_epoch`` over ``get_wds_dataset`` on the plain shards."""
    from open_clip_train.scheduler import cosine_lr

    # open_clip_train.data imports pandas for its CSV dataset only (unused here): without pandas,
    # a placeholder module stands in during the import
    placeholder = None if importlib.util.find_spec("pandas") else types.ModuleType("pandas")
    if placeholder is not None:
        sys.modules["pandas"] = placeholder
    try:
        from open_clip_train import data as oc_data, train as oc_train
    finally:
        if placeholder is not None and sys.modules.get("pandas") is placeholder:
            del sys.modules["pandas"]
    device, total = _start(cfg), cfg.warmup + cfg.steps
    # the fields get_wds_dataset and train_one_epoch read (names of open_clip_train/params.py)
    args = argparse.Namespace(
        train_data="::".join(sorted(str(p) for p in Path(cfg.plain_dir).glob("*.tar"))),
        dataset_resampled=True,  # like ours: an endless resampled stream
        train_data_upsampling_factors=None, train_num_samples=total * 2 * cfg.batch_size, seed=cfg.seed,
        workers=cfg.workers, batch_size=2 * cfg.batch_size, world_size=1, rank=0, local_rank=0, device=device,
        precision=OPEN_CLIP_PRECISION[cfg.precision], accum_freq=1, distill=False, skip_scheduler=False,
        horovod=False, grad_clip_norm=None, log_every_n_steps=10**9, wandb=False, save_logs=False)
    name = model_name(cfg)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        name, pretrained=None, precision=args.precision, device=device, output_dict=True)
    if cfg.lora:  # the same adapters and frozen base as ours (CultureCLIP.add_lora edits `model` in place)
        CultureCLIP(model, None, None, None, {}).add_lora(**cfg.lora)
    plain_model = model
    # webdataset >= 0.2.96 ends every shard with an empty "eof" sample that open_clip_train's
    # tarfile_to_samples_nothrow cannot read (KeyError 'fname', open_clip#935); the fix proposed
    # there (eof_value=None) is swapped in while the pipeline is built
    original = oc_data.tarfile_to_samples_nothrow
    oc_data.tarfile_to_samples_nothrow = functools.partial(_tarfile_to_samples_eof_safe, oc_data)
    try:
        info = oc_data.get_wds_dataset(args, preprocess_train, is_train=True, epoch=0,
                                       tokenizer=open_clip.get_tokenizer(name))
    finally:
        oc_data.tarfile_to_samples_nothrow = original
    loader = _TimedLoader(info.dataloader, total)
    # our module's optimizer (same groups, same AdamW), so that only the step itself differs
    opt = adamw(param_groups(model, 0.1), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, impl=cfg.optimizer_impl)
    ends: list[float] = []
    memory: list[float] = []
    opt.register_step_post_hook(lambda *_: (ends.append(_now(device)), memory.append(memory_now_mib(device))))
    # SigLIP-style models (a logit_bias) train with open_clip's sigmoid loss, as open_clip_train picks it
    loss = _Recorded(open_clip_loss.SigLipLoss() if getattr(model, "logit_bias", None) is not None
                     else open_clip.ClipLoss())  # open_clip exports ClipLoss at top level, SigLipLoss only in .loss
    if cfg.compile and device == "cuda":  # open_clip_train's --torchcompile
        model = torch.compile(model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    scaler = torch.amp.GradScaler(device) if args.precision == "amp" else None  # as Lightning's 16-mixed
    data = {"train": oc_data.DataInfo(loader, shared_epoch=info.shared_epoch)}
    oc_train.train_one_epoch(model, data, loss, 0, opt, scaler,
                             cosine_lr(opt, cfg.lr, cfg.warmup, total), None, args)
    out = _summary(loader.starts, ends, loader.images, cfg.warmup, 2 * cfg.batch_size, 2 * cfg.batch_size, device,
                   loss.losses, memory)
    step_flops = _open_clip_step_flops(plain_model, loss.inner, name, 2 * cfg.batch_size, device) \
        if cfg.count_open_clip_flops else None
    return {**out, "pairs_per_s": None, "batch": f"{2 * cfg.batch_size} images", "texts_per_pair": 2,
            "driver": "open_clip_train.train.train_one_epoch + open_clip_train.data.get_wds_dataset",
            "step_flops": step_flops, "optimizer": _optimizer_impl(opt),
            "trainable_params": sum(p.numel() for p in plain_model.parameters() if p.requires_grad),
            "compiled": cfg.compile and device == "cuda"}


class _Recorded(torch.nn.Module):
    """An open_clip loss that keeps each step's total loss (detached, on the device)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.losses = inner, []

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        total = sum(out.values()) if isinstance(out, dict) else out
        self.losses.append(total.detach())
        return out


def _open_clip_step_flops(model, loss_fn, name: str, n_images: int, device: str) -> int:
    """FLOPs of one open_clip step (forward + backward) of ``n_images`` images with full-length captions;
    open_clip never trims its text, so the count does not depend on the captions' contents."""
    from cultureclip.flops import count_train_flops
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(n_images, 3, *size, device=device)
    texts = open_clip.get_tokenizer(name)(["a photo of a festival dish"] * n_images).to(device)

    def step():
        out = model(pixels, texts)
        return loss_fn(**out)

    return count_train_flops(model, step)[1]


def bench_pipeline(cfg: BenchConfig) -> list[dict]:
    """Our training loader alone (read, decode, preprocess, tokenize; no model), per worker count."""
    _start(cfg)
    enc = CultureCLIP.from_pretrained(model_name(cfg), pretrained=None)  # for its transforms and tokenizer
    concept_context = CONCEPT_CONTEXT if enc.supports_short_context else None  # as TwinDataModule does
    rows = []
    for w in cfg.pipeline_workers:
        pipe = build_twin_pipeline(cfg.twin_dir, enc.preprocess_train, enc.tokenizer, cfg.batch_size, train=True,
                                   seed=cfg.seed, concept_context_length=concept_context)
        # not persistent, so that dropping the iterator stops its workers before the next setting
        it = iter(make_loader(pipe, num_workers=w, persistent_workers=False))
        for _ in range(cfg.warmup + w):  # worker start-up and every worker's first shuffle-buffer fill
            next(it)
        t0, pairs = time.perf_counter(), 0
        for _ in range(cfg.pipeline_batches):
            pairs += next(it)[schema.POS_IMAGE].shape[0]
        seconds = time.perf_counter() - t0
        rows.append({"workers": w, "batches": cfg.pipeline_batches, "pairs": pairs, "pairs_per_s": pairs / seconds,
                     "pairs_per_s_per_worker": pairs / seconds / max(1, w), "images_per_s": 2 * pairs / seconds})
        del it
    return rows


def bench_flops(cfg: BenchConfig) -> dict:
    """FLOPs per image of both steps and their ratio, the speed-up limit (see ``flop_count.py``)."""
    from flop_count import step_flops  # beside this script
    _start(cfg)
    return step_flops(cfg.model, cfg.twin_dir, cfg.batch_size, cfg.variant, seed=cfg.seed,
                      concept_context=CONCEPT_CONTEXT)


def run_side(side: str, cfg: BenchConfig):
    """Run one side (``ours``, ``open_clip``, ``pipeline`` or ``flops``) in this process."""
    return {"ours": bench_ours, "open_clip": bench_open_clip, "pipeline": bench_pipeline,
            "flops": bench_flops}[side](cfg)


def run_side_isolated(side: str, cfg: BenchConfig):
    """Run one side in a fresh Python process, so that its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), side, str(cfg_path), str(out_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # Lightning's banners stay hidden unless the side failed
            raise RuntimeError(f"benchmark side {side!r} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def _median_run(runs: list[dict]) -> dict:
    # the median run by images/s (lower middle for an even count), not per-field medians, so that
    # its images/s, ms/step and memory belong together
    return {**sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2], "runs": runs}


def run_benchmark(cfg: BenchConfig, repeats: int = 1, runner: Callable = run_side_isolated) -> dict:
    """Alternate ours and open_clip ``repeats`` times, then time the data pipeline alone and count FLOPs.

    Args:
        cfg: the setting (shards from :func:`prepare_shards`).
        repeats: ours/open_clip alternations; figures are medians.
        runner: ``runner(side, cfg)``; :func:`run_side` keeps everything in this process (tests).

    Returns:
        A JSON-ready dict: setting, versions, ``ours``/``open_clip`` (the median run and all ``runs``),
        ``ratios_images_per_s`` (ours/open_clip per repeat) and their median ``ratio_images_per_s``,
        ``pipeline`` rows, ``pipeline_is_bottleneck``, ``flops`` (per image of each step and their ratio
        ``limit``, see ``flop_count.py``) and ``fraction(s)_of_limit`` (achieved ratio / limit).
    """
    from cultureclip.eval.results import package_versions

    runs = {"ours": [], "open_clip": []}
    for _ in range(repeats):
        for side in runs:  # a, b, a, b: drift of a shared machine hits both sides alike
            runs[side].append(runner(side, cfg))
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["ours"], runs["open_clip"])]
    ours, pipeline, flops = _median_run(runs["ours"]), runner("pipeline", cfg), runner("flops", cfg)
    at_workers = next((r for r in pipeline if r["workers"] == cfg.workers), None)
    device = resolve_device(cfg.device)
    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "versions": package_versions(),
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("twin_dir", "plain_dir")},
            "open_clip_batch_size": 2 * cfg.batch_size, "repeats": repeats, "ours": ours,
            "open_clip": _median_run(runs["open_clip"]), "ratio_images_per_s": statistics.median(ratios),
            "ratios_images_per_s": ratios, "pipeline": pipeline, "flops": flops,
            "fraction_of_limit": statistics.median(ratios) / flops["limit"],
            "fractions_of_limit": [r / flops["limit"] for r in ratios],
            "pipeline_is_bottleneck": at_workers and at_workers["pairs_per_s"] < ours["pairs_per_s"]}


if __name__ == "__main__":  # one side, for run_side_isolated: SIDE CONFIG_JSON OUT_JSON
    _side, _cfg, _out = sys.argv[1:4]
    Path(_out).write_text(json.dumps(run_side(_side, BenchConfig(**json.loads(Path(_cfg).read_text())))))
