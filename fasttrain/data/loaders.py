"""Backend choice for image -> label loaders: ``data.loader = auto | torch | dali | cache``.

``auto`` picks the GPU-resident cache when the decoded dataset fits its budget (no per-step CPU work at all),
DALI on CUDA when it imports (decode on the GPU), and the torch loader otherwise, and logs why.
"""

from __future__ import annotations

import logging

from fasttrain.config import Config, ConfigError
from fasttrain.data.base import InputSpec, Loader
from fasttrain.data.sources import Split

log = logging.getLogger(__name__)

__all__ = ["choose_backend", "make_image_loader"]


def choose_backend(requested: str, *, device_type: str, num_images: int, cfg: Config,
                   device=None, memory_limit: int | None = None) -> tuple[str, str]:
    """(backend, reason). Raises ConfigError where an explicit choice cannot run here.
    ``memory_limit``: bytes of device memory the run may use, when smaller than the card (autotune's budget)."""
    if requested == "torch":
        return "torch", "data.loader = torch"
    if requested in ("cache", "auto"):
        from fasttrain.data.gpu_cache import cache_fits

        fits, why = cache_fits(num_images, cfg.data, device, memory_limit=memory_limit)
        if requested == "cache":
            if not fits:
                log.warning("data.loader = cache although %s", why)
            return "cache", "data.loader = cache"
        if fits:
            return "cache", f"auto: the decoded dataset fits the cache ({why})"
    if requested == "auto" and device_type != "cuda":  # DALI is only auto-picked on CUDA: no need to import it
        return "torch", "auto: no CUDA device, and the dataset is too large for the cache"
    from fasttrain.data.dali import dali_status

    ok, why_not = dali_status()
    if requested == "dali":
        if not ok:
            raise ConfigError(f"data.loader = dali, but DALI cannot run here: {why_not}")
        return "dali", "data.loader = dali" + ("" if device_type == "cuda" else " (CPU-only mode)")
    if device_type == "cuda" and ok:
        return "dali", "auto: CUDA device and DALI available (GPU decode)"
    return "torch", f"auto: DALI unavailable ({why_not}), and the dataset is too large for the cache"


def make_image_loader(backend: str, split: Split, cfg: Config, spec: InputSpec, *, train: bool,
                      batch_size: int) -> Loader:
    """A classification loader over ``split`` on ``backend`` (see :func:`choose_backend`)."""
    d = cfg.data
    seed = cfg.runtime.seed
    if backend == "torch":
        from fasttrain.data.checks import precheck
        from fasttrain.data.torch_loader import ImageDataset, TorchLoader
        from fasttrain.data.transforms import eval_transform, train_transform

        # The same pre-check as DALI and the cache: every backend samples from the same files, in the same order.
        pre = precheck(split.paths, max_pixels=d.max_image_pixels, threads=max(1, d.num_workers), split=split.name)
        tf = train_transform(d) if train else eval_transform(d)
        ds = ImageDataset(split.subset(pre.keep), tf, d.channels, seed, max_pixels=d.max_image_pixels)
        return TorchLoader(ds, spec, batch_size=batch_size, train=train, seed=seed, workers=d.num_workers,
                           prefetch=d.prefetch, skipped=pre.bad, max_bad_per_epoch=d.max_bad_per_epoch,
                           split=split.name)
    if backend == "dali":
        from fasttrain.data.dali import DaliLoader

        device_id = (spec.device.index or 0) if spec.device.type == "cuda" else None
        return DaliLoader(split, d, spec, batch_size=batch_size, train=train, seed=seed, device_id=device_id)
    if backend == "cache":
        from fasttrain.data.gpu_cache import GpuCacheLoader

        return GpuCacheLoader(split, d, spec, batch_size=batch_size, train=train, seed=seed)
    raise ConfigError(f"data.loader: unknown backend {backend!r}")
