"""What ``python -m cultureclip.curate`` does, without Hydra (the entry point composes the config).

``run(cfg)`` imports ``input=`` files into the ``pairs`` store, optionally starts the stand-in chat
server, runs the selected stages in pipeline order on one :class:`~cultureclip.curate.registry.Context`
and prints one line per stage report.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from cultureclip.curate import registry
from cultureclip.curate.stages.importer import import_pairs
from cultureclip.curate.runner import StageReport

log = logging.getLogger("cultureclip.curate")
FIRST_AFTER_PAIRS = "render"  # with input=, the stages that would make the caption pairs are not run
IMPORT_ONLY = "import"  # stage=import: only import input= (once, before many processes start on it)
GC = "gc"  # stage=gc: remove what no current view reaches (gc_dry_run=false to delete)


class CurateError(RuntimeError):
    """A run stopped for a reason the message explains (the entry point exits with it, no traceback)."""


def stage_list(stage: Union[str, Sequence[str]], cfg: Mapping[str, Any]) -> list[str]:
    """The stages to run, in pipeline order.

    Args:
        stage: a stage name, ``"all"``, ``"import"`` (no stage: only import ``input``), ``"gc"``, or a
            list of names (``stage=[render,judge]`` on the command line).
        cfg: the run's config: ``all`` means every registered stage that has a config group in it,
            from ``render`` on when ``input`` is given (the imported pairs replace the earlier stages).
    """
    if isinstance(stage, str) and stage == "all":
        names = [s for s in registry.ORDER if cfg.get(s) is not None]
        if cfg.get("input"):
            names = [s for s in names if registry.ORDER.index(s) >= registry.ORDER.index(FIRST_AFTER_PAIRS)]
        if not names:
            raise CurateError("stage=all found no stage config group in the config")
        return names
    if isinstance(stage, str) and stage == IMPORT_ONLY:
        if not cfg.get("input"):
            raise CurateError("stage=import needs input=<caption-pair file(s)>")
        return []
    if isinstance(stage, str) and stage == GC:
        return []
    names = [stage] if isinstance(stage, str) else list(stage)
    unknown = [s for s in names if s not in registry.STAGES]
    if unknown or not names:
        raise CurateError(f"unknown stage(s) {unknown or names}: choose among {list(registry.ORDER)}, 'all', "
                          f"'{IMPORT_ONLY}', '{GC}', or a list such as stage=[render,judge]")
    names = sorted(set(names), key=registry.ORDER.index)
    upstream = [s for s in names if registry.ORDER.index(s) < registry.ORDER.index(FIRST_AFTER_PAIRS)]
    if cfg.get("input") and upstream:
        raise CurateError(f"input= replaces the caption sets that stage(s) {upstream} make (the captions store): "
                          f"run those without input=, or import with stage=import / stage={FIRST_AFTER_PAIRS}...")
    return names


def standin_responders(stages: Iterable[str]) -> dict:
    """The stand-in server's responders: ``standin_responders()`` of every stage module that has one."""
    responders: dict = {}
    for name in stages:
        module = registry.stage_module(name)
        if hasattr(module, "standin_responders"):
            responders.update(module.standin_responders())
    return responders


def format_report(report: Optional[StageReport]) -> str:
    """One line per stage: jobs, done before, processed, ok, errors by reason, seconds, extras."""
    if report is None:
        return "(no report)"
    line = (f"{report.stage} [{report.job}]: {report.jobs_in_range} of {report.jobs_total} jobs in range, "
            f"{report.done_before} done before, {report.processed} processed: {report.ok} ok, "
            f"{report.rejected} rejected, {report.errors} errors")
    if report.rejected_by_reason:
        line += " (rejected: " + ", ".join(f"{k}: {v}" for k, v in report.rejected_by_reason.items()) + ")"
    if report.errors_by_reason:
        line += " (" + ", ".join(f"{k}: {v}" for k, v in report.errors_by_reason.items()) + ")"
    line += f", {report.seconds:.1f} s"
    if report.extra:
        line += "; " + ", ".join(f"{k}={v}" for k, v in report.extra.items())
    return line


def _inputs(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def run(cfg: Mapping[str, Any], echo=print) -> list[StageReport]:
    """Run a curation command from its (plain, resolved) config.

    Args:
        cfg: ``out_dir``, ``stage``, ``input`` (a file or list, imported first), ``on_error`` (of the
            import), ``shard_index``, ``num_shards``, ``retry_errors``, ``seed``, ``prompts_dir`` (prompt
            files that replace the shipped ones by name), ``gc_dry_run`` (of stage=gc), ``chat`` (run-wide
            backend settings: each one not null wins over the stages' own), ``standin`` (start the stand-in
            chat server and point ``chat.base_url``
            at it), ``standin_latency_s``, and one group per stage (``render``, ``judge``, ``export``...).
        echo: where report lines go.

    Returns:
        The stage reports, in order.

    Raises:
        CurateError, and whatever the stages raise (ValueError, FileNotFoundError, RuntimeError, ...).
    """
    out_dir = Path(cfg["out_dir"])
    stages = stage_list(cfg.get("stage", "all"), cfg)
    if cfg.get("stage") == GC:
        from cultureclip.curate.runner.gc import gc
        gc(out_dir, dry_run=bool(cfg.get("gc_dry_run", True)), echo=echo)
        return []
    from cultureclip.curate import prompts
    prompts.use_dir(cfg.get("prompts_dir"))
    num_shards = int(cfg.get("num_shards", 1))
    if num_shards > 1 and "export" in stages:
        raise CurateError(f"export runs once, after every job range (num_shards={num_shards}) of render and judge "
                          f"has finished: run stage=export with num_shards=1")
    ctx = registry.Context(out_dir=out_dir, shard_index=int(cfg.get("shard_index", 0)), num_shards=num_shards,
                           retry_errors=bool(cfg.get("retry_errors", True)), seed=int(cfg.get("seed", 0)),
                           chat=dict(cfg.get("chat") or {}))
    inputs = _inputs(cfg.get("input"))
    if inputs:
        rep = import_pairs(inputs, out_dir, on_error=cfg.get("on_error", "raise"))
        echo(f"pairs: {rep.pairs} twin pairs from {rep.rows} rows of {len(inputs)} file(s), {rep.skipped} skipped "
             f"-> {out_dir / 'pairs'}")
    reports = []
    with contextlib.ExitStack() as stack:
        if cfg.get("standin"):
            from cultureclip.curate.backends.standin import StandinServer
            server = StandinServer(standin_responders(stages), latency_s=float(cfg.get("standin_latency_s") or 0.0),
                                   keep_bodies=False)
            stack.enter_context(server)
            ctx.chat["base_url"] = server.url
            ctx.extra["standin"] = server
            echo(f"stand-in chat server (deterministic answers, not a model) at {server.url}")
        for name in stages:
            report = registry.run_stage(name, cfg.get(name) or {}, ctx)
            echo(format_report(report))
            reports.append(report)
    return reports


def failed_jobs(reports: Sequence[Optional[StageReport]]) -> int:
    """Jobs of this run that ended in an error (they are in the stages' errors files)."""
    return sum(r.errors for r in reports if r is not None)
