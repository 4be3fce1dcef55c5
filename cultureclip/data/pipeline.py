"""Stream twin-pair WebDataset shards into batches, for training and for evaluation.

Built like open_clip_train's ``get_wds_dataset``: a list of stages ending in ``wds.DataPipeline``,
each a module-level function or small class so that it pickles into workers (fork, forkserver, spawn)::

    shards   train: ResampledShards, endless | eval: SimpleShardList, split_by_node, split_by_worker
    tar      TarSamples: one shard at a time; read errors logged and counted, never raised
    shuffle  train only: SeededShuffle
    decode   DecodeTwin: images + json -> tensors and texts; a bad sample is logged, counted, dropped
    batch    wds.batched(collation_fn=TwinCollate): stack images, tokenize the four texts per batch
    count    AttachSkipCount: batch[N_SKIPPED] = skips since the previous batch (sum it over workers)

No bad sample is ever replaced by a blank image.
"""
from __future__ import annotations

import copy
import glob
import io
import itertools
import json
import logging
import math
import os
import random
import re
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.data.shards import read_sizes, validate_pair_meta

log = logging.getLogger(__name__)

# reasons a sample (or the rest of a shard) was skipped: keys of SkipCounter.by_reason
BAD_SHARD = "bad_shard"  # tar read error; the shard's remaining samples are lost, count unknown
MISSING_MEMBER = "missing_member"  # no pos image, no neg image or no json
BAD_META = "bad_meta"  # json does not parse or lacks a required text
BAD_IMAGE = "bad_image"  # an image does not decode or the preprocess fails on it

