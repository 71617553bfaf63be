"""Progressive resizing: the training image size as a pure function of the epoch (no torch).

FFCV's ResNet recipes train at a small size first and grow it towards the end (160 -> 192 px, evaluated at
224): early epochs cost a fraction of the pixels, and the train-test resolution effect means the network still
evaluates well at a larger size. :func:`progressive_size` is the one rule every backend follows: the torch
loader per sample (the size is derived from the epoch in the sample's key), the cache per batch on the device,
DALI per batch through ``external_source``. A loader learns the epoch, hence the size, in ``set_epoch(e)``; a
resumed run therefore continues at the size of its epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fasttrain.config import Config

__all__ = ["progressive_size", "TrainSizes", "train_sizes"]


def progressive_size(epoch: int, low: int, high: int, start: float, end: float, step: int) -> int:
    """The training size at ``epoch`` (0-based): ``low`` up to epoch ``start``, ``high`` from epoch ``end`` on,
    linear in between, rounded to the nearest multiple of ``step`` and kept within ``low..high`` (FFCV's
    ``get_resolution``). ``end <= start`` jumps from ``low`` to ``high`` at ``start``."""
    if end <= start:
        return low if epoch < start else high
    if epoch <= start:
        return low
    if epoch >= end:
        return high
    share = (epoch - start) / (end - start)
    size = math.floor((low + share * (high - low)) / step + 0.5) * step  # halves up (round() goes to even)
    return max(low, min(high, size))


@dataclass(frozen=True)
class TrainSizes:
    """A run's training sizes: :func:`progressive_size` with its settings resolved (``fixed`` when off)."""

    low: int
    high: int
    start: float
    end: float
    step: int
    epochs: int
    """Epochs of the run (for :meth:`distinct`)."""

    @classmethod
    def fixed(cls, size: int, epochs: int = 1) -> TrainSizes:
        return cls(size, size, 0.0, 0.0, 1, epochs)

    @property
    def progressive(self) -> bool:
        return self.low != self.high

    @property
    def largest(self) -> int:
        return self.high

    def size(self, epoch: int) -> int:
        return progressive_size(epoch, self.low, self.high, self.start, self.end, self.step)

    @property
    def first_largest_epoch(self) -> int:
        """The first epoch at the largest size: where a measurement (bench, autotune) starts its loader, so that
        it times the size the run ends at (and its memory peak)."""
        last = math.ceil(max(self.start, self.end))
        return next(e for e in range(last + 1) if self.size(e) == self.high)  # rounding may get there earlier

    def distinct(self) -> list[int]:
        """The sizes the run's epochs train at, in order of first use (torch.compile compiles once for each)."""
        out: list[int] = []
        for e in range(self.epochs):
            s = self.size(e)
            if s not in out:
                out.append(s)
        return out


def train_sizes(cfg: Config, epochs: int | None = None) -> TrainSizes:
    """The training sizes of ``cfg``: ``data.progressive`` over ``data.progressive_epochs`` (empty: the whole
    run, epoch 0 to the last of ``epochs``, default ``train.epochs``), else ``data.image_size`` throughout."""
    d = cfg.data
    n = epochs if epochs is not None else cfg.train.epochs
    if not d.progressive:
        return TrainSizes.fixed(d.image_size, n)
    low, high = d.progressive
    start, end = d.progressive_epochs if d.progressive_epochs else (0.0, float(max(n - 1, 0)))
    return TrainSizes(low, high, float(start), float(end), d.progressive_step, n)
