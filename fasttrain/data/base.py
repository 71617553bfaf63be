"""The loader contract every backend honours, and the device-side input preparation they share.

A loader yields :class:`Batch` objects already on the training device: images as NCHW float tensors in the
model's input dtype, normalized, with channels_last strides when asked; targets as int64 class indices,
float targets or a second image batch. It knows its ``len()`` (batches per epoch), reshuffles on
``set_epoch(e)`` and releases workers / pipelines on ``close()``. The engine never asks which backend it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Batch", "Loader", "InputSpec", "normalize_on_device", "model_input"]


@dataclass
class Batch:
    inputs: torch.Tensor
    """N x C x H x W, on the device, normalized, in the model's input dtype."""
    targets: torch.Tensor
    """int64 class indices (N), float targets (N x K), or a target image batch (N x C x H x W)."""

    def __len__(self) -> int:
        return self.inputs.shape[0]


@runtime_checkable
class Loader(Protocol):
    batch_size: int
    num_samples: int

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model inputs on the device (decided once by the runtime and the config)."""

    device: torch.device
    dtype: torch.dtype
    """Input dtype: float32, or the autocast dtype (bf16/fp16) so the first layer reads half the bytes."""
    channels_last: bool
    mean: tuple[float, ...]
    """Per-channel mean on the 0..1 scale."""
    std: tuple[float, ...]

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 / (255 * std), -mean / std) as C x 1 x 1 float32 tensors on the device: x * a + b normalizes uint8."""
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        a = (1.0 / (255.0 * std)).view(-1, 1, 1)
        b = (-mean / std).view(-1, 1, 1)
        return a.to(self.device), b.to(self.device)


def normalize_on_device(images: torch.Tensor, spec: InputSpec, scale_shift=None) -> torch.Tensor:
    """uint8 N x C x H x W (any device) -> normalized float on ``spec.device`` in ``spec.dtype``.

    The copy is non-blocking (the source should be pinned); normalization runs on the device in float32, then
    the result is cast, so the host only ever moves uint8 (4x fewer bytes than float32).
    """
    a, b = scale_shift if scale_shift is not None else spec.scale_shift()
    x = images.to(spec.device, non_blocking=True)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = torch.addcmul(b, x.float(), a)  # keeps the memory format of x
    x = x.to(spec.dtype)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def model_input(x: torch.Tensor, spec: InputSpec, *, pixels: bool, scale_shift=None) -> torch.Tensor:
    """A batch of images as the model takes it, on ``spec.device``: ``pixels`` (0..255 values, uint8 or already
    resampled to float) are normalized by :func:`normalize_on_device`; anything else is a float batch a dataset
    already normalized, only moved, cast to ``spec.dtype`` and laid out channels_last when the runtime says so."""
    if pixels:
        return normalize_on_device(x, spec, scale_shift)
    x = x.to(spec.device, non_blocking=True).to(spec.dtype)
    return x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x
