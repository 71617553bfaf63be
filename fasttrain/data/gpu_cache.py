"""GPU-resident cache: a small dataset decoded once into a uint8 tensor on the device and augmented there.

After construction no step touches the CPU (airbench's recipe): the epoch's permutation is moved to the device
once, and each batch is a gather, a batched random-resized-crop (one ``affine_grid`` + ``grid_sample``, the
flip folded into the x scale), a normalization and a cast. On a CPU device the same code caches in RAM.

What is cached: evaluation (and training without random-resized-crop) stores exactly the torch backend's
evaluation pixels (``transforms.eval_transform``: shorter side to ``eval_resize``, centre crop
``image_size``), so validation numbers match the torch loader. Training with random-resized-crop stores the
image's centre square resized to ``image_size`` and crops from it: the crop is then upsampled to
``image_size``, so small-scale crops are softer than crops of the full-resolution file. A larger canvas would
cost memory quadratically, and datasets small enough for this cache are usually small-image datasets
(CIFAR-size), where the canvas is the original image anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from fasttrain.config import DataConfig
from fasttrain.data.base import Batch, InputSpec, normalize_on_device
from fasttrain.data.checks import BadFiles, precheck
from fasttrain.data.dali import targets_tensor
from fasttrain.data.sources import Split
from fasttrain.data.torch_loader import EpochSampler, sample_seed
from fasttrain.data.transforms import DECODE_ERRORS, eval_transform, load_image

log = logging.getLogger(__name__)

__all__ = ["cache_bytes", "cache_fits", "GpuCacheLoader", "random_resized_crop_theta"]

_RRC_ATTEMPTS = 10  # as torchvision: the first of 10 sampled windows that fits the canvas is used


def cache_bytes(num_images: int, data: DataConfig) -> int:
    """Bytes the cache holds for ``num_images``: C x S x S uint8 pixels plus an int64 label each."""
    return num_images * (data.channels * data.image_size * data.image_size + 8)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_fits(num_images: int, data: DataConfig, device: torch.device | str | None = None, *,
               memory_limit: int | None = None) -> tuple[bool, str]:
    """(fits, why): the decoded dataset vs ``data.cache_budget`` of the device's total memory (CUDA) or of the
    RAM available now (CPU). ``device=None`` means CUDA when present, as ``runtime.device = auto`` does.
    ``memory_limit`` (bytes) caps the CUDA total: autotune's emulated budget, smaller than the card."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    need = cache_bytes(num_images, data)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total, where = props.total_memory, f"{props.name} memory"
        if memory_limit is not None and memory_limit < total:
            total, where = memory_limit, "memory budget"
    else:
        total, where = _available_ram(), "available RAM"
    budget = int(data.cache_budget * total)
    fits = need <= budget
    gib = 2**30
    why = (f"{num_images} images x {data.channels}x{data.image_size}x{data.image_size} uint8 = {need / gib:.2f} GiB "
           f"{'<=' if fits else '>'} data.cache_budget {data.cache_budget:g} x {total / gib:.1f} GiB {where} "
           f"= {budget / gib:.2f} GiB")
    return fits, why


def random_resized_crop_theta(n: int, scale_min: float, flip: bool, generator: torch.Generator,
                              device: torch.device) -> torch.Tensor:
    """n x 2 x 3 ``affine_grid`` matrices: torchvision's random-resized-crop (area scale_min..1, log-uniform
    aspect 3/4..4/3, first of 10 attempts that fits, else the whole canvas) on a square canvas, in continuous
    coordinates, with a random horizontal flip as a negative x scale when ``flip``."""

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=device).uniform_(lo, hi, generator=generator)

    area = uniform(scale_min, 1.0, n, _RRC_ATTEMPTS)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3), n, _RRC_ATTEMPTS))
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # shares of the canvas side
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    found = fits.any(dim=1)
    one = torch.ones((), device=device)
    w = torch.where(found, w.gather(1, first).squeeze(1), one)
    h = torch.where(found, h.gather(1, first).squeeze(1), one)
    # Window centre in affine_grid's [-1, 1] coordinates, kept inside the canvas.
    cx = uniform(-1.0, 1.0, n) * (1 - w)
    cy = uniform(-1.0, 1.0, n) * (1 - h)
    sx = w * torch.where(uniform(0.0, 1.0, n) < 0.5, -one, one) if flip else w
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


