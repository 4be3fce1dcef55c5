"""General-data replay: a second training stream of ordinary image-text shards, mixed into every step.

Fine-tuning on twin pairs alone makes a CLIP model forget general zero-shot skills. Replay keeps a
little ordinary image-text data in every step (``data.replay``), trained with the plain CLIP loss
(``loss.lambda_replay``) and optionally pulled towards the frozen starting model's image features
(``loss.lambda_distill``); see docs/method.md.

The shards use open_clip's WebDataset layout, one sample per key::

    000000042.jpg   the image (jpg, jpeg, png or webp)
    000000042.txt   its caption (UTF-8)

with an optional ``sizes.json`` beside them, as ``open_clip_train`` reads them. The stream is built
like the twin stream (:mod:`cultureclip.data.pipeline`) from the same stages: resampled shards,
:class:`~cultureclip.data.stages.TarSamples`, the seeded shuffle, the image decode of
:mod:`cultureclip.images` (pixel cap, 8-bit RGB), the same :class:`SkipCounter` reasons plus
``bad_text`` (a caption that is not UTF-8 or is blank), :class:`AttachSkipCount` and the
:class:`~cultureclip.data.resumable.IsolatedRNG` of exact resume.

**Mixing and its size.** :class:`ReplayMixer` zips the two loaders in the main process: every twin
micro-batch gets the next replay batch under ``schema.REPLAY_IMAGE``/``REPLAY_TEXT``. The replay batch
size is ``data.replay.batch_size``, or ``round(data.replay.ratio * data.batch_size)``: *ratio* is
replay samples per twin pair (a twin pair holds two images, so ratio 0.5 gives one replay image per
four twin images). Both streams restart each epoch from ``(seed, epoch, rank, worker)``, and the
mixer's first pass drops the same number of batches from both on resume, so a resumed run sees
exactly the replay batches of an uninterrupted one.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.data.pipeline import (DEFAULT_MAX_CONSECUTIVE_SKIPS, TwinPipeline, expand_shards, listed_sizes,
                                       make_loader)
from cultureclip.data.resumable import IsolatedRNG, set_stream_epoch
from cultureclip.data.stages import (MISSING_MEMBER, AttachSkipCount, DecodeTwin, ProgressGuard, SeededShuffle,
                                     SkipCounter, TarSamples, _list_members, _Skip)
from cultureclip.images import DEFAULT_MAX_PIXELS

BAD_TEXT = "bad_text"  # the caption member is not UTF-8 text or is blank
# mixed into the data seed, so the replay stream's shuffle and augmentations differ from the twin stream's
REPLAY_SEED_OFFSET = 0x5EED

log = logging.getLogger(__name__)


def replay_batch_size(batch_size: Optional[int], ratio: Optional[float], twin_batch_size: int) -> int:
    """Replay samples per micro-batch: ``batch_size``, or ``round(ratio * twin_batch_size)``.

    Args:
        batch_size: replay samples per micro-batch, or None.
        ratio: replay samples per twin pair, or None. Exactly one of the two must be set.
        twin_batch_size: twin pairs per micro-batch.

    Raises:
        ValueError: both or neither given, or a result below 1, naming the ``data.replay`` key.
    """
    if (batch_size is None) == (ratio is None):
        raise ValueError(f"data.replay needs exactly one of batch_size and ratio, got batch_size={batch_size}, "
                         f"ratio={ratio}")
    n = int(batch_size) if batch_size is not None else round(float(ratio) * twin_batch_size)
    if n < 1:
        which = f"batch_size={batch_size}" if batch_size is not None else \
            f"ratio={ratio} x {twin_batch_size} pairs rounds to {n}"
        raise ValueError(f"data.replay.{which}: a replay batch needs at least one sample")
    return n


def split_image_text(raw: Mapping) -> tuple[tuple[str, bytes], str]:
    """``((image member, bytes), caption)`` of a raw open_clip sample; raises ``_Skip``."""
    image = next(((m, raw[m]) for m in schema.REPLAY_IMAGE_MEMBERS if m in raw), None)
    if image is None or schema.REPLAY_TEXT_MEMBER not in raw:
        raise _Skip(MISSING_MEMBER, f"needs an image ({'/'.join(schema.REPLAY_IMAGE_MEMBERS)}) and "
                                    f"{schema.REPLAY_TEXT_MEMBER}, has {_list_members(raw)}")
    try:
        text = raw[schema.REPLAY_TEXT_MEMBER].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise _Skip(BAD_TEXT, f"{schema.REPLAY_TEXT_MEMBER} is not UTF-8: {exn}") from exn
    if not text:
        raise _Skip(BAD_TEXT, f"{schema.REPLAY_TEXT_MEMBER} is blank")
    return image, text


class DecodeImageText(DecodeTwin):
    """Stage: raw samples -> ``{KEY, REPLAY_IMAGE: [3, H, W], REPLAY_TEXT: str}``.

    A missing member, a bad caption, an undecodable or too large image, or a failing preprocess is
    counted with its key, shard and reason and dropped, exactly as in :class:`~cultureclip.data.stages.DecodeTwin`
    (whose constructor, image decoding and skip loop it shares).
    """

    def decode(self, raw: dict) -> dict:
        (member, data), text = split_image_text(raw)
        return {schema.KEY: raw.get(schema.KEY), schema.REPLAY_IMAGE: self.pixels(raw, member, data),
                schema.REPLAY_TEXT: text}


class ImageTextCollate:
    """Collation: stack the images ``[R, 3, H, W]``, tokenize the captions once per batch ``[R, L]``."""

    def __init__(self, tokenizer: Callable, context_length: Optional[int] = None) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, samples: list[dict]) -> dict:
        texts = [s[schema.REPLAY_TEXT] for s in samples]
        kwargs = {} if self.context_length is None else {"context_length": self.context_length}
        return {schema.REPLAY_IMAGE: torch.stack([s[schema.REPLAY_IMAGE] for s in samples]),
                schema.REPLAY_TEXT: self.tokenizer(texts, **kwargs),
                schema.REPLAY_TEXT + schema.TEXT_SUFFIX: texts,
                schema.KEY: [s[schema.KEY] for s in samples]}


def is_replay_skip_report(batch) -> bool:
    """Whether a replay stream item is a skip report ``{N_SKIPPED: n}`` rather than a batch."""
    return isinstance(batch, Mapping) and schema.N_SKIPPED in batch and schema.REPLAY_IMAGE not in batch


def build_replay_pipeline(urls: Union[str, Sequence[str]], preprocess: Callable[[Image.Image], torch.Tensor],
                          tokenizer: Callable, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 1000,
                          context_length: Optional[int] = None, skip_counter: Optional[SkipCounter] = None,
                          max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                          max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> TwinPipeline:
    """Build the endless, resampled, shuffled replay batch stream (training only).

    Args:
        urls: shard urls or a spec for :func:`cultureclip.data.pipeline.expand_shards`.
        preprocess: PIL RGB image -> float tensor [3, H, W] (the training transform).
        tokenizer: an open_clip tokenizer.
        batch_size: samples per batch, per worker and rank.
        seed: seeds shard resampling, the shuffle and (with :class:`IsolatedRNG`) augmentation.
        shuffle_buffer: sample shuffle buffer (0 disables).
        context_length: caption tokens; None: the tokenizer's default.
        skip_counter: counter to fill; a new one otherwise (``pipeline.skip_counter``).
        max_pixels, max_consecutive_skips: as in :func:`cultureclip.data.pipeline.build_twin_pipeline`.

    Returns:
        A pipeline yielding ``{REPLAY_IMAGE: float [R, 3, H, W], REPLAY_TEXT: long [R, L],
        REPLAY_TEXT + TEXT_SUFFIX: list[str], KEY: list[str], N_SKIPPED: int}``, with
        :class:`IsolatedRNG` appended (exact resume).
    """
    urls = expand_shards(urls)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    guard = ProgressGuard(max_consecutive_skips)
    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True), TarSamples(counter, listed_sizes(urls), guard)]
    if shuffle_buffer > 0:
        stages.append(SeededShuffle(shuffle_buffer, max(1, shuffle_buffer // 5), seed))
    stages += [DecodeImageText(preprocess, counter, max_pixels, guard),
               wds.batched(batch_size, collation_fn=ImageTextCollate(tokenizer, context_length), partial=False),
               AttachSkipCount(counter), IsolatedRNG(seed)]
    return TwinPipeline(*stages, skip_counter=counter)


def replay_loader(pipeline: TwinPipeline, epoch: int, num_batches: int, num_workers: int = 0):
    """A loader over ``pipeline`` whose first pass is ``epoch``'s and yields at least ``num_batches``.

    Each worker yields ``ceil(num_batches / workers)`` batches, so the replay pass never ends before
    the twin pass it is zipped with, whatever the two streams' worker counts.
    """
    set_stream_epoch(pipeline, epoch)
    return make_loader(pipeline, num_workers=num_workers, epoch_length_batches=num_batches,
                       pin_memory=torch.cuda.is_available(), generator=torch.Generator())


class ReplayMixer:
    """Iterable: every twin batch with the next replay batch merged in; drops ``skip`` of each first.

    Each ``iter()`` is one epoch: both loaders start a pass (a new epoch in their workers). A twin
    skip report passes through unchanged (it carries no pairs, so it takes no replay batch). Replay
    skip reports are counted into the next merged batch's ``REPLAY_N_SKIPPED``. The replay loader is
    started at the first ``next()``, not at ``iter()`` (Lightning calls ``iter()`` once only to check).

    Args:
        twin: the twin-pair training loader (one pass per epoch).
        replay: the replay loader (:func:`replay_loader`; at least as many batches per pass).
        skip: batches of the first pass already trained on (a resumed epoch), dropped from both.
    """

    def __init__(self, twin: Iterable, replay: Iterable, skip: int = 0) -> None:
        self.twin, self.replay, self.skip = twin, replay, int(skip)

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        skip, self.skip = self.skip, 0
        twin_it, replay_it = iter(self.twin), iter(self.replay)
        pending = 0  # replay skips not yet reported
        for i, batch in enumerate(twin_it):
            if schema.is_skip_report(batch):
                if i >= skip:
                    yield batch
                continue
            while True:
                extra = next(replay_it, None)
                if extra is None:
                    raise RuntimeError("the replay stream ended before the twin stream's epoch did; it is "
                                       "resampled and sized to the twin epoch, so this is a bug")
                pending += int(extra.get(schema.N_SKIPPED, 0))
                if not is_replay_skip_report(extra):
                    break
            if i < skip:  # a resumed epoch: this step already trained on both (and counted its skips)
                pending = 0
                continue
            merged = dict(batch)
            merged[schema.REPLAY_IMAGE], merged[schema.REPLAY_TEXT] = extra[schema.REPLAY_IMAGE], \
                extra[schema.REPLAY_TEXT]
            merged[schema.REPLAY_N_SKIPPED], pending = pending, 0
            yield merged
