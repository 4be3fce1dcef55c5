"""LightningDataModule over the twin-pair pipeline: a resampled training stream, a deterministic
validation pass, and the validation concept vocabulary for ``val/concept_top1``."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence, Union

import lightning as L
import torch
import webdataset as wds

from cultureclip import schema
from cultureclip.data.pipeline import build_twin_pipeline, count_pairs, expand_shards, make_loader
from cultureclip.data.resumable import IsolatedRNG, SkipFirstBatches, set_stream_epoch

log = logging.getLogger(__name__)


def read_concept_names(urls: Sequence[str]) -> list[str]:
    """Sorted concept names of a split, read from the json members only (images are not decoded)."""
    names: set[str] = set()
    stream = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())
    for sample in stream:
        if schema.META not in sample:
            continue
        meta = json.loads(sample[schema.META])
        names.update(meta[k] for k in schema.CONCEPT_KEYS if isinstance(meta.get(k), str))
    if not names:
        raise ValueError(f"no concept names found in {len(urls)} validation shard(s): {urls[:3]}")
    return sorted(names)


class TwinDataModule(L.LightningDataModule):
    """Twin-pair shards for training and validation.

    Args:
        train_shards, val_shards: shard specs (paths, brace patterns, directories, ``::`` joins,
            ``pipe:``/URLs). Local specs are checked at construction, before any model is built.
        batch_size: pairs per micro-batch per device.
        val_batch_size: pairs per validation batch (default: batch_size).
        num_workers: loader workers per device.
        train_pairs_per_epoch: epoch length; default the ``sizes.json`` total.
        shuffle_buffer: sample shuffle buffer of the training stream.
        seed: data seed (shard resampling, shuffle, augmentation); mixed with rank, worker and epoch.
        caption_context_length: tokens per caption (None: the model's context length).
        concept_context_length: tokens per concept name; used only when the text tower allows a
            shorter context without changing features (``CultureCLIP.supports_short_context``).
        toy_dir: build the embedded toy set here first if it is missing (``cultureclip.data.toy``).
        toy_seed: seed of the toy set.

    Set ``encoder`` (a ``CultureCLIP``) before fitting: its transforms and tokenizer are used.
    """

    def __init__(self, train_shards: Union[str, Sequence[str]], val_shards: Union[str, Sequence[str], None] = None,
                 batch_size: int = 128, val_batch_size: Optional[int] = None, num_workers: int = 4,
                 train_pairs_per_epoch: Optional[int] = None, shuffle_buffer: int = 1000, seed: int = 0,
                 caption_context_length: Optional[int] = None, concept_context_length: Optional[int] = 16,
                 toy_dir: Optional[str] = None, toy_seed: int = 0):
        super().__init__()
        if toy_dir:
            from cultureclip.data.toy import ensure_toy_shards
            ensure_toy_shards(toy_dir, seed=toy_seed)
        self.train_urls = expand_shards(train_shards)  # raises naming a pattern that matches nothing
        self.val_urls = expand_shards(val_shards) if val_shards else []
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.caption_context_length, self.concept_context_length = caption_context_length, concept_context_length
        pairs = train_pairs_per_epoch or count_pairs(self.train_urls)
        if not pairs:
            raise ValueError(f"train shards {self.train_urls[:2]}... have no sizes.json beside them: "
                             f"set data.train_pairs_per_epoch")
        self.train_pairs_per_epoch = int(pairs)
        self.encoder = None
        self.val_concepts: list[str] = []
        self._resume: dict = {}  # state_dict() of the checkpoint resumed from

    def _require_encoder(self):
        if self.encoder is None:
            raise RuntimeError("TwinDataModule.encoder is not set: assign the CultureCLIP model first")
        return self.encoder

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else int(os.environ.get("WORLD_SIZE", 1))

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per device per epoch: the epoch's pairs spread over all devices."""
        return max(1, math.ceil(self.train_pairs_per_epoch / (self.batch_size * self.world_size)))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.val_urls and not self.val_concepts:
            self.val_concepts = read_concept_names(self.val_urls)

    def _concept_ctx(self) -> Optional[int]:
        return self.concept_context_length if self._require_encoder().supports_short_context else None

    def train_dataloader(self):
        enc = self._require_encoder()
        pipeline = build_twin_pipeline(
            self.train_urls, enc.preprocess_train, enc.tokenizer, self.batch_size, train=True, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, caption_context_length=self.caption_context_length,
            concept_context_length=self._concept_ctx())
        # exact resume: the stream depends on (seed, epoch, rank, worker) only; a resumed run starts the
        # checkpoint's epoch and drops the batches it already trained on (cultureclip.data.resumable)
        pipeline.append(IsolatedRNG(self.seed))
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        set_stream_epoch(pipeline, epoch)
        skip = self._resume.get("batches_in_epoch", 0) if self._resume.get("epoch") == epoch else 0
        loader = make_loader(pipeline, num_workers=self.num_workers, epoch_length_batches=self.batches_per_epoch,
                             pin_memory=torch.cuda.is_available(), generator=torch.Generator())
        return SkipFirstBatches(loader, skip)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        enc = self._require_encoder()
        # an evaluation pass hands out whole shards: never more workers than shards per rank
        workers = min(self.num_workers, len(self.val_urls) // self.world_size)
        if workers < self.num_workers:
            log.info("validation uses %d loader worker(s) for %d shard(s) on %d rank(s)", workers,
                     len(self.val_urls), self.world_size)
        pipeline = build_twin_pipeline(
            self.val_urls, enc.preprocess_val, enc.tokenizer, self.val_batch_size, train=False,
            caption_context_length=self.caption_context_length, concept_context_length=self._concept_ctx(),
            num_workers=workers, world_size=self.world_size)
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
