"""torch.distributed set-up from torchrun's environment: ranks, the process group, rank-0 helpers.

fasttrain never launches processes itself: ``torchrun`` (``torch.distributed.run``) starts one process per GPU
and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` and, for
restarts, ``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT``. Without them everything is one process
and nothing here does anything. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "dist_info",
    "init",
    "shutdown",
    "per_rank_batch",
    "all_reduce_sums",
    "broadcast_object",
    "barrier",
    "current",
    "wrap_state",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    """Global rank: the shard of the data this process reads."""
    local_rank: int = 0
    """Rank on this node: the GPU this process uses."""
    world_size: int = 1
    local_world_size: int = 1
    run_id: str = ""
    """torchrun's rendezvous id: the same for every restart of one job (empty outside torchrun)."""
    restart: int = 0
    """How many times torchrun restarted the worker group (0 on the first start)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} must be >= 0")
    return value


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """The process's place in the job, from torchrun's variables (pure: pass ``env`` to test it)."""
    env = os.environ if env is None else env
    world = _int(env, "WORLD_SIZE", 1)
    info = DistInfo(
        rank=_int(env, "RANK", 0),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=max(world, 1),
        local_world_size=max(_int(env, "LOCAL_WORLD_SIZE", world), 1),
        run_id=env.get("TORCHELASTIC_RUN_ID", ""),
        restart=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
    )
    if info.rank >= info.world_size:
        raise ValueError(f"environment: RANK={info.rank} is not below WORLD_SIZE={info.world_size}")
    if info.local_rank >= info.local_world_size:
        raise ValueError(
            f"environment: LOCAL_RANK={info.local_rank} is not below LOCAL_WORLD_SIZE={info.local_world_size}"
        )
    return info


_CURRENT = DistInfo()


def current() -> DistInfo:
    """This process's DistInfo once :func:`init` ran (one process otherwise)."""
    return _CURRENT


def init(device_type: str, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (no-op for one process). On CUDA the process takes GPU ``LOCAL_RANK``
    first (NCCL binds to the current device), so ``runtime.device = auto`` resolves to it."""
    global _CURRENT
    info = dist_info()
    if not info.enabled:
        _CURRENT = info
        return info
    import torch.distributed as dist

    if dist.is_initialized():
        _CURRENT = info
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"environment: LOCAL_RANK={info.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPUs (torchrun --nproc-per-node too large?)"
            )
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    # torchrun's store outlives a restart of the worker group: the ranks of a new attempt would read the dead
    # attempt's addresses under the default keys and fail to connect. Each attempt gets its own key prefix.
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"fasttrain/attempt-{info.restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    _CURRENT = info
    log.info(
        "rank %d of %d (local %d) joined the %s process group", info.rank, info.world_size, info.local_rank, backend
    )
    return info


def shutdown() -> None:
    global _CURRENT
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = DistInfo()


def per_rank_batch(global_batch: int, world_size: int, name: str = "train.batch_size") -> int:
    """``global_batch / world_size``: the global batch stays the one the config names, whatever the GPU count."""
    if global_batch % world_size:
        raise ValueError(
            f"{name}: {global_batch} is not divisible by the {world_size} processes (WORLD_SIZE); "
            f"choose a multiple of {world_size}"
        )
    return global_batch // world_size


def all_reduce_sums(values: dict[str, torch.Tensor], *, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks (one collective for all of them); the identity for one process.

    ``device`` given: the ranks first agree on the keys (one small object all-gather) and a rank without some,
    or without any (an evaluation shard with no samples), adds zeros on ``device``; every rank then takes part
    in the same all-reduce. Without ``device`` every rank must hold the same keys (training windows do)."""
    info = current()
    if not info.enabled:
        return values
    import torch.distributed as dist

    if device is not None:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, sorted(values))
        every = sorted({k for keys in gathered for k in keys})
        values = {k: values[k] if k in values else torch.zeros((), device=device) for k in every}
    if not values:
        return values
    keys = list(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return dict(zip(keys, flat.unbind()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a run folder's name, autotune's answer)."""
    if not current().enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if current().enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap_state(state: Any, runtime: Any, *, sync_bn: bool = False) -> None:
    """Under torchrun: each trained module of ``state`` wrapped in DistributedDataParallel (bucketed all-reduce
    overlapping the backward pass), compiled whole; ``state.local`` keeps the unwrapped modules for evaluation.
    One process: nothing changes. ``sync_bn`` (``model.sync_bn``): SyncBatchNorm, CUDA only."""
    if not current().enabled:
        return
    from torch.nn.parallel import DistributedDataParallel

    from fasttrain.config import ConfigError

    for name, module in state.modules.items():
        if sync_bn:
            if not runtime.is_cuda:
                raise ConfigError("model.sync_bn: SyncBatchNorm needs CUDA devices (NCCL); turn it off on CPU")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # keeps the parameter objects
            state.modules[name] = module
        ddp = DistributedDataParallel(
            module, device_ids=[runtime.device.index] if runtime.is_cuda else None, gradient_as_bucket_view=True
        )
        state.ddp[name] = ddp
        state.callables[name] = runtime.compiled(ddp)
        state.local[name] = runtime.for_eval(module, runtime.compiled(module))
