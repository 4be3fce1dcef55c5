"""Picklable pipeline stages for twin-pair shards (module-level classes, so they survive
forkserver/spawn workers): tar reading, seeded shuffle, decoding, collation and skip counting.

:mod:`cultureclip.data.pipeline` strings them together.
"""
from __future__ import annotations

import itertools
import json
import random
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys
from PIL import Image

from cultureclip import schema
from cultureclip.data.shards import validate_pair_meta
from cultureclip.data.tarcheck import ShardDamage, shard_files  # noqa: F401  (ShardDamage re-exported)
from cultureclip.images import (  # noqa: F401  (BAD_IMAGE, TOO_LARGE: reasons re-exported with the rest)
    BAD_IMAGE, DEFAULT_MAX_PIXELS, TOO_LARGE, ImageDecodeError, SkipCounter, check_on_error, decode_image)


# reasons a sample (or the rest of a shard) was skipped: keys of SkipCounter.by_reason
BAD_SHARD = "bad_shard"  # tar read error; the shard's remaining samples are lost, count unknown
# a shard cut short (no end-of-archive marker) or with fewer pairs than sizes.json lists: the missing
# pairs when sizes.json lists the shard, else one for the shard
TRUNCATED_SHARD = "truncated_shard"
MISSING_MEMBER = "missing_member"  # no pos image, no neg image or no json
BAD_META = "bad_meta"  # json does not parse or lacks a required text
# BAD_IMAGE: an image does not decode or the preprocess fails on it; TOO_LARGE: over the pixel cap


class NoProgressError(RuntimeError):
    """An endless (resampled) stream skipped sample after sample without yielding one."""


class ProgressGuard:
    """Stops an endless stream that makes no progress, instead of letting it skip forever.

    Every skipped sample, damaged shard or shard without any sample is one bad event; a good sample
    resets the run. ``limit`` bad events in a row raise :class:`NoProgressError` naming the shards.
    ``limit=None`` (evaluation passes, which end by themselves) never raises.
    """

    def __init__(self, limit: Optional[int] = None) -> None:
        self.limit = limit
        self.run = 0
        self.shards: dict[str, None] = {}  # ordered set of the shards of the current run

    def good(self) -> None:
        self.run = 0
        self.shards.clear()

    def bad(self, url: Optional[str], counter: SkipCounter) -> None:
        self.run += 1
        self.shards[str(url)] = None
        if self.limit is not None and self.run >= self.limit:
            counter.flush()
            names = list(self.shards)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise NoProgressError(
                f"no usable twin pair in the last {self.run} samples/shards read (skipped so far: {counter.by_reason}; "
                f"latest: {counter.example}); shards involved: {', '.join(names[:5])}{more}. Check these shards "
                f"(a stream that never yields a pair would otherwise skip forever)")


def _list_members(raw: Mapping) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


class TarSamples:
    """Stage: shard dicts ``{"url": ...}`` -> raw samples ``{"__key__", "pos.jpg": bytes, ...}``.

    Each shard is read on its own (:func:`cultureclip.data.tarcheck.shard_files`, then webdataset's
    ``group_by_keys``), so key grouping restarts at every shard: the partial last sample of a
    truncated shard can never merge with a same-key sample of the next shard (keys are unique within
    a writer, not across datasets joined with ``::``). A shard whose stream ends without the tar
    end-of-archive marker (cut at a member boundary, inside a header or inside a member's data) is
    counted as ``TRUNCATED_SHARD``: one per pair missing against its ``sizes.json`` entry
    (``expected``) when it has one, else one for the shard. A shard that ends properly with fewer
    pairs than ``expected`` is counted the same way; any other read error is one ``BAD_SHARD``.

    Args:
        counter: the skip counter to fill.
        expected: ``{url: pairs}`` from ``sizes.json`` (:func:`cultureclip.data.pipeline.listed_sizes`).
        guard: stops an endless stream that reads only damaged or empty shards.
        on_error: ``"skip"`` counts a damaged shard and goes on; ``"raise"`` raises
            :class:`~cultureclip.data.tarcheck.ShardDamage` (a ValueError) naming it.
    """

    def __init__(self, counter: SkipCounter, expected: Optional[Mapping[str, int]] = None,
                 guard: Optional[ProgressGuard] = None, on_error: str = "skip") -> None:
        check_on_error(on_error)
        self.counter = counter
        self.expected = dict(expected or {})
        self.guard = guard or ProgressGuard()
        self.on_error = on_error
        self._warned: set = set()  # shards whose damage was logged on a line of its own

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url, n, errors = shard.get("url"), 0, []
            # the last, partial sample of a damaged shard is still yielded (and then counted by what it lacks)
            files = _until_damage(shard_files(url, TRUNCATED_SHARD, BAD_SHARD), errors)
            # a member grouping error (a duplicate name) skips that member
            for sample in group_by_keys(files, handler=lambda exn: errors.append(exn) or True):
                n += 1
                yield sample
            damage = next((e for e in errors if isinstance(e, ShardDamage)), None)
            if damage is None and errors:
                damage = ShardDamage.of(url, BAD_SHARD, f"damaged, skipped members of it: {errors[0]!r}")
            if damage is not None and self.on_error == "raise":
                raise damage
            listed = self.expected.get(url)
            holds = f"it holds {n} of the {listed} pairs its {schema.SIZES_FILE} lists" if listed is not None else ""
            missing = listed - n if listed is not None else 0
            if damage is None and missing > 0:  # ended properly, but short of its sizes.json entry
                damage = ShardDamage.of(url, TRUNCATED_SHARD, holds)
                if self.on_error == "raise":
                    raise damage
            elif damage is not None and damage.reason == TRUNCATED_SHARD:
                damage.detail += f"; {holds}" if missing > 0 else f"; {n} pair(s) read before the cut"
            if damage is not None:  # a truncated shard counts its missing pairs when sizes.json knows them
                count = max(missing, 1) if damage.reason == TRUNCATED_SHARD else 1
                self.counter.add(damage.reason, f"shard {url}", damage.detail, count=count,
                                 force_log=url not in self._warned)
                self._warned.add(url)  # once per shard: a resampled stream meets the same shard again
            if (damage is not None and damage.reason == BAD_SHARD) or n == 0:
                self.guard.bad(url, self.counter)


