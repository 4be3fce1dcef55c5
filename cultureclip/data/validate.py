"""Check twin-pair shards before training on them: every shard read to its end, every pair's members and json.

The checks are the training pipeline's own (:func:`cultureclip.data.stages.checked_pairs`): a shard
whose tar stream ends without the end-of-archive marker or holds fewer pairs than its ``sizes.json``
entry is ``truncated_shard``, any other tar read error ``bad_shard``, a pair without both images and
its json ``missing_member``, a json without the required texts ``bad_meta``. Images are not decoded.
``tools/make_shards.py --check`` runs it from the command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from cultureclip.data.pipeline import expand_shards, listed_sizes
from cultureclip.data.stages import checked_pairs
from cultureclip.images import SkipCounter, check_on_error


@dataclass
class ShardReport:
    """What :func:`check_shards` found: ``shards`` read, usable ``pairs``, skips by reason."""

    shards: int = 0
    pairs: int = 0
    skipped_by_reason: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped_by_reason


def check_shards(urls: Union[str, Sequence[str]], on_error: str = "skip",
                 skip_counter: Optional[SkipCounter] = None) -> ShardReport:
    """Read every shard of ``urls`` and check it as training would.

    Args:
        urls: shard urls or a spec for :func:`cultureclip.data.pipeline.expand_shards` (local
            files, ``pipe:`` commands and URLs alike).
        on_error: ``"skip"`` counts every problem (logged, one line each for the first ones);
            ``"raise"`` stops at the first damaged or truncated shard with a one-line
            :class:`~cultureclip.data.tarcheck.ShardDamage` naming it (bad pairs are still counted).
        skip_counter: counter to fill; a new one otherwise.

    Returns:
        A :class:`ShardReport`; ``report.ok`` is False when anything was skipped.
    """
    check_on_error(on_error)
    urls = expand_shards(urls)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    pairs = sum(1 for _ in checked_pairs(urls, counter, listed_sizes(urls), on_error))
    counter.flush()
    return ShardReport(shards=len(urls), pairs=pairs, skipped_by_reason=dict(sorted(counter.by_reason.items())))
