"""LightningDataModule over the twin-pair pipeline: a resampled training stream of known length, a
deterministic validation pass, and the validation concept vocabulary (``val/img2concept_recall@1``)."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
import torch

from cultureclip.data.pipeline import (  # noqa: F401  (read_concept_names: importable from here too)
    DEFAULT_MAX_CONSECUTIVE_SKIPS, build_twin_pipeline, count_pairs, expand_shards, make_loader, read_concept_names)
from cultureclip.images import DEFAULT_MAX_PIXELS, check_on_error
from cultureclip.data.replay import (REPLAY_SEED_OFFSET, ReplayMixer, build_replay_pipeline, replay_batch_size,
                                     replay_loader)
from cultureclip.data.resumable import IsolatedRNG, SkipFirstBatches, set_stream_epoch
from cultureclip.data.spec import DataSpec
from cultureclip.resolvers import workers as default_workers  # min(n, cores), also the configs' cc_workers

log = logging.getLogger(__name__)


def check_shard_specs(train_shards: Union[str, Sequence[str]], val_shards: Union[str, Sequence[str], None] = None,
                      toy_dir: Optional[str] = None) -> tuple[list[str], list[str]]:
    """Expand the shard specs (cheap: no data is read), raising with the pattern that matches nothing.

    With ``toy_dir`` the shards are written by :meth:`TwinDataModule.prepare_data`, so nothing is
    checked yet and ``([], [])`` is returned.
    """
    if toy_dir:
        return [], []
    return expand_shards(train_shards), (expand_shards(val_shards) if val_shards else [])


REPLAY_KEYS = ("shards", "batch_size", "ratio", "num_workers", "shuffle_buffer", "toy_dir", "toy_seed")


def check_replay(replay: Optional[Mapping[str, Any]], batch_size: int) -> Optional[dict]:
    """The ``data.replay`` settings with defaults filled in, or None when replay is off (no ``shards``).

    Expands local shard specs now (unless a toy set builds them: ``toy_dir``), so a pattern that
    matches nothing fails before any model is built. Raises ValueError naming the bad key.
    """
    if not replay or replay.get("shards") is None:
        return None
    unknown = sorted(set(replay) - set(REPLAY_KEYS))
    if unknown:
        raise ValueError(f"data.replay has unknown key(s) {unknown}; known: {list(REPLAY_KEYS)}")
    out = {"num_workers": None, "shuffle_buffer": 1000, "toy_dir": None, "toy_seed": 0, **dict(replay)}
    out["batch_size"] = replay_batch_size(replay.get("batch_size"), replay.get("ratio"), batch_size)
    out["urls"] = [] if out["toy_dir"] else expand_shards(out["shards"])
    return out


class SizedLoader:
    """A training loader cut to a known number of batches, with ``__len__``.

    Lightning cannot size a loader over an ``IterableDataset``, so its progress bar showed no total
    and ``trainer.num_training_batches`` was infinite; the datamodule knows the epoch from ``sizes.json``.
    """

    def __init__(self, loader, num_batches: int):
        self.loader, self.num_batches = loader, int(num_batches)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return self.num_batches


class TwinDataModule(L.LightningDataModule):
    """Twin-pair shards for training and validation.

    Args:
        spec: the model's transforms and tokenizer (``CultureCLIP.data_spec()``).
        train_shards, val_shards: shard specs (paths, brace patterns, directories, ``::`` joins,
            ``pipe:``/URLs). Local specs are checked at construction (unless ``toy_dir`` builds them).
        batch_size: pairs per micro-batch per device.
        val_batch_size: pairs per validation batch (default: batch_size).
        num_workers: loader workers per device (default: 4, at most the machine's cores).
        train_pairs_per_epoch: epoch length; default the ``sizes.json`` total.
        shuffle_buffer: sample shuffle buffer of the training stream.
        seed: data seed (shard resampling, shuffle, augmentation); mixed with rank, worker and epoch.
        caption_context_length: tokens per caption (None: the model's context length).
        concept_context_length: tokens per concept name; used only when the text tower allows a
            shorter context without changing features (``spec.supports_short_context``).
        toy_dir: :meth:`prepare_data` builds the embedded toy set here if it is missing
            (``cultureclip.data.toy``).
        toy_seed: seed of the toy set.
        max_pixels: images larger than this (from their header) are skipped and counted as
            ``too_large`` (None: only Pillow's own limit).
        max_consecutive_skips: the training stream stops with ``NoProgressError`` naming the shards
            after this many skipped samples in a row (None: never).
        replay: general-data replay (:mod:`cultureclip.data.replay`), off while ``shards`` is None:
            ``shards`` (spec of open_clip-layout image-text shards), ``batch_size`` (replay samples per
            micro-batch) or ``ratio`` (replay samples per twin pair), ``num_workers`` (None: as the
            twin stream), ``shuffle_buffer``, ``toy_dir``/``toy_seed`` (build the toy general set
            of :mod:`cultureclip.data.toy_general` there in :meth:`prepare_data`).
        on_error: a damaged or truncated twin shard (training, validation, the validation vocabulary):
            ``"skip"`` counts it (``bad_shard``/``truncated_shard``), ``"raise"`` stops naming it.

    After :meth:`setup`, ``val_concepts`` holds the sorted concept names of the validation split.
    """

    def __init__(self, spec: DataSpec, train_shards: Union[str, Sequence[str]],
                 val_shards: Union[str, Sequence[str], None] = None, batch_size: int = 128,
                 val_batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                 train_pairs_per_epoch: Optional[int] = None, shuffle_buffer: int = 1000, seed: int = 0,
                 caption_context_length: Optional[int] = None, concept_context_length: Optional[int] = 16,
                 toy_dir: Optional[str] = None, toy_seed: int = 0, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 replay: Optional[Mapping[str, Any]] = None, on_error: str = "skip"):
        super().__init__()
        check_on_error(on_error)
        self.on_error = on_error
        self.max_pixels, self.max_consecutive_skips = max_pixels, max_consecutive_skips
        self.spec = spec
        self.train_shards, self.val_shards = train_shards, val_shards
        self.toy_dir, self.toy_seed = toy_dir, toy_seed
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.caption_context_length, self.concept_context_length = caption_context_length, concept_context_length
        self._pairs_arg = train_pairs_per_epoch
        self.train_urls, self.val_urls = check_shard_specs(train_shards, val_shards, toy_dir)
        self.replay = check_replay(replay, batch_size)
        self.train_pairs_per_epoch: Optional[int] = None
        if not toy_dir:
            self._count_pairs()
        self.val_concepts: list[str] = []
        self._resume: dict = {}  # state_dict() of the checkpoint resumed from

    def _count_pairs(self) -> None:
        pairs = self._pairs_arg or count_pairs(self.train_urls)
        if not pairs:
            raise ValueError(f"train shards {self.train_urls[:2]}... have no sizes.json beside them: "
                             f"set data.train_pairs_per_epoch")
        self.train_pairs_per_epoch = int(pairs)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else int(os.environ.get("WORLD_SIZE", 1))

    def batches_per_epoch(self, world_size: Optional[int] = None) -> int:
        """Micro-batches per device per epoch: the epoch's pairs spread over all devices."""
        if self.train_pairs_per_epoch is None:
            raise RuntimeError("call prepare_data() and setup() first: the toy set is not built yet")
        world = world_size or self.world_size
        return max(1, math.ceil(self.train_pairs_per_epoch / (self.batch_size * world)))

    def val_batches(self) -> Optional[int]:
        """Validation batches per device from ``sizes.json`` (None when unknown), for progress bars only.

        The validation loader has no length (an ``IterableDataset`` handing whole shards to each rank and
        worker), and giving it one would let Lightning cut validation short; this is the bar's total.
        """
        pairs = count_pairs(self.val_urls) if self.val_urls else None
        return math.ceil(pairs / (self.val_batch_size * self.world_size)) if pairs else None

    def prepare_data(self) -> None:
        """Build the toy set if configured (Lightning calls this on one process per node)."""
        if self.toy_dir:
            from cultureclip.data.toy import ensure_toy_shards  # the generator is only needed here
            ensure_toy_shards(self.toy_dir, seed=self.toy_seed)
        if self.replay and self.replay["toy_dir"]:
            from cultureclip.data.toy_general import ensure_general_set
            ensure_general_set(self.replay["toy_dir"], seed=self.replay["toy_seed"], keep_any=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_pairs_per_epoch is None:  # toy set: its shards exist only now
            self.train_urls = expand_shards(self.train_shards)
            self.val_urls = expand_shards(self.val_shards) if self.val_shards else []
            self._count_pairs()
        if self.replay and not self.replay["urls"]:
            self.replay["urls"] = expand_shards(self.replay["shards"])
        if self.val_urls and not self.val_concepts:
            self.val_concepts = read_concept_names(self.val_urls, on_error=self.on_error)

    def _concept_ctx(self) -> Optional[int]:
        return self.concept_context_length if self.spec.supports_short_context else None

    def train_dataloader(self):
        pipeline = build_twin_pipeline(
            self.train_urls, self.spec.preprocess_train, self.spec.tokenizer, self.batch_size, train=True,
            seed=self.seed, shuffle_buffer=self.shuffle_buffer, caption_context_length=self.caption_context_length,
            concept_context_length=self._concept_ctx(), max_pixels=self.max_pixels,
            max_consecutive_skips=self.max_consecutive_skips, on_error=self.on_error)
        # exact resume: the stream depends on (seed, epoch, rank, worker) only; a resumed run starts the
        # checkpoint's epoch and drops the batches it already trained on (cultureclip.data.resumable)
        pipeline.append(IsolatedRNG(self.seed))
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        set_stream_epoch(pipeline, epoch)
        skip = self._resume.get("batches_in_epoch", 0) if self._resume.get("epoch") == epoch else 0
        loader = make_loader(pipeline, num_workers=self.num_workers, epoch_length_batches=self.batches_per_epoch(),
                             pin_memory=torch.cuda.is_available(), generator=torch.Generator())
        # the length is the whole epoch: Lightning counts a resumed epoch from its restored batch progress
        if self.replay:  # both streams restart per epoch and drop the same batches on resume
            return SizedLoader(ReplayMixer(loader, self._replay_loader(epoch, loader.num_batches), skip),
                               loader.num_batches)
        return SizedLoader(SkipFirstBatches(loader, skip), loader.num_batches)

    def _replay_loader(self, epoch: int, num_batches: int):
        r = self.replay
        pipeline = build_replay_pipeline(
            r["urls"], self.spec.preprocess_train, self.spec.tokenizer, r["batch_size"],
            seed=self.seed + REPLAY_SEED_OFFSET, shuffle_buffer=r["shuffle_buffer"],
            context_length=self.caption_context_length, max_pixels=self.max_pixels,
            max_consecutive_skips=self.max_consecutive_skips)
        workers = self.num_workers if r["num_workers"] is None else r["num_workers"]
        return replay_loader(pipeline, epoch, num_batches, workers)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        # an evaluation pass hands out whole shards: never more workers than shards per rank
        workers = min(self.num_workers, len(self.val_urls) // self.world_size)
        if workers < self.num_workers:
            log.info("validation uses %d loader worker(s) for %d shard(s) on %d rank(s)", workers,
                     len(self.val_urls), self.world_size)
        pipeline = build_twin_pipeline(
            self.val_urls, self.spec.preprocess_val, self.spec.tokenizer, self.val_batch_size, train=False,
            caption_context_length=self.caption_context_length, concept_context_length=self._concept_ctx(),
            num_workers=workers, world_size=self.world_size, max_pixels=self.max_pixels, on_error=self.on_error)
        # own generator: starting the loader draws no number from the process-wide RNG (exact resume)
        return make_loader(pipeline, num_workers=workers, world_size=self.world_size, generator=torch.Generator())

    def state_dict(self) -> dict:
        """Where the training stream stands: the epoch and the micro-batches of it trained on."""
        if self.trainer is None:
            return {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"global_step": int(self.trainer.global_step), "epoch": int(self.trainer.current_epoch),
                "batches_in_epoch": int(progress.ready)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict)
