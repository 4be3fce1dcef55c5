"""Stream twin-pair WebDataset shards into batches, for training and for evaluation.

Built like open_clip_train's ``get_wds_dataset``: a list of stages ending in ``wds.DataPipeline``,
each a module-level function or small class so that it pickles into workers (fork, forkserver, spawn)::

    shards   train: ResampledShards, endless | eval: SimpleShardList, split_by_node, split_by_worker
    tar      TarSamples: one shard at a time; read errors, shards whose tar stream ends without the
             end-of-archive marker and shards shorter than their sizes.json entry are logged and
             counted (raised with on_error="raise")
    shuffle  train only: SeededShuffle
    decode   DecodeTwin: images (cultureclip.images: pixel cap, 8-bit RGB) + json -> tensors and
             texts; a bad sample is logged, counted, dropped
    batch    wds.batched(collation_fn=TwinCollate): stack images, tokenize the four texts per batch
    count    AttachSkipCount: batch[N_SKIPPED] = skips since the previous batch (sum it over workers);
             a stream that ends with skips and no batch yields a skip report ``{N_SKIPPED: n}``
             (``schema.is_skip_report``): count it, use nothing else from it

Skip reasons (``SkipCounter.by_reason``): ``bad_shard``, ``truncated_shard``, ``missing_member``,
``bad_meta``, ``bad_image``, ``too_large``. Skips are logged one line each for the first ten, then
as a summary line every 1000 skips or 30 s. No bad sample is ever replaced by a blank image. A
training stream that skips ``max_consecutive_skips`` samples (or empty/damaged shards) in a row
without one good pair stops with :class:`NoProgressError` naming the shards, instead of spinning.
The validation vocabulary is read by :func:`read_concept_names` with the same checks and counts.
"""
from __future__ import annotations

import copy
import glob
import logging
import math
import os
import re
from typing import Callable, Optional, Sequence, Union

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.data.shards import read_sizes
from cultureclip.data.stages import (  # noqa: F401  (re-exported: the stage names are part of the API)
    BAD_IMAGE, BAD_META, BAD_SHARD, MISSING_MEMBER, TOO_LARGE, TRUNCATED_SHARD, AttachSkipCount, DecodeTwin,
    NoProgressError, ProgressGuard, SeededShuffle, ShardDamage, SkipCounter, TarSamples, TwinCollate, _Skip,
    checked_pairs, skip_where, split_pair)
from cultureclip.images import DEFAULT_MAX_PIXELS

DEFAULT_MAX_CONSECUTIVE_SKIPS = 1000

log = logging.getLogger(__name__)

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


def listed_sizes(urls: Sequence[str]) -> dict[str, int]:
    """``{url: pairs}`` for the local shards listed in the ``sizes.json`` beside them.

    Remote urls, shards missing from their folder's ``sizes.json`` and folders without a readable one
    are left out (an unreadable ``sizes.json`` is logged, not raised: the check is a safety net).
    """
    sizes_by_dir: dict[str, Optional[dict]] = {}
    found = {}
    for url in urls:
        if _REMOTE.match(url):
            continue
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in sizes_by_dir:
            sizes_by_dir[folder] = None
            if os.path.isfile(os.path.join(folder, schema.SIZES_FILE)):
                try:
                    sizes_by_dir[folder] = read_sizes(folder)
                except (OSError, ValueError) as exc:
                    log.warning("cannot read %s in %s, shard lengths are not checked: %s", schema.SIZES_FILE,
                                folder, exc)
        sizes = sizes_by_dir[folder]
        if isinstance(sizes, dict) and isinstance(sizes.get(name), int):
            found[url] = sizes[name]
    return found


