"""The render stage: one image per (concept, country, category, caption, seed), with diffusers.

Jobs come from the twin caption sets (``pairs`` or ``captions`` store): every caption of both sides of
every twin pair, ``images_per_caption`` seeds each. A caption shared by several twin pairs (the same
concept twinned with several others) is one job, rendered once; export builds pairs later.

Reproducibility: each image's initial noise comes from its own CPU ``torch.Generator`` seeded with
``seed_from_key(key)`` (CPU, so the noise is the same on any GPU). Prompts are batched
(``batch_size``); a short batch is padded to the full size with copies of its last prompt, so every
image is computed in a batch of the same shape and its pixels do not depend on which other captions
shared its batch (checked bit-exactly in the tests). Bit-exact equality across runs still needs the
same ``batch_size``, dtype, hardware and library versions.

Files: ``<out_dir>/render/images/<key[:2]>/<key>.png``, written atomically before the record is
handed to the store; after a crash, an image whose record was lost is read back instead of rendered
again. A render that fails (OOM, CUDA error, NaN pixels, a safety checker's flag) is an error record
with its reason (``oom``, ``backend_error``, ``nan_image``, ``nsfw``), never a blank image; a batch
that fails is retried image by image first. Other exceptions (bad config, a bug) stop the stage;
finished records are kept.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from cultureclip import schema
from cultureclip.curate.backends import t2i
from cultureclip.curate.registry import Context
from cultureclip.curate.runner import (Job, Outcome, StageReport, Store, fingerprint, run_stage, save_report,
                                       seed_from_key, up_to_date, write_atomic)
from cultureclip.curate.stages.settings import Render as RenderSettings, typed

log = logging.getLogger(__name__)

NAME = "render"
IMAGES_DIR = "images"
DEFAULTS: dict[str, Any] = asdict(RenderSettings())  # the defaults live in stages/settings.py
SIDES = ((schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CAPTIONS),
         (schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CAPTIONS))
_PIPELINES: dict[tuple, Any] = {}  # loaded once per process: reruns and stage=all reuse the model


def settings(cfg: Mapping) -> dict:
    """The stage config with defaults filled in; a ValueError names an unknown or invalid key."""
    s = typed(RenderSettings, {k: cfg[k] for k in cfg}, "render")
    for k in ("width", "height", "steps", "images_per_caption", "batch_size", "part_size"):
        if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 1:
            raise ValueError(f"render config: {k} must be a positive integer, got {s[k]!r}")
    if s["width"] % 8 or s["height"] % 8:
        raise ValueError(f"render config: width and height must be multiples of 8, got {s['width']}x{s['height']}")
    if isinstance(s["guidance"], bool) or not isinstance(s["guidance"], (int, float)):
        raise ValueError(f"render config: guidance must be a number, got {s['guidance']!r}")
    s["guidance"] = float(s["guidance"])  # `guidance: 0` and `guidance: 0.0` must give the same keys
    t2i.torch_dtype(s["dtype"])  # validates
    try:
        s["prompt_template"].format(caption="", concept="", country="", category="")
    except (KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"render config: prompt_template {s['prompt_template']!r} may only use "
                         f"{{caption}}, {{concept}}, {{country}}, {{category}} ({exc!r})") from None
    return s


KEY_SETTINGS = ("width", "height", "steps", "guidance", "negative_prompt", "dtype", "max_sequence_length")
"""The settings an image depends on (in every key); batch_size, device, part_size, offload are not."""


def render_jobs(pairs: Iterable[dict], cfg: Mapping, seed: int = 0) -> Iterator[Job]:
    """The render jobs of a list of twin caption-set records (the runner merges the same job seen twice).

    Args:
        pairs: records with the ``pos_*``/``neg_*`` concept, country and captions fields and ``category``.
        cfg: the render config (see :data:`DEFAULTS`).
        seed: the run's base seed; image ``i`` of a caption has seed ``seed + i`` in its key.

    Yields:
        Jobs whose inputs are the concept, country, category, caption, prompt and seed index; the model,
        the seed and :data:`KEY_SETTINGS` are in their keys. A job's generator seed derives from its key.

    Raises:
        ValueError: a pair without a concept or captions (raised while the jobs are read).
    """
    s = settings(cfg)
    key_settings = {k: s[k] for k in KEY_SETTINGS}
    per_seed = [{**key_settings, "seed": seed + i} for i in range(s["images_per_caption"])]  # shared, not copied
    for n, pair in enumerate(pairs):
        where = f"twin pair {pair.get(schema.TWIN_ID, f'#{n}')}"
        for concept_f, country_f, captions_f in SIDES:
            concept, country, captions = pair.get(concept_f), pair.get(country_f), pair.get(captions_f)
            if not isinstance(concept, str) or not concept.strip():
                raise ValueError(f"{where}: {concept_f} must be a non-empty string, got {concept!r}")
            if not isinstance(captions, list) or not captions:
                raise ValueError(f"{where}: {captions_f} must be a non-empty list, got {captions!r}")
            for caption in captions:
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError(f"{where}: {captions_f} holds {caption!r}, not a caption")
                base = {schema.CONCEPT: concept, schema.COUNTRY: country,
                        schema.CATEGORY: pair.get(schema.CATEGORY), schema.CAPTION: caption}
                prompt = s["prompt_template"].format(**base)
                for i in range(s["images_per_caption"]):
                    yield Job(inputs={**base, schema.PROMPT: prompt, schema.SEED_INDEX: i}, model=s["model"],
                              settings=per_seed[i])


def image_path(render_dir: Path, key: str) -> Path:
    """Where the image of ``key`` lives (``images/<key[:2]>/<key>.png`` under the render folder)."""
    return Path(render_dir) / IMAGES_DIR / key[:2] / f"{key}.png"


def get_pipeline(s: Mapping, device: str):
    """The pipeline for these settings, loaded once per process."""
    cache_key = (s["model"], s["dtype"], device, s["cpu_offload"], s["variant"])
    if cache_key not in _PIPELINES:
        _PIPELINES[cache_key] = t2i.load_pipeline(s["model"], s["dtype"], device, cpu_offload=s["cpu_offload"],
                                                  variant=s["variant"], local_files_only=s["local_files_only"])
    return _PIPELINES[cache_key]


def _readable_png(path: Path) -> Optional[bytes]:
    if not path.is_file():
        return None
    from PIL import Image
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as exc:  # written atomically, so this is outside damage: render it again
        log.warning("%s is not a readable PNG (%s); rendering it again", path, exc)
        return None
    return data


def _error_reason(exc: BaseException) -> str:
    import torch
    if isinstance(exc, t2i.RenderRejected):
        return exc.reason
    return "oom" if isinstance(exc, torch.OutOfMemoryError) else "backend_error"


def _is_device_fault(exc: BaseException) -> bool:
    """A CUDA/accelerator error other than out-of-memory (it persists: every later job would fail too)."""
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", ())
    return (accel and isinstance(exc, accel)) or "CUDA error" in str(exc) or "device-side assert" in str(exc)


def make_process(s: Mapping, render_dir: Path, pipeline: Callable[[], Any], stats: dict):
    """The ``process`` function of :func:`cultureclip.curate.runner.run_stage`: renders jobs in batches, yields Outcomes.

    ``pipeline()`` returns the pipeline; it is called only when an image must actually be rendered,
    so a rerun with everything done never loads the model. ``stats`` collects ``backend_seconds``
    (time inside the pipeline) and ``reused`` (images found on disk).
    """
    import torch
    stats.setdefault("backend_seconds", 0.0)
    stats.setdefault("reused", 0)

    def record(job: Mapping, data: bytes) -> Outcome:
        key = job[schema.REC_KEY]
        rec = {k: job[k] for k in (schema.CONCEPT, schema.COUNTRY, schema.CATEGORY, schema.CAPTION,
                                   schema.PROMPT, schema.SEED_INDEX)}
        rec.update({schema.SEED: seed_from_key(key), schema.IMAGE_FILE: image_path(Path("."), key).as_posix(),
                    schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest(), schema.MODEL_ID: s["model"],
                    schema.WIDTH: s["width"],
                    schema.HEIGHT: s["height"], schema.STEPS: s["steps"], schema.GUIDANCE: s["guidance"],
                    schema.NEGATIVE_PROMPT: s["negative_prompt"]})
        return Outcome(key, record=rec)

    def attempt(batch: list[Mapping], pad_to: int) -> list:
        start = time.perf_counter()
        try:
            return t2i.render_batch(pipeline(), [j[schema.PROMPT] for j in batch],
                                    [seed_from_key(j[schema.REC_KEY]) for j in batch], s, pad_to)
        except RuntimeError as exc:  # OOM, CUDA and kernel errors: the job's, not the stage's
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [exc] * len(batch)
        finally:
            stats["backend_seconds"] += time.perf_counter() - start

    def save(key: str, img) -> bytes:
        data = t2i.png_bytes(img)
        write_atomic(image_path(render_dir, key), data)
        return data

    def start(batch: list[Mapping], pool) -> list:
        """Render a batch and start writing its images; returns (job, error or future) pairs."""
        results, tries = attempt(batch, s["batch_size"]), 1
        if s["batch_size"] > 1 and all(isinstance(r, Exception) and not isinstance(r, t2i.RenderRejected) for r in results):
            log.warning("render batch of %d failed (%s); retrying image by image", len(batch), results[0])
            # still padded to the full batch shape: an image's pixels never depend on the shape it ran in
            results, tries = [attempt([j], s["batch_size"])[0] for j in batch], 2
            persistent = [r for r in results if isinstance(r, RuntimeError) and _is_device_fault(r)]
            if persistent:
                raise RuntimeError(f"render: the device keeps failing ({type(persistent[0]).__name__}: "
                                   f"{persistent[0]}) after a retry; stopping the stage (finished images are "
                                   f"kept). Check the GPU, then run the same command again") from persistent[0]
        return [(job, res if isinstance(res, Exception) else pool.submit(save, job[schema.REC_KEY], res), tries)
                for job, res in zip(batch, results)]

    def finish(started: list) -> Iterator[Outcome]:
        for job, res, tries in started:
            if isinstance(res, t2i.RenderRejected):  # the same key always gives the same pixels: permanent
                yield Outcome(job[schema.REC_KEY], rejected=res.reason, message=str(res)[:2000])
            elif isinstance(res, Exception):
                yield Outcome(job[schema.REC_KEY], error=_error_reason(res), attempts=tries,
                              message=f"{type(res).__name__}: {res}"[:2000])
            else:  # the image is on disk (fsynced) before its record exists; a write error stops the stage
                yield record(job, res.result())

    def start_keeping(batch: list[Mapping], pool, previous: list):
        """:func:`start`; when it stops the stage, the previous batch's finished images are kept first."""
        try:
            return start(batch, pool)
        except BaseException:
            yield from finish(previous)
            raise
        yield  # a generator, for ``yield from``

    def process(jobs: Iterator[Mapping]) -> Iterator[Outcome]:
        # images of batch k are encoded and written (fsync: ~10 ms each) by threads while batch k+1
        # renders; batch k's records are yielded once its writes are done
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="render-write") as pool:
            batch: list[Mapping] = []
            previous: list = []
            for job in jobs:
                data = _readable_png(image_path(render_dir, job[schema.REC_KEY]))
                if data is not None:  # rendered before a crash lost its record: same key, same image
                    stats["reused"] += 1
                    yield record(job, data)
                    continue
                batch.append(job)
                if len(batch) == s["batch_size"]:
                    current = yield from start_keeping(batch, pool, previous)
                    yield from finish(previous)
                    previous, batch = current, []
            current = (yield from start_keeping(batch, pool, previous)) if batch else []
            yield from finish(previous)
            yield from finish(current)

    return process


