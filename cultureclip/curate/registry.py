"""The curation stages, by name, in pipeline order, and what every stage gets to run.

A stage is a module with ``run(cfg, ctx) -> StageReport``: ``cfg`` is the stage's config group
(a mapping), ``ctx`` the :class:`Context` shared by all stages. A stage reads its input from the
stores of earlier stages in ``ctx.out_dir`` and writes its own store ``ctx.out_dir / <name>``.
A stage module may also define ``card_section(out_dir) -> dict`` (title, markdown, data) for the
dataset card. Modules are imported on use, so a missing optional package only matters to the stage
that needs it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

STAGES = {
    "concepts": "cultureclip.curate.stages.concepts",
    "dedup": "cultureclip.curate.stages.dedup",
    "twins": "cultureclip.curate.stages.twins",
    "captions": "cultureclip.curate.stages.captions",
    "render": "cultureclip.curate.stages.render",
    "judge": "cultureclip.curate.stages.judge",
    "export": "cultureclip.curate.stages.export",
}
ORDER = tuple(STAGES)


@dataclass
class Context:
    """What every stage of one curation run shares.

    Attributes:
        out_dir: the run's folder; stage ``s`` writes ``out_dir / s``.
        shard_index, num_shards: this process's job range (:func:`cultureclip.curate.runner.job_range`).
        retry_errors: redo jobs that failed in an earlier run.
        seed: the run's base seed (render seeds and export sampling derive from it and the record keys).
        chat: the run-wide OpenAI-compatible backend settings (``base_url``, ``model``, ``api_key_env``, ...):
            every one that is not None overrides the stage's own ``chat`` setting of that key
            (:func:`cultureclip.curate.backends.chat.effective_chat`); the stand-in's URL goes here.
        extra: anything an entry point wants to hand to the stages (e.g. a started stand-in server).
    """

    out_dir: Path
    shard_index: int = 0
    num_shards: int = 1
    retry_errors: bool = True
    seed: int = 0
    chat: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        """The store folder of stage ``name``."""
        return Path(self.out_dir) / name


def stage_module(name: str) -> ModuleType:
    """Import the module of stage ``name``; a ValueError lists the known stages."""
    if name not in STAGES:
        raise ValueError(f"unknown curation stage {name!r}; the stages are {list(ORDER)}")
    return importlib.import_module(STAGES[name])


def run_stage(name: str, cfg: Any, ctx: Context) -> Optional[Any]:
    """Run one stage and return its report."""
    return stage_module(name).run(cfg, ctx)