def count_pairs(urls: Union[str, Sequence[str]]) -> Optional[int]:
    """Number of pairs in local shards (urls or a spec string), from the ``sizes.json`` beside them.

    Returns None when any shard is remote or missing from a readable ``sizes.json``.
    """
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    sizes = listed_sizes(urls)
    return sum(sizes[u] for u in urls) if all(u in sizes for u in urls) else None


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
                        world_size: Optional[int] = None, skip_counter: Optional[SkipCounter] = None,
                        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                        max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                        on_error: str = "skip") -> TwinPipeline:
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
        max_pixels: pixel cap per image, checked from the header before decoding (None: Pillow's
            own limit only); a larger image is skipped as ``too_large``.
        max_consecutive_skips: train only: this many skipped samples (or damaged/empty shards) in
            a row without one good pair raise :class:`NoProgressError` naming the shards; None: never.
        on_error: a damaged or truncated shard: ``"skip"`` counts it (``bad_shard``/``truncated_shard``),
            ``"raise"`` stops with :class:`ShardDamage` (a ValueError) naming it.

    Returns:
        A :class:`TwinPipeline` yielding dicts: ``POS_IMAGE``/``NEG_IMAGE`` float [B, 3, H, W];
        ``POS_CAPTION``/``NEG_CAPTION`` long [B, Lc]; ``POS_CONCEPT``/``NEG_CONCEPT`` long [B, Lk];
        each text key + ``TEXT_SUFFIX``: list[str]; ``KEY``: list[str]; ``schema.OPTIONAL_FIELDS``:
        lists with None where absent; ``N_SKIPPED``: int. Possibly a last skip report
        ``{N_SKIPPED: n}`` (see :func:`cultureclip.schema.is_skip_report`).
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
    guard = ProgressGuard(max_consecutive_skips if train else None)  # an evaluation pass ends by itself
    stages.append(TarSamples(counter, listed_sizes(urls), guard, on_error))
    if train and shuffle_buffer > 0:
        initial = shuffle_buffer // 5 if shuffle_initial is None else shuffle_initial
        stages.append(SeededShuffle(shuffle_buffer, max(1, initial), seed))
    collate = TwinCollate(tokenizer, caption_context_length, concept_context_length)
    stages += [DecodeTwin(preprocess, counter, max_pixels, guard),
               wds.batched(batch_size, collation_fn=collate,
                           partial=(not train) if partial_batches is None else partial_batches),
               AttachSkipCount(counter)]
    return TwinPipeline(*stages, skip_counter=counter)


def make_loader(pipeline: wds.DataPipeline, num_workers: int = 0, epoch_length_batches: Optional[int] = None,
                persistent_workers: Optional[bool] = None, world_size: Optional[int] = None,
                pin_memory: Optional[bool] = None, prefetch_factor: Optional[int] = None,
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
        pin_memory: page-locked batches, so the host-to-GPU copy can overlap compute; default: when
            CUDA is available.
        prefetch_factor: batches each worker keeps ready; default 4 with workers (torch's 2 leaves a
            GPU step waiting whenever one batch decodes slowly), unused without workers.
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
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if num_workers > 0:
        loader_kwargs["prefetch_factor"] = 4 if prefetch_factor is None else prefetch_factor
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
                           **loader_kwargs)
    loader.num_batches = num_batches
    return loader


def read_concept_names(urls: Union[str, Sequence[str]], split: str = "validation",
                       skip_counter: Optional[SkipCounter] = None, on_error: str = "skip") -> list[str]:
    """Sorted concept names of a split, read from the json members (images are not decoded).

    Samples are read and checked as the pipeline reads them (:class:`TarSamples`, :func:`split_pair`):
    a damaged tar, a shard shorter than its ``sizes.json`` entry, a missing member or a bad json is
    logged, counted in ``skip_counter`` and skipped, never raised.

    Args:
        urls: shard urls or a spec for :func:`expand_shards`.
        split: the split's name for messages.
        skip_counter: counter to fill; a new one otherwise.
        on_error: a damaged or truncated shard: ``"skip"`` (count it) or ``"raise"``.

    Raises:
        ValueError: no usable sample in the split; the message names its shards and the skip counts.
        ShardDamage: a damaged or truncated shard, with ``on_error="raise"``.
    """
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    names: set[str] = set()
    for _, meta in checked_pairs(urls, counter, listed_sizes(urls), on_error):
        names.update(meta[k] for k in schema.CONCEPT_KEYS)
    counter.flush()
    if not names:
        more = f" and {len(urls) - 5} more" if len(urls) > 5 else ""
        raise ValueError(f"the {split} split has no usable twin pair: {len(urls)} shard(s) "
                         f"({', '.join(urls[:5])}{more}); skipped: {counter.by_reason or 'nothing (no samples)'}")
    return sorted(names)
