"""Quiet logs: third-party INFO noise off by default, our own repeated notices once per run.

Entry points call :func:`quiet` after Hydra has set up logging, with ``hydra.verbose``: ``true``
brings every logger back, a logger name (or a list: ``hydra.verbose=[faiss,httpx]``) brings back
those. Library code calls :func:`once` for a notice that every object of a kind would repeat (a
missing API-key variable is the same fact for every stage of a run).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable, Optional, Union

# loggers whose INFO lines say nothing a user acts on: faiss's search for CPU-specific builds, one
# line per HTTP request, per plot call, Lightning's hardware lines, tips and seed announcement
NOISY = ("faiss", "faiss.loader", "httpx", "httpx2", "httpcore", "openai", "matplotlib", "PIL",
         "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero",
         "lightning.fabric.utilities.rank_zero")

_seen: set = set()
_seen_lock = threading.Lock()


def _names(verbose: Union[bool, str, Iterable[str], None]) -> Optional[set]:
    """None when everything is verbose, else the set of logger names asked for."""
    if verbose is True:
        return None
    if not verbose:
        return set()
    return {verbose} if isinstance(verbose, str) else {str(v) for v in verbose}


def quiet(verbose: Union[bool, str, Iterable[str], None] = False) -> list[str]:
    """Set the :data:`NOISY` loggers to WARNING, except those that ``verbose`` names.

    Args:
        verbose: ``hydra.verbose`` (``false``, ``true``, a logger name or a list of names). A name
            also keeps its children (``lightning`` keeps ``lightning.pytorch.utilities.rank_zero``).

    Returns:
        The loggers quieted.
    """
    names = _names(verbose)
    if names is None:
        return []
    quieted = []
    for name in NOISY:
        if any(name == n or name.startswith(n + ".") for n in names):
            continue
        logging.getLogger(name).setLevel(logging.WARNING)
        quieted.append(name)
    return quieted


def hydra_verbose() -> Any:
    """``hydra.verbose`` of the running Hydra app (False outside one). Imports Hydra only when it is loaded."""
    import sys
    if "hydra" not in sys.modules:
        return False
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().verbose if HydraConfig.initialized() else False


def once(logger: logging.Logger, level: int, key: str, msg: str, *args: Any) -> bool:
    """Log ``msg % args`` the first time ``key`` is seen in this process; True when it was logged."""
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, msg, *args)
    return True
