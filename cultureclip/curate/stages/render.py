"""The render stage: one image per (concept, country, category, caption, seed), with diffusers.

Jobs come from the twin caption sets (``pairs`` or ``captions`` store): every caption of both sides of
every twin pair, ``images_per_caption`` seeds each. A caption shared by several twin pairs (the same
concept twinned with several others) is one job, rendered once; export builds pairs later.

Reproducibility: each image's initial noise comes from its own CPU ``torch.Generator`` seeded with
``seed_from_key(key)`` (CPU, so the noise is the same on any GPU). Prompts are batched
(``batch_size``); a short batch is padded to the full size with copies of its last prompt, so every
image is computed in a batch of the same shape and its pixels do not depend on which other captions
shared its batch (checked bit-exactly in the tests). Bit-exact equality across runs still needs the
same ``batch_size``, dtype, hardware and library versions (batch size and device are not in the keys:
changing them reuses every finished image).

Files: ``<out_dir>/render/images/<key[:2]>/<key>.png``, written atomically before the record is
handed to the store; after a crash, an image whose record was lost is read back instead of rendered
again. NaN pixels and a safety checker's flag are rejections (``nan_image``, ``nsfw``: the same key
gives the same pixels, so they are final); out of memory and other backend errors are errors
(``oom``, ``backend_error``), retried on the next run; never a blank image. A batch that fails is
retried image by image first, at the same batch shape; a device error that persists then stops the
stage. The rendering itself is :mod:`cultureclip.curate.backends.render_batches` (one process) or
:mod:`cultureclip.curate.backends.ray_render` (Ray actors).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from cultureclip import schema
from cultureclip.curate.backends import t2i
from cultureclip.curate.backends.render_batches import (IMAGES_DIR, get_pipeline, image_path,  # noqa: F401
                                                        make_process)
from cultureclip.curate.registry import Context
from cultureclip.curate.runner import Job, StageReport, Store, fingerprint, run_stage, save_report, up_to_date
from cultureclip.curate.stages.settings import Render as RenderSettings, typed

log = logging.getLogger(__name__)

NAME = "render"
DEFAULTS: dict[str, Any] = asdict(RenderSettings())  # the defaults live in stages/settings.py
SIDES = ((schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CAPTIONS),
         (schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CAPTIONS))


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
    stats: dict = {}
    if s["ray"]:  # the same jobs and store; the images are made by Ray actors
        from cultureclip.curate.backends import ray_render
        process, info = ray_render.make_ray_process(s, render_dir, stats)
        stats.update(info)
    else:
        device = t2i.resolve_device(s["device"], ctx.shard_index)
        process = make_process(s, render_dir, (lambda: pipeline) if pipeline is not None
                               else (lambda: get_pipeline(s, device)), stats)
    # the jobs as a function: the runner streams them (keys first, then the dicts of the unfinished ones)
    report = run_stage(store, lambda: render_jobs(pairs, s, ctx.seed), process, shard_index=ctx.shard_index,
                       num_shards=ctx.num_shards, retry_errors=ctx.retry_errors, part_size=s["part_size"],
                       upstream=upstream, fingerprint=fp)
    report.extra.update({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})
    save_report(store, report)  # with the stage's own figures
    log.info("render %s: %d rendered, %d rejected, %d errors %s, %d done before, %.1f s (%.1f s in the pipeline)",
             report.job, report.ok, report.rejected, report.errors, report.errors_by_reason, report.done_before,
             report.seconds, stats.get("backend_seconds", 0.0))
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
    return run_pairs(load_pairs(ctx.out_dir, NAME), cfg, ctx, upstream=(source,))


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
