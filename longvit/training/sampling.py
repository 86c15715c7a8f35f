"""Reproducible per-epoch randomness for slide datasets (shuffling and token subsets).

``EpochSampler`` yields ``(index, seed)`` pairs: the order is a permutation drawn from
(seed, epoch) and each item's seed is derived from (seed, epoch, index). Datasets draw their
random token subset and augmentations from that item seed, never from global state, so a run
resumed from a checkpoint at epoch e sees exactly the batches an uninterrupted run sees, in any
number of DataLoader workers. Lightning calls ``set_epoch`` on the sampler before each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Indices 0..n-1 (shuffled per epoch when shuffle=True) paired with per-item seeds.

    Under DDP, Lightning wraps it in a ``DistributedSamplerWrapper`` (use_distributed_sampler),
    which splits its output over the ranks.
    """

    def __init__(self, num_items: int, shuffle: bool, seed: int = 0):
        self.num_items, self.shuffle, self.seed = int(num_items), bool(shuffle), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        for index in order:
            yield int(index), item_seed(self.seed, self.epoch, int(index))

    def __len__(self) -> int:
        return self.num_items


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def split_key(key) -> tuple[int, int | None]:
    """A dataset key: an int index, or an (index, seed) pair from ``EpochSampler``."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None
