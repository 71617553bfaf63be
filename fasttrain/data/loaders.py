"""Backend choice and construction, the same for every task: ``data.loader = auto | torch | dali | cache``.

A task describes its samples (:class:`~fasttrain.data.samples.Samples`); :func:`make_loader` builds them on a
backend of the ``backends`` table of :mod:`fasttrain.registry`. ``auto`` (:func:`choose_backend`) picks the GPU-resident
cache when the decoded dataset fits its budget (no per-step CPU work at all), else DALI where it imports (GPU
decode on CUDA, its CPU-only mode without a GPU), else the torch loader, and says why.
"""

from __future__ import annotations

import logging

from fasttrain import registry
from fasttrain.config import Config, ConfigError
from fasttrain.data.base import InputSpec, Loader
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split

log = logging.getLogger(__name__)

__all__ = ["DALI_KINDS", "choose_backend", "make_loader", "make_image_loader"]


DALI_KINDS = ("class", "vector", "pair")
"""Sample kinds (:mod:`fasttrain.data.samples`) DALI serves from files."""
_DALI_CPU_GAIN = "DALI's CPU-only mode decodes faster than the torch loader (2.6x on Imagenette photos, 2 cores)"


def choose_backend(
    requested: str,
    *,
    device_type: str,
    num_images: int,
    cfg: Config,
    device=None,
    memory_limit: int | None = None,
    kind: str = "class",
    train_images: int | None = None,
    num_targets: int = 0,
) -> tuple[str, str]:
    """(backend, reason) for ``data.loader = requested``. Raises ConfigError where an explicit choice cannot run
    here. ``memory_limit``: bytes of device memory the run may use, when smaller than the card (autotune's
    budget). ``kind``, ``train_images`` (of ``num_images``) and ``num_targets`` size the cache (see
    :func:`~fasttrain.data.gpu_cache.cache_fits`).

    auto: the cache when the decoded data fits its budget (no per-step CPU work at all); else DALI where it
    imports and serves the kind: GPU decode on CUDA, its CPU-only mode without a GPU (faster than the torch
    loader there); else the torch loader. Every reason says why."""
    if requested == "torch":
        return "torch", "data.loader = torch"
    if cfg.data.rand_augment:  # timm's RandAugment works on PIL images: only the torch loader has them
        if requested == registry.AUTO:
            return "torch", "auto: data.rand_augment (timm's RandAugment) works on PIL images, in the torch loader"
        raise ConfigError(
            f"data.rand_augment: timm's RandAugment works on PIL images, which only the torch loader has; "
            f"set data.loader = torch or auto (now {requested})"
        )
    fits, why = False, ""
    if requested in ("cache", registry.AUTO):
        from fasttrain.data.gpu_cache import cache_fits

        fits, why = cache_fits(
            num_images,
            cfg.data,
            device,
            memory_limit=memory_limit,
            kind=kind,
            train_images=train_images,
            num_targets=num_targets,
        )
        if requested == "cache":
            if not fits:
                log.warning("data.loader = cache although %s", why)
            return "cache", "data.loader = cache"
        if fits:
            return "cache", f"auto: the decoded dataset fits the cache ({why})"
    elif requested != "dali":  # a backend registered without a place in the auto policy: taken as asked
        return requested, f"data.loader = {requested}"
    cuda = device_type == "cuda"
    dali_ok, dali_why = _dali_can_serve(kind)
    if requested == "dali":
        if not dali_ok:
            raise ConfigError(f"data.loader = dali, but {dali_why}; set data.loader = torch or cache")
        return "dali", "data.loader = dali" + ("" if cuda else " (CPU-only mode)")
    too_large = f"the dataset is too large for the cache ({why})"
    if dali_ok and cuda:
        return "dali", f"auto: {too_large}; DALI decodes on the GPU"
    if dali_ok:
        return "dali", f"auto: no CUDA device and {too_large}; {_DALI_CPU_GAIN}"
    return "torch", f"auto: {too_large}, and {dali_why}"


def _dali_can_serve(kind: str) -> tuple[bool, str]:
    """(True, version) or (False, why DALI cannot load ``kind`` here)."""
    if kind not in DALI_KINDS:
        return False, f"DALI cannot serve {kind} samples (it reads image files)"
    from fasttrain.data.dali import dali_status

    ok, why = dali_status()
    return ok, why if ok else f"DALI cannot run here ({why})"


def make_loader(
    backend: str,
    samples: Samples,
    cfg: Config,
    spec: InputSpec,
    *,
    train: bool,
    batch_size: int,
    num_shards: int = 1,
    shard_id: int = 0,
) -> Loader:
    """A loader for ``samples`` on ``backend`` (a name of the ``backends`` table of :mod:`fasttrain.registry`), this
    process's shard ``shard_id`` of ``num_shards``. A split backed by a dataset from Python
    (:class:`~fasttrain.data.user.DatasetSplit`) is served by :func:`~fasttrain.data.user.dataset_loader`."""
    from fasttrain.data.user import DatasetSplit, dataset_loader

    if isinstance(samples.split, DatasetSplit):
        return dataset_loader(
            backend,
            samples.split,
            cfg,
            spec,
            train=train,
            batch_size=batch_size,
            num_shards=num_shards,
            shard_id=shard_id,
        )
    try:
        build = registry.resolve("backends", backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return build(samples, cfg, spec, train=train, batch_size=batch_size, num_shards=num_shards, shard_id=shard_id)


def make_image_loader(
    backend: str,
    split: Split,
    cfg: Config,
    spec: InputSpec,
    *,
    train: bool,
    batch_size: int,
    num_shards: int = 1,
    shard_id: int = 0,
) -> Loader:
    """A classification loader over ``split`` on ``backend`` (see :func:`choose_backend`)."""
    return make_loader(
        backend,
        Samples(split, "class"),
        cfg,
        spec,
        train=train,
        batch_size=batch_size,
        num_shards=num_shards,
        shard_id=shard_id,
    )
