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
from pathlib import Path
from typing import Any, Callable, Optional

from cultureclip import schema
from cultureclip.curate import t2i
from cultureclip.curate.records import Outcome, StageReport, StageStore, record_key, seed_from_key, write_atomic
from cultureclip.curate.registry import Context

log = logging.getLogger(__name__)

NAME = "render"
PROMPT_VERSION = "render-v1"  # bump when the way prompts are built from a template changes
IMAGES_DIR = "images"
DEFAULTS: dict[str, Any] = {
    "model": t2i.DEFAULT_MODEL, "dtype": "float16", "device": "auto",
    "width": 512, "height": 512, "steps": 4, "guidance": 0.0, "negative_prompt": None,
    "images_per_caption": 1, "batch_size": 4,
    "prompt_template": "{caption}",  # fields: caption, concept, country, category
    "prompt_version": PROMPT_VERSION, "max_sequence_length": None,  # SD3's T5 length; null: its default
    "part_size": 64, "cpu_offload": False, "variant": None, "local_files_only": False,
    "ray": None,  # a mapping: render on a Ray cluster (cultureclip.curate.ray_render)
}
SIDES = ((schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CAPTIONS),
         (schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CAPTIONS))
_PIPELINES: dict[tuple, Any] = {}  # loaded once per process: reruns and stage=all reuse the model


def settings(cfg: Mapping) -> dict:
    """The stage config with defaults filled in; a ValueError names an unknown or invalid key."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"render config: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **{k: cfg[k] for k in cfg}}
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


def store_settings(s: Mapping) -> dict:
    """What the stored records depend on: a rerun into the same folder with other values is refused."""
    return {k: s[k] for k in ("model", "prompt_version", "prompt_template", "width", "height", "steps",
                              "guidance", "negative_prompt", "dtype", "max_sequence_length")}


def render_jobs(pairs: list[dict], cfg: Mapping, seed: int = 0) -> list[dict]:
    """The render jobs of a list of twin caption-set records, each unique job once, sorted by key.

    Args:
        pairs: records with the ``pos_*``/``neg_*`` concept, country and captions fields and ``category``.
        cfg: the render config (see :data:`DEFAULTS`).
        seed: the run's base seed; image ``i`` of a caption uses seed ``seed + i`` in its key.

    Returns:
        Job dicts with ``key``, concept, country, category, caption, prompt, seed_index and ``seed`` (the
        generator seed, derived from the key).
    """
    s = settings(cfg)
    jobs: dict[str, dict] = {}
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
                    key = record_key(NAME, {**base, schema.PROMPT: prompt, schema.WIDTH: s["width"],
                                            schema.HEIGHT: s["height"], schema.STEPS: s["steps"],
                                            schema.GUIDANCE: s["guidance"],
                                            schema.NEGATIVE_PROMPT: s["negative_prompt"]},
                                     model=s["model"], prompt_version=s["prompt_version"], seed=seed + i)
                    jobs[key] = {schema.REC_KEY: key, **base, schema.PROMPT: prompt,
                                 schema.SEED_INDEX: i, schema.SEED: seed_from_key(key)}
    return [jobs[k] for k in sorted(jobs)]


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


def make_process(s: Mapping, render_dir: Path, pipeline: Callable[[], Any], stats: dict):
    """The ``process`` function of :meth:`StageStore.run`: renders jobs in batches, yields Outcomes.

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
                                   schema.PROMPT, schema.SEED_INDEX, schema.SEED)}
        rec.update({schema.IMAGE_FILE: image_path(Path("."), key).as_posix(),
                    schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest(), schema.MODEL_ID: s["model"],
                    schema.PROMPT_VERSION: s["prompt_version"], schema.WIDTH: s["width"],
                    schema.HEIGHT: s["height"], schema.STEPS: s["steps"], schema.GUIDANCE: s["guidance"],
                    schema.NEGATIVE_PROMPT: s["negative_prompt"]})
        return Outcome(key, record=rec)

    def attempt(batch: list[Mapping], pad_to: int) -> list:
        start = time.perf_counter()
        try:
            return t2i.render_batch(pipeline(), [j[schema.PROMPT] for j in batch], [j[schema.SEED] for j in batch],
                                s, pad_to)
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
            results, tries = [attempt([j], 1)[0] for j in batch], 2
        return [(job, res if isinstance(res, Exception) else pool.submit(save, job[schema.REC_KEY], res), tries)
                for job, res in zip(batch, results)]

    def finish(started: list) -> Iterator[Outcome]:
        for job, res, tries in started:
            if isinstance(res, Exception):
                yield Outcome(job[schema.REC_KEY], error=_error_reason(res), attempts=tries,
                              message=f"{type(res).__name__}: {res}"[:2000])
            else:  # the image is on disk (fsynced) before its record exists; a write error stops the stage
                yield record(job, res.result())

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
                    current = start(batch, pool)
                    yield from finish(previous)
                    previous, batch = current, []
            current = start(batch, pool) if batch else []
            yield from finish(previous)
            yield from finish(current)

    return process