def _until_damage(files: Iterator[dict], errors: list) -> Iterator[dict]:
    """``files`` until one raises :class:`ShardDamage`, which is appended to ``errors``."""
    try:
        yield from files
    except ShardDamage as exn:
        errors.append(exn)


class SeededShuffle(wds.PipelineStage):
    """Stage: sample shuffle with a buffer, seeded by (seed, epoch, rank, worker) for repeatable runs."""

    def __init__(self, bufsize: int, initial: int, seed: int = 0) -> None:
        self.bufsize, self.initial, self.seed = bufsize, initial, seed
        self.epoch = -1  # like ResampledShards: +1 on every pass, so the first pass is epoch 0

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, rank, worker))
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(src)


class _Skip(Exception):
    """Raised by :func:`split_pair` and DecodeTwin.decode with ``args = (reason, detail)``."""


def split_pair(raw: Mapping) -> tuple[tuple[str, bytes], tuple[str, bytes], dict]:
    """``((pos member, bytes), (neg member, bytes), checked meta)`` of a raw sample; raises ``_Skip``.

    The members and the json are checked here, before the (slower) image decode; the validation
    vocabulary is read with the same checks (:func:`cultureclip.data.pipeline.read_concept_names`).
    """
    pos = next(((m, raw[m]) for m in schema.POS_IMAGE_MEMBERS if m in raw), None)
    neg = next(((m, raw[m]) for m in schema.NEG_IMAGE_MEMBERS if m in raw), None)
    if pos is None or neg is None or schema.META not in raw:
        raise _Skip(MISSING_MEMBER, f"needs a pos image, a neg image and {schema.META}, has {_list_members(raw)}")
    try:
        meta = json.loads(raw[schema.META])
        if not isinstance(meta, dict):
            raise ValueError(f"expected a json object, got {type(meta).__name__}")
        meta = validate_pair_meta(meta, where=f"pair {raw.get(schema.KEY)}")
    except ValueError as exn:  # includes JSONDecodeError, UnicodeDecodeError and RecordError
        raise _Skip(BAD_META, str(exn)) from exn
    return pos, neg, meta


def skip_where(raw: Mapping) -> str:
    return f"sample {raw.get(schema.KEY)} from {raw.get(schema.URL)}"


def checked_pairs(urls: Iterable[str], counter: SkipCounter, expected: Optional[Mapping[str, int]] = None,
                  on_error: str = "skip") -> Iterator[tuple[dict, dict]]:
    """``(raw sample, checked meta)`` of every usable pair of ``urls``, read and checked as the pipeline
    does (:class:`TarSamples` with the ``sizes.json`` counts ``expected``, :func:`split_pair`); images
    are not decoded. Skips go into ``counter``."""
    for raw in TarSamples(counter, expected, on_error=on_error)([{"url": u} for u in urls]):
        try:
            meta = split_pair(raw)[2]
        except _Skip as skip:
            counter.add(skip.args[0], skip_where(raw), skip.args[1])
            continue
        yield raw, meta


