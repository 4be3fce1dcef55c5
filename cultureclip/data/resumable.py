"""Exact resume of the training stream: a resumed run sees the batches an uninterrupted run would.

The training stream is a function of (seed, epoch, rank, worker) only: shard resampling and the
shuffle are seeded by them (``cultureclip.data.pipeline``), and :class:`IsolatedRNG` gives the random
augmentations their own generator state, seeded the same way, instead of the process-wide one that
the model (dropout), DataLoader start-up and validation also draw from. A resumed run then builds
the stream for the checkpoint's epoch and drops the batches that epoch already trained on
(:class:`SkipFirstBatches`). Dropping costs the loading (not the training) of those batches; it is
done in the main process because each DataLoader worker holds its own part of the round-robin
order, which dropping inside the workers would change.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds


class IsolatedRNG:
    """Pipeline stage (last): run everything upstream with private torch/numpy/python RNG states.

    Each pass (epoch) starts from ``make_seed(seed, epoch, rank, worker)``; around every item pulled
    from upstream the process-wide states are swapped for the private ones and back, so data
    augmentation and the rest of the program never see each other's random numbers (also with
    ``num_workers=0``, where both run in the main process).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = -1  # like ResampledShards: +1 on every pass, so the first pass is epoch 0

    def __call__(self, src: Iterable) -> Iterator:
        self.epoch += 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        seed = wds.utils.make_seed(self.seed, self.epoch, rank, worker)
        return self._run(src, seed)

    @staticmethod
    def _run(src: Iterable, seed: int) -> Iterator:
        outer = _get_states()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        mine = _get_states()
        _set_states(outer)
        it = iter(src)
        while True:
            outer = _get_states()
            _set_states(mine)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                mine = _get_states()
                _set_states(outer)
            yield item


def _get_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def rng_states() -> dict:
    """Every process-wide RNG state as tensors and plain tuples, so a checkpoint holding it loads with
    ``weights_only=True``."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def restore_rng_states(rng: dict) -> None:
    """Set the RNG states saved by :func:`rng_states` (tuples may come back as lists)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


def set_stream_epoch(pipeline: wds.DataPipeline, epoch: int) -> None:
    """Make the next pass of ``pipeline`` the one of ``epoch`` (resampling, shuffle, RNG)."""
    pipeline.set_epoch(epoch)
    for stage in pipeline.pipeline:
        if isinstance(stage, IsolatedRNG):
            stage.epoch = epoch - 1


class SkipFirstBatches:
    """Iterable over a loader whose first pass drops its first ``skip`` batches (a resumed epoch).

    The loader's own iterator is created at the first ``next()``, not at ``iter()``: Lightning calls
    ``iter()`` once without reading, only to check the object, and that must not use up a pass (with
    workers, start them and make them begin an epoch).
    """

    def __init__(self, loader: Iterable, skip: int = 0) -> None:
        self.loader, self.skip = loader, int(skip)

    def __iter__(self) -> Iterator:
        return self._batches()

    def _batches(self) -> Iterator:
        it = iter(self.loader)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it
