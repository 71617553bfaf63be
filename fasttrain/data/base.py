"""The loader contract every backend honours, what a loader is asked for, what a backend is, and the
device-side input preparation they share.

A loader yields :class:`Batch` objects already on the training device: images as NCHW float tensors in the
model's input dtype, normalized, with channels_last strides when asked; targets as int64 class indices,
float targets or a second image batch. It knows its ``len()`` (batches per epoch), reshuffles on
``set_epoch(e)``, starts mid-epoch after ``skip_batches(n)``, lists the files it left out in ``skipped`` and
releases workers / pipelines on ``close()``. The engine never asks which backend it has.

A loader is built from one :class:`LoaderRequest` by a :class:`Backend`: one object per backend module
(``BACKEND``), named in the ``backends`` table of :mod:`fasttrain.registry`. The backend also says which samples
it serves here, whether ``data.loader = auto`` should take it, the settings autotune may try and the device
memory it holds for the whole run, so neither the choice policy (:mod:`fasttrain.data.loaders`) nor autotune
knows any backend by name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fasttrain.data.order import EpochSampler

if TYPE_CHECKING:
    from fasttrain.config import Config, DataConfig
    from fasttrain.data.samples import Samples

__all__ = [
    "Batch",
    "Loader",
    "LoaderRequest",
    "RunSamples",
    "Backend",
    "epoch_order",
    "InputSpec",
    "normalize_on_device",
    "model_input",
]


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
    skipped: list[tuple[str, str]]
    """(path or item, reason) of every sample left out so far: by the pre-check, and any that failed since."""
    order: str
    """What the epoch's order depends on beyond (seed, epoch) and the processes' shards, in words ("" for none):
    a checkpoint taken mid-epoch keeps it, and a resume whose loader says otherwise is warned that the rest of
    that epoch draws another order (a streamed root's: the workers and the shuffle buffer)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def skip_batches(self, n: int) -> None:
        """The next iteration starts ``n`` batches into the epoch, yielding what a full pass yields from there
        (a resumed run replays the same batches)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoaderRequest:
    """One loader as a task asks for it, the same for every backend: its samples, training or evaluation, the
    batch of this process and, under torchrun, its shard: ``num_shards`` is the world size and ``shard_id`` the
    global rank (the epoch's order stays a function of (seed, epoch); see :mod:`fasttrain.data.order`)."""

    samples: Samples
    train: bool
    batch_size: int
    num_shards: int = 1
    shard_id: int = 0


@dataclass(frozen=True)
class RunSamples:
    """Every sample a run reads (the training split's, and the validation split's if any): what the backend
    choice weighs and what a backend that keeps the dataset on the device holds."""

    train: Samples
    val: Samples | None = None

    @property
    def kind(self) -> str:
        return self.train.kind

    def __len__(self) -> int:
        return len(self.train.split) + (len(self.val.split) if self.val is not None else 0)


class Backend:
    """A loader backend: its module exposes one instance (``BACKEND``) and the ``backends`` table of
    :mod:`fasttrain.registry` names it. The defaults here are a streaming backend's that ``auto`` never picks;
    a backend overrides what differs.

    ``rank``: its place in ``data.loader = auto``, which tries the backends from the highest rank down and takes
    the first that serves the run's samples and fits them (None: only when asked by name). Today: the GPU cache
    30, DALI 20, torch 0 (the fallback that serves everything)."""

    name: str = ""
    rank: int | None = None

    def build(self, request: LoaderRequest, cfg: Config, spec: InputSpec) -> Loader:
        """The loader for ``request`` (see :class:`Loader`)."""
        raise NotImplementedError

    def serves(self, run: RunSamples, cfg: Config, device: torch.device) -> tuple[bool, str]:
        """Whether it can load these samples under this config on ``device`` at all: (False, why not), which
        refuses an explicit ``data.loader``; or (True, a few words on how it runs here, '' for nothing)."""
        return True, ""

    def fits(
        self, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None = None
    ) -> tuple[bool, str]:
        """Asked after :meth:`serves` said yes: whether ``auto`` should take it here, and why (words that follow
        "auto: "). An explicit choice that does not fit runs with a warning. ``memory_limit``: device bytes the
        run may use when smaller than the card (autotune's budget)."""
        return True, f"the {self.name} backend serves the samples"

    def knobs(self, data: DataConfig, device_type: str) -> list[dict[str, Any]]:
        """The ``data.*`` settings autotune may try end to end, the config's own first (each a dict for
        ``dataclasses.replace(data, ...)``); ``[{}]``: nothing to tune."""
        return [{}]

    @staticmethod
    def ladder(
        given: dict[str, Any], others: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]
    ) -> list[dict[str, Any]]:
        """For :meth:`knobs`: ``given`` then those of ``others`` that resolve (``key``) to a setting not yet
        listed, so no two entries run the same loader (``workers = -1`` is the machine's count, say)."""
        ladder, seen = [given], {key(given)}
        for s in others:
            k = key(s)
            if k not in seen:
                seen.add(k)
                ladder.append(s)
        return ladder

    def queue_depth(self, data: DataConfig) -> int:
        """Batches a loader prepares ahead (autotune drains them before it times the loader)."""
        return 0

    def resident_bytes(self, run: RunSamples, cfg: Config) -> int:
        """Device bytes it holds for the whole run beside the batches (a cache's decoded dataset; 0 for a backend
        that streams): autotune holds as much while it probes."""
        return 0


def epoch_order(
    num_samples: int,
    batch_size: int,
    train: bool,
    seed: int,
    num_shards: int = 1,
    shard_id: int = 0,
    *,
    refuse_empty: str = "",
    split: str = "",
) -> EpochSampler:
    """The order every backend visits a split in (:class:`~fasttrain.data.order.EpochSampler`): training shuffled
    per (seed, epoch) and trimmed to whole global batches, evaluation in order and whole; this process's shard.
    ``refuse_empty``: set (the loader's name, for the reader) to refuse with a ValueError naming train.batch_size a
    training split with not one batch in it (a loader that decodes everything before its first step; the engine
    words it otherwise)."""
    sampler = EpochSampler(
        num_samples,
        batch_size=batch_size,
        shuffle=train,
        seed=seed,
        drop_last=train,
        num_shards=num_shards,
        shard_id=shard_id,
    )
    if refuse_empty and train and len(sampler) == 0:
        shards = f" x {num_shards} processes" if num_shards > 1 else ""
        raise ValueError(
            f"train.batch_size: the {split or 'train'} split has {num_samples} usable images, fewer than one batch "
            f"of {batch_size}{shards} (training drops partial batches); lower train.batch_size"
        )
    return sampler


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