class DecodeTwin:
    """Stage: raw samples -> ``{KEY, POS_IMAGE, NEG_IMAGE: [3,H,W], the four texts, optional meta}``.

    A sample with a missing member, bad json, an undecodable image, an image over ``max_pixels``
    (:mod:`cultureclip.images`) or a failing preprocess is counted with its key, shard url and
    reason, and dropped; ``guard`` stops an endless stream in which nothing decodes.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], counter: SkipCounter,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, guard: Optional[ProgressGuard] = None) -> None:
        self.preprocess = preprocess
        self.counter = counter
        self.max_pixels = max_pixels
        self.guard = guard or ProgressGuard()

    def pixels(self, raw: dict, member: str, data: bytes) -> torch.Tensor:
        """Decode one image member and preprocess it: ``[3, H, W]``; raises ``_Skip`` with the reason."""
        try:
            image = decode_image(data, f"{raw.get(schema.URL)} sample {raw.get(schema.KEY)} member {member}",
                                 self.max_pixels)
        except ImageDecodeError as exn:
            raise _Skip(exn.reason, f"{member}: {exn.detail}") from exn
        try:
            return self.preprocess(image)  # [3, H, W]
        except Exception as exn:  # data-dependent transform failures, e.g. a degenerate size
            raise _Skip(BAD_IMAGE, f"{member}: preprocess failed: {exn!r}") from exn

    def decode(self, raw: dict) -> dict:
        pos, neg, meta = split_pair(raw)
        images = {key: self.pixels(raw, member, data)
                  for key, (member, data) in ((schema.POS_IMAGE, pos), (schema.NEG_IMAGE, neg))}
        return {schema.KEY: raw.get(schema.KEY), **images, **meta}

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for raw in samples:
            try:
                sample = self.decode(raw)
            except _Skip as skip:
                reason, detail = skip.args
                self.counter.add(reason, skip_where(raw), detail)
                self.guard.bad(raw.get(schema.URL), self.counter)
                continue
            self.guard.good()
            yield sample


class TwinCollate:
    """Collation: a list of decoded samples -> one twin batch (see :func:`build_twin_pipeline`).

    Tokenizing here, once per batch, is much faster than once per sample.
    """

    def __init__(self, tokenizer: Callable, caption_context_length: Optional[int] = None,
                 concept_context_length: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.context_lengths = {schema.CAPTION_KEYS: caption_context_length,
                                schema.CONCEPT_KEYS: concept_context_length}

    def __call__(self, samples: list[dict]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in schema.IMAGE_KEYS}  # [B, 3, H, W]
        for (pos_key, neg_key), context_length in self.context_lengths.items():
            pos, neg = [s[pos_key] for s in samples], [s[neg_key] for s in samples]
            # None: the tokenizer's own default, and no kwarg, which plain tokenize functions may lack
            kwargs = {} if context_length is None else {"context_length": context_length}
            tokens = self.tokenizer(pos + neg, **kwargs)  # [2B, L]: one call for both twins
            batch[pos_key], batch[neg_key] = tokens[:len(samples)], tokens[len(samples):]  # [B, L] each
            batch[pos_key + schema.TEXT_SUFFIX], batch[neg_key + schema.TEXT_SUFFIX] = pos, neg
        batch[schema.KEY] = [s[schema.KEY] for s in samples]
        for field in schema.OPTIONAL_FIELDS:
            batch[field] = [s.get(field) for s in samples]
        return batch


class AttachSkipCount:
    """Stage: set ``batch[schema.N_SKIPPED]`` to the skips since the previous batch.

    One batch is held back so that the last batch is sent only after the stream ended: skips after
    the last good sample of a finite (evaluation) stream are still reported. If the stream ends with
    skips unreported and no batch to carry them (a worker or split with no valid sample), a *skip
    report* ``{schema.N_SKIPPED: n}`` is yielded instead: no images, no texts; recognise it with
    :func:`cultureclip.schema.is_skip_report`, count its skips and otherwise ignore it.
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, batches: Iterable[dict]) -> Iterator[dict]:
        pending = None
        for batch in itertools.chain(batches, [None]):  # None: the stream ended, send the last one
            if pending is not None:
                pending[schema.N_SKIPPED] = self.counter.take_unreported()
                yield pending
            pending = batch
        self.counter.flush()  # the end of a finite stream: summarise skips not logged yet
        left = self.counter.take_unreported()
        if left:
            yield {schema.N_SKIPPED: left}
