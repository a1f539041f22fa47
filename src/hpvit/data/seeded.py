"""Reproducible data order and augmentation, independent of worker count and of resuming.

* :class:`ResumableSampler` draws a permutation from ``(seed, epoch)``, shards it over ranks and can
  start part-way into an epoch, so a resumed run sees exactly the batches it would have seen.
* :class:`SeededDataset` seeds ``random``, ``numpy`` and ``torch`` from ``(seed, epoch, index)`` before
  each sample's transform (timm's RandAugment, random resized crop and random erasing draw from all
  three), so sample ``i`` of epoch ``e`` is augmented identically in every run. In the main process
  the global RNG states are restored afterwards, so data loading never perturbs the model's RNG.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Indices for one rank: a seeded permutation per epoch (or ``range`` when not shuffling).

    The global index list is padded (by wrapping) to a multiple of ``world_size`` and rank ``r``
    takes every ``world_size``-th index starting at ``r``. ``set_epoch(e, start=k)`` skips the
    first ``k`` indices of this rank's share (used when resuming mid-epoch).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad:
            total = math.ceil(self.n / self.world_size) * self.world_size
            idx = (idx * math.ceil(total / max(self.n, 1)))[:total] if total > self.n else idx
        return idx[self.rank :: self.world_size]

    def per_rank(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(self.per_rank() - self.start, 0)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that item ``i`` in epoch ``e`` is produced under a fixed RNG seed."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int):
        s = (self.seed * 1_000_003 + self.epoch * 100_000_007 + int(idx) * 7919) % (2**32)
        in_worker = torch.utils.data.get_worker_info() is not None
        if not in_worker:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)  # CPU generator only: cheap, never touches CUDA
            return self.dataset[idx]
        finally:
            if not in_worker:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
