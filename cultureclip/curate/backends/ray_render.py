"""The render stage on a Ray cluster (many nodes, one actor per GPU), through Ray Data.

The driver is the render stage itself — it plans the jobs, opens the same store, skips finished keys,
writes parts — but its ``process`` (:func:`make_ray_process`) hands the unfinished jobs to
``ray.data.from_items(...).map_batches(RenderActor, ...)``: each actor loads the pipeline once and
renders batches with the same code as one process (``render_batches.make_process``), writing the PNGs
itself, and sends back only the outcomes. So resumption, parts, manifests and error files are exactly
those of a plain run, and a driver killed at any moment is resumed by the same command (images already written are reused).

``out_dir`` must be on a file system that every node sees at the same path (NFS, Lustre, a
mounted bucket): actors write images there. Ray is optional: ``pip install 'cultureclip[ray]'``.

Use it with the render config key ``ray`` (a mapping), e.g.
``python -m cultureclip.curate stage=render +render.ray.address=auto +render.ray.concurrency=16``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from cultureclip.curate.backends import render_batches, t2i
from cultureclip.curate.runner import Outcome

log = logging.getLogger(__name__)

RAY_DEFAULTS: dict[str, Any] = {
    "address": None,  # None: a local Ray instance (or the one already started); "auto": join a cluster
    "concurrency": None,  # actors; None: one per GPU of the cluster, or 1 without GPUs
    "num_gpus": None,  # GPUs per actor; None: 1 when the cluster has GPUs, else 0 (CPU actors)
    "jobs_per_batch": None,  # jobs per map_batches call; None: 4 x the render batch_size
}
_JOB = "job"  # the one column of the input rows: a job as JSON (arrow-safe whatever the field types)
_OUTCOME = "outcome"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the Ray render path needs ray[data] ({exc}); pip install 'cultureclip[ray]'") from exc
    return ray


class RenderActor:
    """A Ray Data actor: loads the pipeline once, renders batches of jobs, returns their outcomes."""

    def __init__(self, settings: Mapping, render_dir: str) -> None:
        self.settings = dict(settings)
        device = t2i.resolve_device(self.settings["device"])  # Ray sets CUDA_VISIBLE_DEVICES per actor
        pipe = render_batches.get_pipeline(self.settings, device)
        self.stats: dict = {}
        self.process = render_batches.make_process(self.settings, Path(render_dir), lambda: pipe, self.stats)

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        jobs = [json.loads(x) for x in batch[_JOB]]
        outcomes = [json.dumps({"key": o.key, "record": o.record, "error": o.error, "rejected": o.rejected,
                                "message": o.message, "attempts": o.attempts}) for o in self.process(iter(jobs))]
        return {_OUTCOME: outcomes}


def ray_options(cfg: Optional[Mapping], ray) -> dict:
    """The ``ray`` config with defaults; a ValueError names unknown keys."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(RAY_DEFAULTS))
    if unknown:
        raise ValueError(f"render.ray config: unknown keys {unknown}; known: {sorted(RAY_DEFAULTS)}")
    opts = {**RAY_DEFAULTS, **cfg}
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if opts["num_gpus"] is None:
        opts["num_gpus"] = 1 if gpus else 0
    if opts["concurrency"] is None:
        opts["concurrency"] = max(1, gpus // max(1, opts["num_gpus"])) if opts["num_gpus"] else 1
    return opts


def make_process(s: Mapping, render_dir: Path, opts: Mapping, stats: dict):
    """A ``process`` for :func:`cultureclip.curate.runner.run_stage` that renders on Ray actors."""
    ray = _import_ray()

    def process(jobs: Iterator[Mapping]) -> Iterator[Outcome]:
        todo = [{_JOB: json.dumps(dict(j))} for j in jobs]
        if not todo:
            return
        per_batch = opts["jobs_per_batch"] or 4 * s["batch_size"]
        actor_resources = {"num_gpus": opts["num_gpus"]} if opts["num_gpus"] else {"num_cpus": 1}
        ds = ray.data.from_items(todo).map_batches(
            RenderActor, fn_constructor_kwargs={"settings": dict(s), "render_dir": str(render_dir)},
            concurrency=opts["concurrency"], batch_size=per_batch, **actor_resources)
        seen: set[str] = set()
        for row in ds.iter_rows():
            o = json.loads(row[_OUTCOME])
            if o["key"] in seen:  # a block re-executed after a worker died: same key, same image
                stats["duplicates"] = stats.get("duplicates", 0) + 1
                continue
            seen.add(o["key"])
            yield Outcome(o["key"], record=o["record"], error=o["error"], rejected=o["rejected"],
                          message=o["message"], attempts=o["attempts"])

    return process


def make_ray_process(s: Mapping, render_dir: Path, stats: dict) -> tuple:
    """The render stage's ``process`` on Ray actors (Ray started or joined here) and the report's extra figures.

    ``s`` is the render settings; its ``ray`` mapping holds the Ray options (:data:`RAY_DEFAULTS`).
    """
    ray = _import_ray()
    ray_cfg = dict(s.get("ray") or {})
    if not ray.is_initialized():
        ray.init(address=ray_cfg.get("address"), include_dashboard=False)
    opts = ray_options(ray_cfg, ray)
    actor_settings = {k: v for k, v in s.items() if k != "ray"}
    return (make_process(actor_settings, render_dir, opts, stats),
            {"ray_actors": opts["concurrency"], "ray_gpus_per_actor": opts["num_gpus"]})
