"""GPU-resident cache: a dataset decoded once into tensors on the device, every batch gathered and augmented there.

What is cached is a map-style dataset's deterministic path (:func:`fasttrain.data.samples.dataset_for` with
``deterministic=True``), decoded once by threads (small images, whose decode holds the GIL: by worker processes);
a task's augmentation then runs on the device per batch:

- ``class``: evaluation (and training without random-resized-crop) stores exactly the torch backend's
  evaluation pixels (shorter side to ``eval_resize``, centre crop ``image_size``), so validation numbers match
  the torch loader. Training with random-resized-crop stores the image's centre square resized to
  ``image_size`` and crops from it (one ``affine_grid`` + ``grid_sample``, the flip folded into the x scale):
  the crop is upsampled to ``image_size``, so small-scale crops are softer than crops of the full-resolution
  file. A larger canvas would cost memory quadratically, and datasets small enough for this cache are usually
  small-image datasets (CIFAR-size), where the canvas is the original image anyway.
- ``vector``: the whole image resized square and the float target vector: the torch backend's batches exactly
  (regression has no augmentation).
- ``pair``: both images, at ``image_size`` for evaluation and at the jitter size for training, where each step
  crops the :func:`~fasttrain.data.samples.pair_jitter` window from both and flips both or neither: the same
  windows as the torch backend, so its training batches are the torch backend's too, bit for bit.
- any map-style dataset of (image, target) items of one shape: :meth:`GpuCacheLoader.from_dataset`.

Progressive resizing (``data.progressive``): the training canvas is cached at the largest training size and each
batch is sampled at its epoch's size (the crop's ``grid_sample`` writes that size directly; without a crop an
antialiased resize follows), so one cache serves every size.

Augmentation parameters are drawn per sample from (seed, epoch, index) on the CPU once per epoch, and copied to
the device with the epoch's order: after construction that copy is the only host-to-device traffic, and an
epoch's batches do not depend on what ran before (``skip_batches`` resumes mid-epoch exactly). On a CPU device
the same code caches in RAM.

**Under torchrun** the order is :class:`~fasttrain.data.order.EpochSampler`'s, a function of (seed, epoch)
whatever the world size. A training epoch's slice for one rank is a different subset of the data every epoch,
so a rank that held only a fixed shard could not serve it: **training caches the whole split on every rank**
(the device memory of one-GPU training, which is what ``cache_fits`` checks; each rank decodes it once at
start), and in exchange a resumed run visits the same samples on any number of processes. **Evaluation caches
only the rank's shard** (every sample exactly once across ranks). Shuffling only within a fixed per-rank shard
would save the memory but tie the order to the world size.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fasttrain.config import Config, DataConfig, TrainConfig, trained_samples
from fasttrain.data.base import Backend, Batch, InputSpec, LoaderRequest, RunSamples, epoch_order, model_input
from fasttrain.data.checks import BadFiles
from fasttrain.data.order import alternate_flips, check_shard, sample_seeds
from fasttrain.data.progressive import TrainSizes, train_sizes
from fasttrain.data.samples import (
    Samples,
    Skip,
    dataset_for,
    needs_pil,
    pair_jitter,
    pair_load_size,
    precheck_samples,
    targets_tensor,
)
from fasttrain.data.user import DatasetSplit, dataset_parts, dataset_refusal
from fasttrain.numbers import GIB
from fasttrain.stop import ignore_stop_signals

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "cache_bytes",
    "dataset_cache_bytes",
    "cache_fits",
    "sample_bytes",
    "GpuCacheLoader",
    "DeviceAugment",
    "Take",
    "ResizedCropFlip",
    "PairCropFlip",
    "random_resized_crop_theta",
    "translate_flip",
    "translate_plan",
]

_RRC_ATTEMPTS = 10  # as torchvision: the first of 10 sampled windows that fits the canvas is used


# -- sizing ---------------------------------------------------------------------------------------------------


def sample_bytes(kind: str, data: DataConfig, *, train: bool = False, num_targets: int = 0) -> int:
    """Bytes one cached sample takes: uint8 pixels plus its target (int64 label, float32 vector, or a second
    image: pairs at the training jitter size when ``train``)."""
    c, s = data.channels, data.image_size
    if kind == "class":  # training: the canvas at the largest training size; evaluation: the evaluation crop
        s = data.train_size_max if train else data.eval_crop
    if kind == "pair":
        side = pair_load_size(s) if train else s
        return 2 * c * side * side
    if kind == "vector":
        return c * s * s + 4 * num_targets
    return c * s * s + 8


def cache_bytes(
    num_images: int, data: DataConfig, kind: str = "class", *, train: bool = False, num_targets: int = 0
) -> int:
    """Bytes the cache holds for ``num_images`` samples (see :func:`sample_bytes`)."""
    return num_images * sample_bytes(kind, data, train=train, num_targets=num_targets)


def dataset_cache_bytes(
    num_images: int, data: DataConfig, *, kind: str = "class", train_images: int | None = None, num_targets: int = 0
) -> int:
    """Bytes the cache holds for a whole dataset: ``train_images`` of the ``num_images`` at the training size
    (pairs: the jitter canvas), the rest at the eval size. What :func:`cache_fits` weighs and autotune holds."""
    train_n = min(train_images or 0, num_images)
    return cache_bytes(train_n, data, kind, train=True, num_targets=num_targets) + cache_bytes(
        num_images - train_n, data, kind, num_targets=num_targets
    )


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_fits(
    num_images: int,
    data: DataConfig,
    device: torch.device | str | None = None,
    *,
    memory_limit: int | None = None,
    kind: str = "class",
    train_images: int | None = None,
    num_targets: int = 0,
    sample_nbytes: int | None = None,
) -> tuple[bool, str]:
    """(fits, why): the decoded dataset vs ``data.cache_budget`` of the device's total memory (CUDA) or of the
    RAM available now (CPU). ``device=None`` means CUDA when present, as ``runtime.device = auto`` does.
    ``memory_limit`` (bytes) caps the CUDA total: autotune's emulated budget, smaller than the card.
    ``kind`` / ``num_targets``: what a sample holds; ``train_images`` of the ``num_images`` are cached at the
    training size (pairs: the jitter canvas; default: none). ``sample_nbytes``: bytes per sample when the samples
    are not files decoded to uint8 (a dataset from Python: its items' own size)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    train_n = min(train_images or 0, num_images)
    need = (
        num_images * sample_nbytes
        if sample_nbytes is not None
        else dataset_cache_bytes(num_images, data, kind=kind, train_images=train_images, num_targets=num_targets)
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total, where = props.total_memory, f"{props.name} memory"
        if memory_limit is not None and memory_limit < total:
            total, where = memory_limit, "memory budget"
    else:
        total, where = _available_ram(), "available RAM"
    budget = int(data.cache_budget * total)
    fits = need <= budget
    c, s = data.channels, data.image_size
    if sample_nbytes is not None:
        what = f"{num_images} items x {sample_nbytes} bytes"
    elif kind == "pair":
        what = f"{num_images} pairs x 2 x {c}x{s}x{s}" + (f" ({train_n} at {pair_load_size(s)} px)" if train_n else "")
    else:
        what = f"{num_images} images x {c}x{s}x{s}"
    what += "" if sample_nbytes is not None else " uint8"
    why = (
        f"{what} = {need / GIB:.2f} GiB {'<=' if fits else '>'} data.cache_budget {data.cache_budget:g} x "
        f"{total / GIB:.1f} GiB {where} = {budget / GIB:.2f} GiB"
    )
    return fits, why


# -- augmentation on the device -----------------------------------------------------------------------------------


def _uniforms(seeds: np.ndarray, k: int) -> np.ndarray:
    """n x k uniforms in [0, 1) per 63-bit seed: splitmix64 of seed + j x golden ratio (counter-based, vectorized)."""
    with np.errstate(over="ignore"):
        x = seeds[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_resized_crop_theta(
    seed: int, epoch: int, ids, scale_min: float, flip: bool, flips: np.ndarray | None = None
) -> torch.Tensor:
    """n x 2 x 3 float32 ``affine_grid`` matrices, one per sample id: torchvision's random-resized-crop (area
    scale_min..1, log-uniform aspect 3/4..4/3, first of 10 attempts that fits, else the whole canvas) on a square
    canvas, in continuous coordinates, with a random horizontal flip as a negative x scale when ``flip`` (where
    ``flips`` says, when given: alternating flips). Drawn from (seed, epoch, id) alone: a sample's window does not
    depend on the batch it is in."""
    u = _uniforms(sample_seeds(seed, epoch, ids), 2 * _RRC_ATTEMPTS + 3)
    n = u.shape[0]
    area = scale_min + (1.0 - scale_min) * u[:, :_RRC_ATTEMPTS]
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    ratio = np.exp(lo + (hi - lo) * u[:, _RRC_ATTEMPTS : 2 * _RRC_ATTEMPTS])
    w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)  # shares of the canvas side
    fits = (w <= 1) & (h <= 1)
    first = fits.argmax(axis=1)  # index of the first fitting attempt
    found = fits.any(axis=1)
    rows = np.arange(n)
    w = np.where(found, w[rows, first], 1.0)
    h = np.where(found, h[rows, first], 1.0)
    # Window centre in affine_grid's [-1, 1] coordinates, kept inside the canvas.
    cx = (2 * u[:, -3] - 1) * (1 - w)
    cy = (2 * u[:, -2] - 1) * (1 - h)
    mirrored = (u[:, -1] < 0.5) if flips is None else flips
    sx = np.where(mirrored, -w, w) if flip else w
    zero = np.zeros(n)
    theta = np.stack([np.stack([sx, zero, cx], 1), np.stack([zero, h, cy], 1)], 1)
    return torch.from_numpy(theta.astype(np.float32))


@dataclass
class Take:
    """One batch of an epoch's plan: its rows of the cache and their parameters, on the device and (for work
    the host plans without a sync) on the CPU."""

    rows: torch.Tensor
    rows_host: torch.Tensor
    params: torch.Tensor | None
    params_host: torch.Tensor | None
    size: int = 0
    """Side of the images to output (progressive resizing: the epoch's size); 0 = as cached."""


class DeviceAugment:
    """A task's augmentation in the cache: :meth:`plan` draws per-sample parameters for an epoch on the CPU (one
    copy to the device per epoch); :meth:`take` cuts a batch out of the cached tensors, by default a gather
    followed by :meth:`apply` on the device. This base class is the identity (evaluation, regression)."""

    def plan(self, seed: int, epoch: int, ids: np.ndarray) -> torch.Tensor | None:
        """Per-sample parameters (first dimension: ``len(ids)``), or None when there are none."""
        return None

    def take(self, images: torch.Tensor, targets: torch.Tensor, t: Take) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images[t.rows], targets[t.rows], t.params)

    def apply(self, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y


def translate_plan(seed: int, epoch: int, ids, pad: int, flip: bool, flips: np.ndarray | None = None) -> torch.Tensor:
    """n x 3 int64 per sample id: (flip 0/1, row offset, column offset), the offsets in 0..2 pad of the
    reflect-padded image (pad: no shift), drawn from (seed, epoch, id) alone; the flips ``flips`` when given
    (alternating flips)."""
    u = _uniforms(sample_seeds(seed, epoch, ids), 3)
    flipped = ((u[:, 0] < 0.5) if flips is None else flips) & flip
    offsets = np.minimum((u[:, 1:] * (2 * pad + 1)).astype(np.int64), 2 * pad)
    return torch.from_numpy(np.concatenate([flipped[:, None].astype(np.int64), offsets], 1))


def translate_flip(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of the N x C x H x W batch ``x`` shifted by its (row, column) offset of :func:`translate_plan`
    inside its reflect-padded self (``F.pad(mode='reflect')``: the edge pixel is not repeated), then mirrored
    where its flip says: torchvision's RandomCrop(padding=pad, padding_mode='reflect') then a flip. One gather
    of reflected indices, on any device and dtype (no padded copy); the result is channels_last."""
    n, _, h, w = x.shape
    flipped, dy, dx = params[:, 0].bool(), params[:, 1:2] - pad, params[:, 2:3] - pad

    def reflect(i: torch.Tensor, side: int) -> torch.Tensor:
        i = i.abs()
        return torch.where(i > side - 1, 2 * (side - 1) - i, i)

    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flipped[:, None], w - 1 - cols, cols)  # pixel j of the mirror is w - 1 - j of the shifted
    rows = reflect(torch.arange(h, device=x.device)[None, :] + dy, h)
    cols = reflect(cols + dx, w)
    picked = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # N H W C
    return picked.permute(0, 3, 1, 2)


class ResizedCropFlip(DeviceAugment):
    """Classification training: random-resized-crop of the cached canvas (:func:`random_resized_crop_theta`), or a
    random shift of up to ``translate`` pixels with the border reflected (:func:`translate_flip`), and/or a
    horizontal flip."""

    def __init__(self, *, rrc: bool, flip: bool, scale_min: float, translate: int = 0, alternate: bool = False):
        self.rrc, self.flip, self.scale_min, self.translate = rrc, flip, scale_min, translate
        self.alternate = alternate
        """Flips by :func:`~fasttrain.data.order.alternate_flips` (data.flip_alternate), not drawn per epoch."""

    def plan(self, seed, epoch, ids):
        flips = alternate_flips(seed, epoch, ids) if self.flip and self.alternate else None
        if self.rrc:
            return random_resized_crop_theta(seed, epoch, ids, self.scale_min, self.flip, flips)
        if self.translate:
            return translate_plan(seed, epoch, ids, self.translate, self.flip, flips)
        if self.flip:
            drawn = _uniforms(sample_seeds(seed, epoch, ids), 1)[:, 0] < 0.5 if flips is None else flips
            return torch.from_numpy(drawn)
        return None

    def take(self, images, targets, t):
        x, y = images[t.rows], targets[t.rows]
        if self.rrc and t.size:  # sampled straight at the epoch's size: one grid_sample, no second resize
            grid = F.affine_grid(t.params, [x.shape[0], x.shape[1], t.size, t.size], align_corners=False)
            return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False), y
        if self.translate and t.size and x.shape[-1] != t.size:  # shifted by whole pixels at the epoch's size
            x = F.interpolate(x.float(), size=(t.size, t.size), mode="bilinear", antialias=True, align_corners=False)
        return self.apply(x, y, t.params)

    def apply(self, x, y, params):
        if self.translate:
            return translate_flip(x, params, self.translate), y
        if self.rrc:
            grid = F.affine_grid(params, list(x.shape), align_corners=False)
            # Crops are at most the canvas, so this only upsamples: bilinear needs no antialiasing here.
            x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif self.flip:
            x = torch.where(params.view(-1, 1, 1, 1), x.flip(3), x)
        return x, y


class PairCropFlip(DeviceAugment):
    """pix2pix training: the same ``size`` window (and flip) cut from both cached images of a pair, drawn as the
    torch backend draws it (:func:`~fasttrain.data.samples.pair_jitter`)."""

    def __init__(self, *, size: int, load_size: int, flip: bool):
        self.size, self.room, self.flip = size, load_size - size + 1, flip

    def plan(self, seed, epoch, ids):
        top, left, flipped = pair_jitter(seed, epoch, ids, self.room, self.flip)
        return torch.from_numpy(np.stack([top, left, flipped], 1))

    def take(self, images, targets, t):
        # The windows are cut as views and stacked (one copy; offsets read from the host's copy of the plan, no
        # sync): ~100x faster than an index gather on the CPU, one batched concatenation on the GPU.
        s = self.size
        where = [(r, top, left) for r, (top, left) in zip(t.rows_host.tolist(), t.params_host[:, :2].tolist())]
        x = torch.stack([images[r, :, top : top + s, left : left + s] for r, top, left in where])
        y = torch.stack([targets[r, :, top : top + s, left : left + s] for r, top, left in where])
        flip = t.params[:, 2].bool().view(-1, 1, 1, 1)  # both images of a pair, or neither
        return torch.where(flip, x.flip(3), x), torch.where(flip, y.flip(3), y)


def _augment_for(samples: Samples, data: DataConfig, train: bool) -> DeviceAugment | None:
    if not train:
        return None
    if samples.kind == "class" and (data.random_resized_crop or data.hflip or data.translate):
        return ResizedCropFlip(
            rrc=data.random_resized_crop,
            flip=data.hflip,
            scale_min=data.crop_scale_min,
            translate=data.translate,
            alternate=data.flip_alternate,
        )
    if samples.kind == "pair":
        return PairCropFlip(
            size=data.image_size, load_size=pair_load_size(data.image_size, samples.jitter), flip=data.hflip
        )
    return None


# -- the loader ------------------------------------------------------------------------------------------------


class GpuCacheLoader:
    """The loader contract over samples held decoded on ``spec.device`` (see the module docstring).

    ``inputs``: N x C x H x W images (uint8: normalized with ``spec`` on the way out; float: taken as model-ready
    and only cast to ``spec.dtype``); ``targets``: N x ... (class indices, float vectors, or images when
    ``targets_are_images``, which get the inputs' treatment). ``ids``: each row's index in the dataset it came
    from (the augmentation is drawn per id). The order is :class:`EpochSampler`'s over the rows, this process's
    shard of it; training drops partial global batches, evaluation yields every row once.

    Build it with :meth:`from_dataset` (any map-style dataset) or ``BACKEND.build`` (a task's request).
    """

    order = ""
    """Nothing beyond (seed, epoch): see :attr:`fasttrain.data.base.Loader.order`."""

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        spec: InputSpec,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        augment: DeviceAugment | None = None,
        targets_are_images: bool = False,
        ids: Sequence[int] | None = None,
        num_shards: int = 1,
        shard_id: int = 0,
        skipped: list[tuple[str, str]] | None = None,
        name: str | None = None,
        sizes: TrainSizes | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"GpuCacheLoader: batch_size must be >= 1, got {batch_size}")
        check_shard(num_shards, shard_id)
        self.spec, self.train, self.seed, self.batch_size = spec, train, seed, batch_size
        self.augment = augment or DeviceAugment()
        self.sizes = sizes if sizes is not None and sizes.progressive else None
        """Progressive resizing: the side of each epoch's images (resized on the device per batch)."""
        self.targets_are_images = targets_are_images
        self.images = inputs.to(spec.device)
        self.targets = targets.to(spec.device)
        self.num_samples = len(self.images)
        self.ids = np.asarray(range(self.num_samples) if ids is None else ids, dtype=np.int64)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        """(path, reason) of the files the pre-check or the decode pass could not use."""
        name = name or ("train" if train else "evaluation")
        self.sampler = epoch_order(
            self.num_samples, batch_size, train, seed, num_shards, shard_id, refuse_empty="GpuCacheLoader", split=name
        )
        self._scale_shift = spec.scale_shift()
        self._start = 0
        log.info(
            "cached %d %s samples on %s: %.1f MiB",
            self.num_samples,
            name,
            spec.device,
            (self.images.numel() * self.images.element_size() + self.targets.numel() * self.targets.element_size())
            / 2**20,
        )

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        spec: InputSpec,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: DeviceAugment | None = None,
        targets_are_images: bool = False,
        num_shards: int = 1,
        shard_id: int = 0,
        threads: int = 1,
        processes: int = 0,
        skipped: list[tuple[str, str]] | None = None,
        max_bad: int = 10,
        name: str | None = None,
        sizes: TrainSizes | None = None,
    ) -> GpuCacheLoader:
        """Decode a map-style dataset once and serve it from ``spec.device``.

        ``dataset[i]`` (i an int) must give ``(image, target)``: the image a C x H x W tensor, uint8 (0..255) or
        float (model-ready), every item the same shape; the target a number, a tensor (all of one shape), or an
        image when ``targets_are_images``. An item that is None or a :class:`~fasttrain.data.samples.Skip` is left
        out and listed in ``skipped``; more than ``max_bad`` of them refuse the dataset. ``threads`` decode items
        concurrently (Pillow releases the GIL; keep 1 for a dataset that is not thread-safe); items whose decode
        holds the GIL (small images) go to ``processes`` forked workers when there are enough of them (with
        ``threads > 1``: :func:`_decode_rows`). The items must not
        be random: augmentation is ``augment``'s, on the device. Training caches every item (the order needs
        them all, see the module docstring); evaluation only the items of shard ``shard_id``.
        """
        check_shard(num_shards, shard_id)
        n = len(cast(Sized, dataset))
        rows = list(range(n)) if train else list(range(shard_id, n, num_shards))
        skipped = list(skipped or [])
        bad = BadFiles(skipped, max_bad, unit="decode pass of the cache")
        inputs, targets, ids = _decode_rows(dataset, rows, threads, bad, processes)
        if rows and not ids:
            raise bad.none_decoded(name or ("train" if train else "evaluation"))
        # Evaluation rows are this shard's already; training rows are sharded by the sampler.
        return cls(
            inputs,
            targets,
            spec,
            batch_size=batch_size,
            train=train,
            seed=seed,
            augment=augment,
            targets_are_images=targets_are_images,
            ids=ids,
            num_shards=num_shards if train else 1,
            shard_id=shard_id if train else 0,
            skipped=skipped,
            name=name,
            sizes=sizes,
        )

    # -- the loader contract -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    @property
    def image_size(self) -> int:
        """Side of the images the current epoch yields (the cached side unless progressive resizing)."""
        return self.sizes.size(self.sampler.epoch) if self.sizes is not None else int(self.images.shape[-1])

    def skip_batches(self, n: int) -> None:
        """Start the next iteration ``n`` batches into the epoch (resume mid-epoch): augmentation is drawn per
        sample, so the batches after the skip are those of a full pass."""
        self._start = n

    def close(self) -> None:
        self.images = self.targets = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Batch]:
        device, epoch = self.spec.device, self.sampler.epoch
        start, self._start = self._start * self.batch_size, 0
        order_cpu = torch.tensor(self.sampler.indices()[start:], dtype=torch.long)
        if not len(order_cpu):
            return
        params_cpu = self.augment.plan(self.seed, epoch, self.ids[order_cpu.numpy()])

        def to_device(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        # The only host-to-device traffic of the epoch: its order and parameters, once (pinned: no sync).
        order = to_device(order_cpu)
        params = None if params_cpu is None else to_device(params_cpu)
        size = self.sizes.size(epoch) if self.sizes is not None else 0
        for at in range(0, order.numel(), self.batch_size):
            b = slice(at, at + self.batch_size)
            take = Take(
                order[b],
                order_cpu[b],
                None if params is None else params[b],
                None if params_cpu is None else params_cpu[b],
                size,
            )
            x, y = self.augment.take(self.images, self.targets, take)
            if size and x.shape[-1] != size:  # progressive resizing without a crop to sample at the size
                x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            yield Batch(
                self._finish(x, self.images.dtype),
                self._finish(y, self.targets.dtype) if self.targets_are_images else y,
            )

    def _finish(self, x: torch.Tensor, cached: torch.dtype) -> torch.Tensor:
        """Model input from a cached image batch: uint8 pixels (perhaps resampled to float on the way) are
        normalized; a float dataset's own values are only cast."""
        return model_input(x, self.spec, pixels=cached == torch.uint8, scale_shift=self._scale_shift)


def _usable(item: Any) -> bool:
    return item is not None and not isinstance(item, Skip)


def _skip_reason(dataset: Dataset, row: int, item: Any) -> tuple[str, str, bool]:
    """(what, why, whether it counts against data.max_bad_per_epoch)."""
    if isinstance(item, Skip):
        return item.path, item.reason, not item.refused
    return f"{type(dataset).__name__}[{row}]", "the dataset returned None for it", True


PROBE_ITEMS = 64
"""Items a threaded cache build decodes on its own thread first, to time them."""
THREADED_ITEM_S = 1e-3
"""Below this many seconds per item the build stays on one thread (GIL-bound Python work dominates)."""
PROCESSES_FROM_S = 1.0
"""GIL-bound items go to worker processes when one thread would take longer than this for the rest (forking and
starting the workers costs about a tenth of a second)."""
CHUNK_ITEMS = 256
"""Rows per task of a threaded or multi-process build."""


def _decode_rows(
    dataset: Dataset, rows: list[int], threads: int, bad: BadFiles, processes: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Decode ``dataset[row]`` for every row into preallocated tensors (threads fill them in place): (inputs,
    targets, the rows that decoded). Items that cannot be used are added to ``bad``. With ``threads > 1`` a first
    chunk is timed: items that decode in Pillow's C code go to threads, GIL-bound ones (small images) stay on
    this thread, or go to ``processes`` forked worker processes when that would take over
    :data:`PROCESSES_FROM_S`."""
    k0, first = 0, cast(Any, None)
    while k0 < len(rows):  # the first usable item fixes the shapes
        first = dataset[rows[k0]]
        if _usable(first):
            break
        bad.add(*_skip_reason(dataset, rows[k0], first))
        k0 += 1
    if k0 == len(rows):
        return torch.empty(0, dtype=torch.uint8), torch.empty(0), []
    x0, y0 = first
    if not isinstance(x0, torch.Tensor) or x0.ndim != 3:
        raise ValueError(
            f"{type(dataset).__name__}[{rows[k0]}]: the GPU cache needs C x H x W image tensors, "
            f"got {type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}"
        )
    n = len(rows)
    inputs = torch.empty((n, *x0.shape), dtype=x0.dtype)
    as_tensor = isinstance(y0, torch.Tensor)
    targets: Any = torch.empty((n, *y0.shape), dtype=y0.dtype) if as_tensor else [None] * n

    def put(k: int, item: Any) -> tuple[str, str, bool] | None:
        if not _usable(item):
            return _skip_reason(dataset, rows[k], item)
        x, y = item
        if x.shape != x0.shape or (as_tensor and y.shape != y0.shape):
            raise ValueError(
                f"{type(dataset).__name__}[{rows[k]}]: shape {tuple(x.shape)} / target "
                f"{tuple(getattr(y, 'shape', ()))}, unlike the first item's {tuple(x0.shape)} / "
                f"{tuple(getattr(y0, 'shape', ()))}: the GPU cache needs one shape"
            )
        inputs[k] = x
        targets[k] = y
        return None

    put(k0, (x0, y0))
    rest = range(k0 + 1, n)
    failed: dict[int, tuple[str, str, bool] | None] = {}
    use_processes = False
    if threads > 1 and len(rest) > PROBE_ITEMS:
        # Time a first chunk on this thread: small images decode in a few hundred microseconds of mostly Python
        # work under the GIL, where threads only contend (6,000 CIFAR JPEGs on 2 cores: 1.5 s on one thread,
        # 2.1 s on two); large ones spend their time in Pillow's C code, which releases the GIL, so threads scale.
        t0 = time.perf_counter()
        failed.update((k, put(k, dataset[rows[k]])) for k in rest[:PROBE_ITEMS])
        per_item = (time.perf_counter() - t0) / PROBE_ITEMS
        rest = rest[PROBE_ITEMS:]
        if per_item < THREADED_ITEM_S:
            chunk_bytes = CHUNK_ITEMS * (_nbytes(x0) + (_nbytes(y0) if as_tensor else 0))
            processes = _shm_processes(processes, chunk_bytes)
            use_processes = processes > 1 and len(rest) * per_item > PROCESSES_FROM_S and _can_fork()
            threads = 1
    chunks = [range(a, min(a + CHUNK_ITEMS, rest.stop)) for a in range(rest.start, rest.stop, CHUNK_ITEMS)]
    if use_processes:
        shapes = (tuple(x0.shape), tuple(y0.shape) if as_tensor else None)
        for ks, xs, ys, odd in _chunks_in_processes(dataset, rows, chunks, shapes, min(processes, len(chunks))):
            if ks:
                inputs[ks] = xs
                if as_tensor:
                    targets[ks] = ys
                else:
                    for k, y in zip(ks, ys):
                        targets[k] = y
            failed.update((k, None) for k in ks)
            failed.update((k, put(k, item)) for k, item in odd)  # a skip's reason, or the shape error
    elif threads > 1 and len(rest) > 1:
        # Pillow releases the GIL while it decodes and resizes, so threads scale.
        # One task per chunk of rows, not a future per row: small images decode in tens of microseconds, where
        # a future's hand-off per item costs more than the decode (ThreadPoolExecutor.map ignores chunksize).
        step = max(1, min(CHUNK_ITEMS, -(-len(rest) // threads)))
        chunks = [range(a, min(a + step, rest.stop)) for a in range(rest.start, rest.stop, step)]
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
            for part in pool.map(lambda ks: [(k, put(k, dataset[rows[k]])) for k in ks], chunks):
                failed.update(part)
    else:
        failed.update((k, put(k, dataset[rows[k]])) for k in rest)
    keep = [k0] + [k for k in range(k0 + 1, n) if failed[k] is None]
    for k in range(k0 + 1, n):
        why = failed[k]
        if why is not None:
            bad.add(*why)
    if len(keep) < n:
        inputs = inputs[keep]
        targets = targets[keep] if as_tensor else [targets[k] for k in keep]
    return inputs, targets if as_tensor else targets_tensor(targets), [rows[k] for k in keep]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


SHM_DIR = "/dev/shm"
"""Where a worker's stacked chunk waits for the build (torch's shared memory): 64 MiB in a container by default."""


def _shm_processes(processes: int, chunk_bytes: int) -> int:
    """Worker processes whose chunks in flight fit the free shared memory, shared by the ranks of this node: the
    DataLoader keeps two chunks per worker queued and the build holds one more while it copies it. More workers
    than that fail the build outright (``unable to allocate shared memory``: 2 workers and 12 MiB chunks of
    3 x 64 x 64 images in an 8 MiB /dev/shm), where one thread would decode it."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:  # no such folder: nothing known to limit
        return processes
    free = st.f_bavail * st.f_frsize // _local_ranks()
    return min(processes, max(0, (free // max(1, chunk_bytes) - 1) // 2))


def _can_fork() -> bool:
    """Worker processes by fork only (the dataset and its file list are inherited, not pickled): on Linux, and not
    from a daemonic process (a training run inside a multiprocessing pool's worker), which may start none."""
    return sys.platform.startswith("linux") and not multiprocessing.current_process().daemon


class _ChunkDecoder(Dataset):
    """One item per chunk of rows, decoded in a worker process: (rows' positions that decoded to the first item's
    shapes, their images stacked, their targets stacked or listed, the other (position, item) pairs). Stacked,
    a chunk crosses to the training process as one shared-memory tensor, not one per image."""

    def __init__(self, dataset: Dataset, rows: list[int], chunks: list[range], shapes: tuple[tuple, tuple | None]):
        self.dataset, self.rows, self.chunks, self.shapes = dataset, rows, chunks, shapes

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[list[int], torch.Tensor | None, Any, list[tuple[int, Any]]]:
        x_shape, y_shape = self.shapes
        ks: list[int] = []
        xs: list[torch.Tensor] = []
        ys: list[Any] = []
        odd: list[tuple[int, Any]] = []
        for k in self.chunks[i]:
            item = self.dataset[self.rows[k]]
            if (
                _usable(item)
                and tuple(item[0].shape) == x_shape
                and (y_shape is None or tuple(getattr(item[1], "shape", ())) == y_shape)
            ):
                ks.append(k)
                xs.append(item[0])
                ys.append(item[1])
            else:
                odd.append((k, item))
        stacked = torch.stack(xs) if xs else None
        return ks, stacked, (torch.stack(ys) if y_shape is not None and ys else ys), odd


def _unbatched(item: Any) -> Any:
    return item


def _chunks_in_processes(
    dataset: Dataset, rows: list[int], chunks: list[range], shapes: tuple[tuple, tuple | None], processes: int
) -> Iterator[tuple[list[int], Any, Any, list[tuple[int, Any]]]]:
    """:class:`_ChunkDecoder`'s chunks from ``processes`` forked workers (torch's DataLoader: its workers end with
    the iteration, an error in one is raised here)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ChunkDecoder(dataset, rows, chunks, shapes),
        batch_size=None,
        num_workers=processes,
        collate_fn=_unbatched,
        multiprocessing_context="fork",
        # Its own generator: an iterator otherwise draws its workers' base seed from torch's global one, and
        # whether the build forks is a timing decision taken before the model is initialized from that generator.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,
    )
    yield from loader


class CacheBackend(Backend):
    """``data.loader = cache``: the dataset decoded once and kept on the device (RAM on a CPU); ``auto`` takes it
    first when the decoded data fits ``data.cache_budget`` (no per-step host work at all)."""

    name = "cache"
    rank = 30

    def build(self, request: LoaderRequest, cfg: Config, spec: InputSpec) -> GpuCacheLoader:
        """The kind's deterministic dataset decoded once (files validated as they are read), the kind's
        augmentation on the device; a dataset from Python is read once as it is, on one thread."""
        samples, data, seed = request.samples, cfg.data, cfg.runtime.seed
        common: dict[str, Any] = dict(
            batch_size=request.batch_size,
            train=request.train,
            seed=seed,
            num_shards=request.num_shards,
            shard_id=request.shard_id,
            max_bad=data.max_bad_per_epoch,
            name=samples.split.name,
        )
        if samples.kind == "dataset":
            return GpuCacheLoader.from_dataset(cast(DatasetSplit, samples.split).items(), spec, **common)
        threads = cache_threads(data)
        if samples.kind == "class":
            # Each file opened once: validated and decoded from one read (the separate pre-check read every header
            # first, then the decode opened every file again).
            ds = dataset_for(samples, data, seed, train=request.train, deterministic=True, checked=True)
            skipped: list[tuple[str, str]] = []
        else:
            checked = precheck_samples(samples, data, threads)
            ds = dataset_for(
                checked.samples, data, seed, train=request.train, deterministic=True, unchecked=checked.unchecked
            )
            skipped = checked.bad
        return GpuCacheLoader.from_dataset(
            ds,
            spec,
            **common,
            augment=_augment_for(samples, data, request.train),
            targets_are_images=samples.kind == "pair",
            threads=threads,
            processes=cache_processes(data),
            skipped=skipped,
            sizes=train_sizes(cfg) if request.train else None,
        )

    def serves(self, run: RunSamples, cfg: Config, device: torch.device) -> tuple[bool, str]:
        refusal = dataset_refusal(cfg.data) if run.kind == "dataset" else needs_pil(cfg.data)
        return not refusal, refusal

    def fits(
        self, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None = None
    ) -> tuple[bool, str]:
        """Whether the decoded dataset fits ``data.cache_budget`` (:func:`cache_fits`); a dataset from Python
        only when its items are fixed (caching would keep one draw of a random transform per item); then whether
        the run reads its images at least once each (:func:`run_reads`): the cache decodes every image before
        the first step, which a short run (``train.max_steps`` to try a config) would not repay."""
        ok, why = self._fits(run, cfg, device, memory_limit)
        reads = run_reads(run, cfg.train)
        if ok and reads is not None and reads < len(run):
            return False, (
                f"the run reads {reads:,} images, fewer than the {len(run):,} the cache would decode before its "
                f"first step"
            )
        return ok, why

    def _fits(self, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None) -> tuple[bool, str]:
        if run.kind == "dataset":
            parts, fixed = dataset_parts(run)
            if not fixed:
                return False, (
                    "the dataset's items change between reads (its own random transforms), so the cache would "
                    "keep one draw per item"
                )
            ok, why = cache_fits(
                len(run), cfg.data, device, memory_limit=memory_limit, sample_nbytes=parts[0].item_nbytes
            )
            return (
                ok,
                f"the dataset's items are fixed and fit the cache ({why})"
                if ok
                else f"the dataset does not fit the cache ({why})",
            )
        ok, why = cache_fits(data=cfg.data, device=device, memory_limit=memory_limit, **_sizing(run))
        return (
            ok,
            f"the decoded dataset fits the cache ({why})" if ok else f"the dataset is too large for the cache ({why})",
        )

    def resident_bytes(self, run: RunSamples, cfg: Config) -> int:
        """The decoded dataset: training samples at their training size, as :meth:`fits` weighs it."""
        if run.kind == "dataset":
            return len(run) * dataset_parts(run)[0][0].item_nbytes
        return dataset_cache_bytes(data=cfg.data, **_sizing(run))


def run_reads(run: RunSamples, tc: TrainConfig) -> int | None:
    """Images the configured run reads: its training draws (:func:`~fasttrain.config.trained_samples`) and a
    pass over the validation split every ``train.eval_every`` epochs and once more at the end (the per-class
    report). None under ``train.time_budget_s``: the run plans its length after the loaders are built (a resumed
    one holds its plan in ``train.total_steps``, but is weighed as its start was)."""
    if tc.time_budget_s:
        return None
    n_train = len(run.train.split)
    trained = trained_samples(tc, n_train)
    n_val = len(run.val.split) if run.val is not None else 0
    epochs = -(-trained // max(1, n_train)) if tc.total_steps else tc.epochs
    return trained + (epochs // max(1, tc.eval_every) + 1) * n_val


def _sizing(run: RunSamples) -> dict[str, Any]:
    """What the cache holds for a run's files, as keyword arguments of :func:`cache_fits`: every image, the
    training ones at the training size; regression vectors carry each image's width and height too."""
    train = run.train
    num_targets = 0
    if train.kind == "vector" and train.split.targets:
        num_targets = len(train.split.targets[0]) + 2 * train.size_targets
    return dict(num_images=len(run), kind=train.kind, train_images=len(train.split), num_targets=num_targets)


BACKEND = CacheBackend()


def cache_threads(data: DataConfig) -> int:
    """Threads decoding the cache: ``data.workers`` when set, else every core this process may use (at most 16).
    Not ``data.workers``' auto (all cores but one, for worker *processes* beside the training process): the
    build runs before training, and Pillow releases the GIL while it decodes."""
    if data.workers >= 0:
        return max(1, data.workers)
    return max(1, min(16, _cores()))


def cache_processes(data: DataConfig) -> int:
    """Worker processes decoding a cache whose items hold the GIL (small images, :func:`_decode_rows`):
    ``data.workers`` when set, else the cores this process may use shared by the processes of this node
    (torchrun's ``LOCAL_WORLD_SIZE``: every rank decodes its cache at the same time), at most 16."""
    if data.workers >= 0:
        return data.workers
    return max(1, min(16, _cores() // _local_ranks()))


def _local_ranks() -> int:
    """The processes of this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