def run_pairs(pairs: list[dict], cfg: Mapping, ctx: Context, pipeline: Any = None,
              upstream: tuple = ()) -> StageReport:
    """Render the jobs of ``pairs`` into ``ctx.stage_dir("render")`` (this process's job range).

    Args:
        pairs: twin caption-set records.
        cfg: the render config.
        ctx: the run context (out_dir, shard_index/num_shards, retry_errors, seed).
        pipeline: an already built pipeline to use instead of loading ``cfg.model``.
        upstream: the store the pairs come from (recorded in the view).
    """
    s = settings(cfg)
    render_dir = ctx.stage_dir(NAME)
    store = Store(render_dir, NAME)
    fp = plan_fingerprint(s, ctx.seed, upstream)
    done = up_to_date(store, fp, ctx.shard_index, ctx.num_shards)
    if done is not None:  # planned with these settings from this caption-set view, every job finished
        return done
    device = t2i.resolve_device(s["device"], ctx.shard_index)
    stats: dict = {}
    process = make_process(s, render_dir, (lambda: pipeline) if pipeline is not None
                           else (lambda: get_pipeline(s, device)), stats)
    report = run_stage(store, render_jobs(pairs, s, ctx.seed), process, shard_index=ctx.shard_index,
                       num_shards=ctx.num_shards, retry_errors=ctx.retry_errors, part_size=s["part_size"],
                       upstream=upstream, fingerprint=fp)
    report.extra.update({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})
    save_report(store, report)  # with the stage's own figures
    log.info("render %s: %d rendered, %d rejected, %d errors %s, %d done before, %.1f s (%.1f s in the pipeline)",
             report.job, report.ok, report.rejected, report.errors, report.errors_by_reason, report.done_before,
             report.seconds, stats["backend_seconds"])
    return report


