"""Sample order and per-sample randomness, shared by every backend: which samples an epoch visits, in which
order, on which process, and the seed of each sample's augmentation.

An epoch's **global** order is a pure function of (seed, epoch): a seeded permutation for training, the
identity for evaluation. Under torchrun each process (shard) takes an interleaved slice of it. For training the
order is first trimmed to whole *global* batches (per-process batch x processes), so every process yields the
same number of batches (unequal counts would leave data-parallel ranks waiting for each other for ever) and
global step k covers global positions [k x G, (k + 1) x G) whatever the number of processes: a run resumed on
another world size visits the same samples. Evaluation visits every sample exactly once across processes (the
slices may differ by one sample).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "sample_seed", "sample_seeds", "alternate_flips", "check_shard"]

_M64 = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, sample index)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _M64
    return (x ^ (x >> 29)) & (2**63 - 1)


def sample_seeds(seed: int, epoch: int, indices) -> np.ndarray:
    """:func:`sample_seed` for many non-negative indices at once (uint64; the same values, modulo 2**64)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    base = np.array([(seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & _M64], dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the masked Python version does
        x = base + idx * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xD6E8FEB86659FD93)
        x ^= x >> np.uint64(29)
    return x & np.uint64(2**63 - 1)


def alternate_flips(seed: int, epoch: int, indices) -> np.ndarray:
    """airbench's alternating flip per sample index (``data.flip_alternate``): a fair coin from (seed, index) alone
    says whether the image is mirrored in epoch 0 and every even epoch; every odd epoch shows the other side. A
    stream of its own: epoch key -2, which no epoch has."""
    first = (sample_seeds(seed, -2, indices) >> np.uint64(62)).astype(bool)  # the top of 63 mixed bits
    return first ^ bool(epoch % 2)


def check_shard(num_shards: int, shard_id: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} of {num_shards}: need num_shards >= 1 and 0 <= shard_id < num_shards")


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` pairs of this shard: see the module docstring for the order.

    ``drop_last`` (training) trims the global order to whole global batches (``batch_size`` x ``num_shards``)
    before it is sliced, so every step has one shape (what torch.compile and cudnn.benchmark like) and every
    shard the same length.
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        num_shards: int = 1,
        shard_id: int = 0,
    ):
        check_shard(num_shards, shard_id)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.num_shards, self.shard_id = drop_last, num_shards, shard_id
        self.epoch = 0
        self.start = 0
        """Samples of this shard's epoch to leave out of the next iteration only (resuming mid-epoch)."""

    def global_order(self, epoch: int | None = None) -> list[int]:
        """Every shard's samples of ``epoch`` (default: the current one) in global order, trimmed to whole
        global batches when ``drop_last``."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            whole = self.batch_size * self.num_shards
            order = order[: len(order) // whole * whole]
        return order

    def indices(self, epoch: int | None = None) -> list[int]:
        """This shard's sample order for ``epoch`` (default: the current one)."""
        return self.global_order(epoch)[self.shard_id :: self.num_shards]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start, self.start = self.epoch, self.start, 0
        return iter([(i, epoch) for i in self.indices()[start:]])

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // (self.batch_size * self.num_shards) * self.batch_size
        return len(range(self.shard_id, self.n, self.num_shards))
