"""Rendering a stream of render jobs into PNG files and outcomes: batches, reuse, failures.

The render stage (:mod:`cultureclip.curate.stages.render`) plans the jobs; this module is the backend
side that turns them into images, in one process or in Ray actors (:mod:`.ray_render`). Each image's
initial noise comes from its own CPU generator seeded from its key; a short batch is padded to the full
batch shape, and so is the image-by-image retry after a failed batch, so that an image's pixels never
depend on which other captions shared its batch. A device error that persists after that retry stops
the stage (finished images are kept): every later job would fail the same way.
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
from cultureclip.curate.backends import t2i
from cultureclip.curate.runner import Outcome, seed_from_key, write_atomic

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
_PIPELINES: dict[tuple, Any] = {}  # loaded once per process: reruns and stage=all reuse the model


def image_file(key: str) -> str:
    """Where the image of ``key`` lives, relative to the render folder: ``images/<key[:2]>/<key>.png``."""
    return f"{IMAGES_DIR}/{key[:2]}/{key}.png"


def image_path(render_dir: Path, key: str) -> Path:
    """The image of ``key`` under the render folder (:func:`image_file`)."""
    return Path(render_dir) / image_file(key)


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
    """The ``process`` of :func:`cultureclip.curate.runner.run_stage`: renders jobs in batches, yields Outcomes.

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
        rec.update({schema.SEED: seed_from_key(key), schema.IMAGE_FILE: image_file(key),
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
        if s["batch_size"] > 1 and all(isinstance(r, Exception) and not isinstance(r, t2i.RenderRejected)
                                       for r in results):
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