class GpuCacheLoader:
    """The loader contract over a dataset held decoded on ``spec.device`` (see the module docstring).

    Order: the torch backend's :class:`EpochSampler` (same permutation per (seed, epoch)); training drops the
    last partial batch, evaluation yields every sample once. Augmentation draws from a device generator seeded
    by (seed, epoch), so an epoch's batches are reproducible. ``skipped``: (path, reason) of the files the shared
    pre-check or the decode pass could not use; more than ``data.max_bad_per_epoch`` decode failures (beyond the
    pre-check) refuse the dataset with the list.
    """

    def __init__(self, split: Split, data: DataConfig, spec: InputSpec, *, batch_size: int, train: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"GpuCacheLoader: batch_size must be >= 1, got {batch_size}")
        self.data, self.spec, self.train, self.seed = data, spec, train, seed
        self.batch_size = batch_size
        self.rrc = train and data.random_resized_crop
        self.flip = train and data.hflip
        # The random-resized-crop canvas is the eval transform with the shorter side resized to image_size.
        transform = eval_transform(dataclasses.replace(data, resize_size=data.image_size) if self.rrc else data)
        threads = max(1, data.num_workers)
        pre = precheck(split.paths, max_pixels=data.max_image_pixels, threads=threads, split=split.name)
        self.skipped: list[tuple[str, str]] = list(pre.bad)
        # The decode pass is this backend's only decoding: the per-epoch limit on failures applies to it.
        bad = BadFiles(self.skipped, data.max_bad_per_epoch, unit="decode pass of the cache")
        paths = [split.paths[i] for i in pre.keep]
        images, decoded, failed = _decode_all(paths, transform, data, threads=threads)
        for path, reason in failed:
            bad.add(path, reason)
        if not decoded:
            raise bad.none_decoded(split.name)
        keep = [pre.keep[i] for i in decoded]
        self.images = images.to(spec.device)
        self.targets = targets_tensor([split.targets[i] for i in keep]).to(spec.device)
        self.num_samples = len(keep)
        self.sampler = EpochSampler(self.num_samples, batch_size=batch_size, shuffle=train, seed=seed,
                                    drop_last=train)
        if len(self.sampler) == 0:
            raise ValueError(f"GpuCacheLoader: the {split.name} split has {self.num_samples} usable images, fewer "
                             f"than one batch of {batch_size} (training drops partial batches); lower the batch size")
        self._scale_shift = spec.scale_shift()
        log.info("cached %d %s images on %s: %.1f MiB", self.num_samples, split.name, spec.device,
                 self.images.numel() / 2**20)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def close(self) -> None:
        self.images = self.targets = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Batch]:
        device, epoch = self.spec.device, self.sampler.epoch
        # The only host-to-device traffic of the epoch: its order, once (pinned: the copy does not sync).
        order = torch.tensor(self.sampler.indices(), dtype=torch.long)
        order = (order.pin_memory() if device.type == "cuda" else order).to(device, non_blocking=True)
        gen = torch.Generator(device=device)
        gen.manual_seed(sample_seed(self.seed, epoch, -2))
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield Batch(self._augment(self.images[idx], gen), self.targets[idx])

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        if self.rrc:
            theta = random_resized_crop_theta(n, self.data.crop_scale_min, self.flip, gen, x.device)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            # Crops are at most the canvas, so this only upsamples: bilinear needs no antialiasing here.
            x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif self.flip:
            flip = torch.rand(n, device=x.device, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return normalize_on_device(x, self.spec, self._scale_shift)


def _decode_all(paths: list[str], transform: Callable, data: DataConfig, threads: int
                ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode every file into one uint8 N x C x S x S tensor with threads: (tensor of the files that decoded,
    their indices, [(path, reason)] of those that did not)."""
    size, n = data.image_size, len(paths)
    out = torch.empty((n, data.channels, size, size), dtype=torch.uint8)

    def decode(i: int) -> str | None:
        try:
            out[i] = transform(load_image(paths[i], data.channels, data.max_image_pixels))
        except DECODE_ERRORS as e:
            return f"cannot be decoded ({type(e).__name__}: {e})"
        return None

    # Pillow releases the GIL while it decodes and resizes, so threads scale.
    with ThreadPoolExecutor(max_workers=min(threads, max(1, n))) as pool:
        reasons = list(pool.map(decode, range(n), chunksize=16))
    keep = [i for i, why in enumerate(reasons) if why is None]
    failed = [(paths[i], why) for i, why in enumerate(reasons) if why is not None]
    if len(keep) < n:
        out = out[keep]
    return out, keep, failed
