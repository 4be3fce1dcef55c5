"""Prompt files, loaded by name (``<name>.txt`` in this folder, or in the run's ``prompts_dir``).

A prompt's text is part of the key of every job that uses it (:class:`cultureclip.curate.runner.Job`
lists the names), so editing a file reruns exactly the jobs that use it; there is no version constant
to bump. ``prompts_dir`` (a run setting) names a folder whose ``<name>.txt`` files replace the shipped
ones of the same name, so prompts can be edited without touching the package. Templates use
``str.format`` fields; the item's own ``Label: value`` block is appended by the stage.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Union

_override: Optional[Path] = None


def use_dir(folder: Optional[Union[str, os.PathLike]]) -> None:
    """Read prompts from ``folder`` first (None: only the shipped ones)."""
    global _override
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"prompts_dir {str(folder)!r} is not a folder")
    _override = Path(folder) if folder is not None else None


def load(name: str) -> str:
    """The text of prompt ``name`` (trailing newlines removed); read on every call, so edits count.

    Raises:
        FileNotFoundError: no such prompt file (naming the folders looked in).
    """
    if _override is not None and (_override / f"{name}.txt").is_file():
        return (_override / f"{name}.txt").read_text(encoding="utf-8").rstrip("\n")
    path = resources.files(__name__).joinpath(f"{name}.txt")
    if not path.is_file():
        where = f"{_override} or " if _override is not None else ""
        raise FileNotFoundError(f"no prompt file {name}.txt in {where}{resources.files(__name__)}")
    return path.read_text(encoding="utf-8").rstrip("\n")


def texts(names: Iterable[str]) -> dict[str, str]:
    """``{name: text}`` of the named prompts (what a key hashes)."""
    return {n: load(n) for n in names}
