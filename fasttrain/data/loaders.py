"""Backend choice for image -> label loaders: ``data.loader = auto | torch | dali | cache``.

``auto`` picks the GPU-resident cache when the decoded dataset fits its budget (no per-step CPU work at all),
DALI on CUDA when it imports (decode on the GPU), and the torch loader otherwise, and logs why.
"""

from __future__ import annotations

import logging

from fasttrain.config import Config, ConfigError
from fasttrain.data import registry
from fasttrain.data.base import InputSpec, Loader
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split

log = logging.getLogger(__name__)

__all__ = ["choose_backend", "make_loader", "make_image_loader"]


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


def make_loader(backend: str, samples: Samples, cfg: Config, spec: InputSpec, *, train: bool, batch_size: int,
                num_shards: int = 1, shard_id: int = 0) -> Loader:
    """A loader for ``samples`` on ``backend`` (a name of :data:`fasttrain.data.registry.BACKENDS`), this
    process's shard ``shard_id`` of ``num_shards``."""
    try:
        build = registry.backend_builder(backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return build(samples, cfg, spec, train=train, batch_size=batch_size, num_shards=num_shards, shard_id=shard_id)


def make_image_loader(backend: str, split: Split, cfg: Config, spec: InputSpec, *, train: bool, batch_size: int,
                      num_shards: int = 1, shard_id: int = 0) -> Loader:
    """A classification loader over ``split`` on ``backend`` (see :func:`choose_backend`)."""
    return make_loader(backend, Samples(split, "class"), cfg, spec, train=train, batch_size=batch_size,
                       num_shards=num_shards, shard_id=shard_id)
