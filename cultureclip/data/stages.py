"""Picklable pipeline stages for twin-pair shards (module-level classes, so they survive
forkserver/spawn workers): tar reading, seeded shuffle, decoding, collation and skip counting.

:mod:`cultureclip.data.pipeline` strings them together.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
from typing import Callable, Iterable, Iterator, Optional

import torch
import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.data.shards import validate_pair_meta

log = logging.getLogger(__name__)

# reasons a sample (or the rest of a shard) was skipped: keys of SkipCounter.by_reason
BAD_SHARD = "bad_shard"  # tar read error; the shard's remaining samples are lost, count unknown
MISSING_MEMBER = "missing_member"  # no pos image, no neg image or no json
BAD_META = "bad_meta"  # json does not parse or lacks a required text
BAD_IMAGE = "bad_image"  # an image does not decode or the preprocess fails on it

class SkipCounter:
    """Running count of skipped samples (and damaged shards), ``by_reason`` and ``total``.

    It travels inside the pipeline, so each DataLoader worker counts on its own copy: the caller's
    object is exact for num_workers=0 only. With workers, sum ``batch[schema.N_SKIPPED]`` instead.
    """

    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}
        self._reported = 0

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    def take_unreported(self) -> int:
        """Skips since the previous call (the next batch's ``N_SKIPPED``)."""
        new, self._reported = self.total - self._reported, self.total
        return new


class _ErrorList(list):
    """webdataset error handler: keep the error and go on (past the member, or to the shard's end)."""

    def __call__(self, exn: Exception) -> bool:
        self.append(exn)
        return True


class TarSamples:
    """Stage: shard dicts ``{"url": ...}`` -> raw samples ``{"__key__", "pos.jpg": bytes, ...}``.

    Each shard gets its own ``wds.tarfile_samples`` call, so key grouping restarts at every shard:
    the partial last sample of a truncated shard can never merge with a same-key sample of the next
    shard (keys are unique within a writer, not across datasets joined with ``::``).
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            errors = _ErrorList()
            yield from wds.tarfile_samples([shard], handler=errors)
            if errors:  # one count per damaged shard, however many errors it raised
                self.counter.add(BAD_SHARD)
                log.warning("shard %s is damaged, skipped the rest of it: %r", shard.get("url"), errors[0])


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
    """Raised by DecodeTwin.decode with ``args = (reason, detail)``."""


class DecodeTwin:
    """Stage: raw samples -> ``{KEY, POS_IMAGE, NEG_IMAGE: [3,H,W], the four texts, optional meta}``.

    A sample with a missing member, bad json, an undecodable image or a failing preprocess is
    logged with its key, shard url and reason, counted and dropped.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], counter: SkipCounter) -> None:
        self.preprocess = preprocess
        self.counter = counter

    def decode(self, raw: dict) -> dict:
        pos = next((raw[m] for m in schema.POS_IMAGE_MEMBERS if m in raw), None)
        neg = next((raw[m] for m in schema.NEG_IMAGE_MEMBERS if m in raw), None)
        if pos is None or neg is None or schema.META not in raw:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise _Skip(MISSING_MEMBER, f"needs a pos image, a neg image and {schema.META}, has {members}")
        try:  # the json is checked before the (slower) image decode
            meta = json.loads(raw[schema.META])
            if not isinstance(meta, dict):
                raise ValueError(f"expected a json object, got {type(meta).__name__}")
            meta = validate_pair_meta(meta, where=f"pair {raw.get(schema.KEY)}")
        except ValueError as exn:  # includes JSONDecodeError, UnicodeDecodeError and RecordError
            raise _Skip(BAD_META, str(exn)) from exn
        try:
            # convert() forces the full decode, so a truncated image fails here
            images = {k: self.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))  # [3, H, W]
                      for k, data in ((schema.POS_IMAGE, pos), (schema.NEG_IMAGE, neg))}
        except Exception as exn:  # PIL raises several types (OSError, SyntaxError, ValueError, ...)
            raise _Skip(BAD_IMAGE, repr(exn)) from exn
        return {schema.KEY: raw.get(schema.KEY), **images, **meta}

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for raw in samples:
            try:
                sample = self.decode(raw)
            except _Skip as skip:
                reason, detail = skip.args
                self.counter.add(reason)
                log.warning("skipped sample %s from %s (%s): %s", raw.get(schema.KEY), raw.get(schema.URL),
                            reason, detail)
                continue
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
    the last good sample of a finite (evaluation) stream are still reported.
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