_REMOTE = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")  # pipe:, http(s)://, s3://, gs://, ...
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shards(spec: Union[str, Sequence[str]]) -> list[str]:
    """Turn a shard spec into a list of shard urls.

    Args:
        spec: a str or list of str, each possibly several specs joined with ``::`` (as open_clip).
            A spec is a brace pattern (``data/shard-{000000..000009}.tar``), a glob, a directory
            (its ``*.tar``) or a ``pipe:``/``http(s)://``/``s3://``/``gs://`` url (passed unchecked).

    Returns:
        Urls in spec order, each glob's or directory's matches sorted, repeats dropped.

    Raises:
        FileNotFoundError: a local spec matches no file, or a brace-expanded path does not exist.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in (p.strip() for s in specs for p in s.split("::")):
        if not part:
            continue
        if _REMOTE.match(part):
            urls.extend(braceexpand.braceexpand(part))
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
        else:
            found = []
            for path in braceexpand.braceexpand(part):
                if os.path.isfile(path):  # checked first: a literal name may hold glob characters
                    found.append(path)
                elif _GLOB_CHARS.search(path):
                    found.extend(sorted(glob.glob(path)))
                else:  # a missing shard inside an explicit range is a mistake, not a smaller set
                    raise FileNotFoundError(f"shard {path!r} of pattern {part!r} does not exist")
        if not found:
            raise FileNotFoundError(f"no shard matches {part!r}")
        urls.extend(found)
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return list(dict.fromkeys(urls))


def count_pairs(urls: Union[str, Sequence[str]]) -> Optional[int]:
    """Number of pairs in local shards (urls or a spec string), from the ``sizes.json`` beside them.

    Returns None when any shard is remote or missing from a readable ``sizes.json``.
    """
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    sizes_by_dir: dict[str, Optional[dict]] = {}
    total = 0
    for url in urls:
        if _REMOTE.match(url):
            return None
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in sizes_by_dir:
            try:
                sizes_by_dir[folder] = read_sizes(folder)
            except (OSError, ValueError):
                sizes_by_dir[folder] = None
        sizes = sizes_by_dir[folder]
        if not sizes or name not in sizes:
            return None
        total += int(sizes[name])
    return total


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


class TwinPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` with its ``skip_counter`` and a ``set_epoch``."""

    def __init__(self, *stages, skip_counter: SkipCounter) -> None:
        super().__init__(*stages)
        self.skip_counter = skip_counter

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pass for ``epoch``; needed when workers are not persistent (each epoch they
        restart from the main-process copy, which would otherwise replay epoch 0)."""
        for stage in self.pipeline:
            if isinstance(stage, (wds.ResampledShards, SeededShuffle)):
                stage.epoch = epoch - 1  # both add 1 when a pass starts


def check_shard_count(num_shards: int, num_workers: int, world_size: Optional[int] = None) -> None:
    """Raise ValueError unless each of ``max(1, num_workers)`` workers on each of ``world_size`` ranks
    (None: read from the environment / torch.distributed) gets a shard of an evaluation pass, as
    open_clip asserts."""
    if world_size is None:
        world_size = wds.utils.pytorch_worker_info()[1]
    workers = max(1, num_workers)
    if num_shards < workers * world_size:
        raise ValueError(
            f"{num_shards} shard(s) for {workers} loader worker(s) x {world_size} rank(s): an evaluation "
            f"pass hands out whole shards, so some workers would get none. Write at least "
            f"{workers * world_size} shards (smaller TwinShardWriter maxcount) or use fewer workers.")


def build_twin_pipeline(urls: Union[str, Sequence[str]], preprocess: Callable[[Image.Image], torch.Tensor],
                        tokenizer: Callable, batch_size: int, *, train: bool, seed: int = 0,
                        shuffle_buffer: int = 1000, shuffle_initial: Optional[int] = None,
                        caption_context_length: Optional[int] = None,
                        concept_context_length: Optional[int] = None,
                        partial_batches: Optional[bool] = None, num_workers: Optional[int] = None,
                        world_size: Optional[int] = None,
                        skip_counter: Optional[SkipCounter] = None) -> TwinPipeline:
    """Build the twin-pair batch stream.

    Args:
        urls: shard urls or a spec for :func:`expand_shards`.
        preprocess: PIL RGB image -> float tensor [3, H, W] (open_clip's train or val transform).
        tokenizer: an open_clip tokenizer, ``tokenizer(list_of_str, context_length=...) -> [N, L]``.
        batch_size: pairs per batch, per worker and rank.
        train: True: endless resampled, shuffled stream; False: one pass in shard order.
        seed: seeds shard resampling and the shuffle, mixed with rank, worker and epoch.
        shuffle_buffer, shuffle_initial: sample shuffle buffer (train; 0 disables) and how many
            samples it holds before the first leaves (default shuffle_buffer // 5).
        caption_context_length, concept_context_length: token lengths; None = the tokenizer's
            default (77 for CLIP); concept names may use a shorter one (e.g. 16).
        partial_batches: keep a last smaller batch; default ``not train``.
        num_workers, world_size: if num_workers is given (eval), check the shard count now.
        skip_counter: counter to fill; a new one otherwise (``pipeline.skip_counter``).

    Returns:
        A :class:`TwinPipeline` yielding dicts: ``POS_IMAGE``/``NEG_IMAGE`` float [B, 3, H, W];
        ``POS_CAPTION``/``NEG_CAPTION`` long [B, Lc]; ``POS_CONCEPT``/``NEG_CONCEPT`` long [B, Lk];
        each text key + ``TEXT_SUFFIX``: list[str]; ``KEY``: list[str]; ``schema.OPTIONAL_FIELDS``:
        lists with None where absent; ``N_SKIPPED``: int.
    """
    urls = expand_shards(urls)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    if train:
        # resampling gives every worker of every rank an endless, differently seeded stream, so no
        # node/worker split is needed and any number of shards works
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        if num_workers is not None:
            check_shard_count(len(urls), num_workers, world_size)
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages.append(TarSamples(counter))
    if train and shuffle_buffer > 0:
        initial = shuffle_buffer // 5 if shuffle_initial is None else shuffle_initial
        stages.append(SeededShuffle(shuffle_buffer, max(1, initial), seed))
    collate = TwinCollate(tokenizer, caption_context_length, concept_context_length)
    stages += [DecodeTwin(preprocess, counter),
               wds.batched(batch_size, collation_fn=collate,
                           partial=(not train) if partial_batches is None else partial_batches),
               AttachSkipCount(counter)]
    return TwinPipeline(*stages, skip_counter=counter)


def make_loader(pipeline: wds.DataPipeline, num_workers: int = 0, epoch_length_batches: Optional[int] = None,
                persistent_workers: Optional[bool] = None, world_size: Optional[int] = None,
                **loader_kwargs) -> wds.WebLoader:
    """Wrap a pipeline in a ``wds.WebLoader`` (batching already happened in the pipeline).

    Args:
        pipeline: from :func:`build_twin_pipeline` (any ``wds.DataPipeline`` works).
        num_workers: DataLoader workers.
        epoch_length_batches: training only: batches per epoch; each worker yields
            ``ceil(n / max(1, num_workers))``, as open_clip does. None: endless.
        persistent_workers: default ``num_workers > 0``. Persistent workers count epochs themselves;
            otherwise call ``pipeline.set_epoch(e)`` before each epoch.
        world_size: ranks for the shard-count check; None: read from the environment.
        **loader_kwargs: for ``torch.utils.data.DataLoader`` (pin_memory, multiprocessing_context, ...).

    Returns:
        The loader, with ``loader.num_batches`` per epoch (None when unbounded or unknown).

    Raises:
        ValueError: an evaluation pass has fewer shards than workers x ranks, or an epoch length.
    """
    shard_lists = [s for s in pipeline.pipeline if isinstance(s, wds.SimpleShardList)]
    resampled = any(isinstance(s, wds.ResampledShards) for s in pipeline.pipeline)
    if not resampled and shard_lists:
        check_shard_count(len(shard_lists[0].urls), num_workers, world_size)
    num_batches = None
    if epoch_length_batches is not None:
        if not resampled:  # with_epoch would silently repeat or cut a finite evaluation pass
            raise ValueError("epoch_length_batches is for the resampled training stream; "
                             "an evaluation pass ends by itself")
        per_worker = math.ceil(epoch_length_batches / max(1, num_workers))
        # a shallow copy carries the epoch length, leaving the caller's pipeline endless
        pipeline = copy.copy(pipeline).with_epoch(per_worker)
        num_batches = per_worker * max(1, num_workers)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=persistent_workers and num_workers > 0, **loader_kwargs)
    loader.num_batches = num_batches
    return loader