def plan_fingerprint(s: Mapping, seed: int, upstream: tuple) -> str:
    """What the render plan depends on: the settings in the keys, images per caption, the template, the seed
    and the caption-set view."""
    return fingerprint({"model": s["model"], **{k: s[k] for k in KEY_SETTINGS}, "seed": seed,
                        "images_per_caption": s["images_per_caption"], "prompt_template": s["prompt_template"]},
                       upstream=upstream)


def run(cfg: Mapping, ctx: Context) -> StageReport:
    """The stage entry point: render the current twin caption sets of ``ctx.out_dir`` (refused while incomplete)."""
    from cultureclip.curate.stages.importer import load_pairs, pairs_store
    settings(cfg)  # a bad setting is named before anything is read
    source = pairs_store(ctx.out_dir)
    source.require_complete(NAME)
    done = up_to_date(Store(ctx.stage_dir(NAME), NAME), plan_fingerprint(settings(
        {k: v for k, v in cfg.items() if k != "ray"}), ctx.seed, (source,)), ctx.shard_index, ctx.num_shards)
    if done is not None:  # nothing to do: the caption sets are not even read
        return done
    pairs = load_pairs(ctx.out_dir, NAME)
    if cfg.get("ray"):
        from cultureclip.curate.backends import ray_render
        return ray_render.run_pairs(pairs, cfg, ctx, upstream=(pairs_store(ctx.out_dir),))
    return run_pairs(pairs, cfg, ctx, upstream=(pairs_store(ctx.out_dir),))


def store(out_dir: Path) -> Store:
    """The render store of a run."""
    return Store(Path(out_dir) / NAME, NAME)


def load_records(out_dir: Path) -> list[dict]:
    """The current render records of ``out_dir`` (sorted by key); image paths are relative to ``out_dir/render``."""
    return sorted(store(out_dir).records(), key=lambda r: r[schema.REC_KEY])


def card_section(out_dir: Path) -> dict:
    """Counts of the render stage for the dataset card."""
    st = store(out_dir).status()
    models = sorted({r[schema.MODEL_ID] for r in store(out_dir).records()})
    md = (f"{st['done']} images rendered with {', '.join(models) or 'no model'}; {st['rejected']} rejected"
          + (f" ({st['rejected_by_reason']})" if st["rejected"] else "") + f"; {st['errors']} renders failed"
          + (f" ({st['errors_by_reason']})" if st["errors"] else "") + ".")
    return {"title": "Render", "markdown": md,
            "data": {"images": st["done"], "rejected_by_reason": st["rejected_by_reason"], "errors": st["errors"],
                     "errors_by_reason": st["errors_by_reason"], "models": models}}