def run_pairs(pairs: list[dict], cfg: Mapping, ctx: Context, pipeline: Any = None) -> StageReport:
    """Render the jobs of ``pairs`` into ``ctx.stage_dir("render")`` (this process's job range).

    Args:
        pairs: twin caption-set records.
        cfg: the render config.
        ctx: the run context (out_dir, shard_index/num_shards, retry_errors, seed).
        pipeline: an already built pipeline to use instead of loading ``cfg.model``.
    """
    s = settings(cfg)
    jobs = render_jobs(pairs, s, ctx.seed)
    render_dir = ctx.stage_dir(NAME)
    store = StageStore(render_dir, NAME, store_settings(s))
    device = t2i.resolve_device(s["device"], ctx.shard_index)
    stats: dict = {}
    process = make_process(s, render_dir, (lambda: pipeline) if pipeline is not None
                           else (lambda: get_pipeline(s, device)), stats)
    report = store.run(jobs, process, shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                       retry_errors=ctx.retry_errors, part_size=s["part_size"])
    report.extra.update({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})
    store.save_report(report)  # with the stage's own figures
    log.info("render %s: %d rendered, %d errors %s, %d done before, %.1f s (%.1f s in the pipeline)",
             report.job, report.ok, report.errors, report.errors_by_reason, report.done_before,
             report.seconds, stats["backend_seconds"])
    return report


def run(cfg: Mapping, ctx: Context) -> StageReport:
    """The stage entry point: render the twin caption sets found in ``ctx.out_dir``."""
    from cultureclip.curate.importer import load_pairs
    pairs = load_pairs(ctx.out_dir)
    if cfg.get("ray"):
        from cultureclip.curate import ray_render
        return ray_render.run_pairs(pairs, cfg, ctx)
    return run_pairs(pairs, cfg, ctx)


def load_records(out_dir: Path) -> list[dict]:
    """The render records of ``out_dir`` (sorted by key); the image path is relative to ``out_dir/render``."""
    return StageStore(Path(out_dir) / NAME, NAME).records()


def card_section(out_dir: Path) -> dict:
    """Counts of the render stage for the dataset card."""
    store = StageStore(Path(out_dir) / NAME, NAME)
    records, errors = store.records(), store.errors()
    by_reason: dict[str, int] = {}
    for e in errors.values():
        by_reason[e[schema.REC_ERROR]] = by_reason.get(e[schema.REC_ERROR], 0) + 1
    models = sorted({r[schema.MODEL_ID] for r in records})
    md = (f"{len(records)} images rendered with {', '.join(models) or 'no model'}; "
          f"{len(errors)} renders failed" + (f" ({by_reason})" if by_reason else "") + ".")
    return {"title": "Render", "markdown": md,
            "data": {"images": len(records), "errors": len(errors), "errors_by_reason": by_reason,
                     "models": models}}
