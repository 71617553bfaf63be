"""Runtime decisions, made once: device, precision (autocast + scaler), memory format, compile, seeding.

The loop never branches on precision or device: it enters ``runtime.autocast()``, calls the scaler (a no-op
when disabled) and uses the model ``runtime.prepare_model`` returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fasttrain.config import Config, RuntimeConfig
from fasttrain.data.base import InputSpec

log = logging.getLogger(__name__)

__all__ = [
    "Precision",
    "decide_precision",
    "Runtime",
    "runtime_for",
    "environment",
    "seed_everything",
    "decide_device",
    "resolve_device",
    "dali_version",
    "BackendFlags",
    "backend_flags",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The precision policy: which dtype autocast uses (None = off) and whether a gradient scaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None
    use_scaler: bool

    @property
    def input_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32


def decide_precision(requested: str, device_type: str, bf16_supported: bool) -> Precision:
    """Pure policy. auto: bf16 where the GPU supports it, fp16 + scaler where it does not, fp32 on CPU.

    An explicit bf16 on a GPU without it is an error; fp16 on CPU is refused (CPU autocast has no fp16 kernels
    worth using); bf16 on CPU is allowed when asked (it runs, on recent CPUs it is faster).
    """
    if requested == "auto":
        if device_type == "cuda":
            requested = "bf16" if bf16_supported else "fp16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return Precision("fp32", None, False)
    if requested == "bf16":
        if device_type == "cuda" and not bf16_supported:
            raise ValueError("runtime.precision: bf16 is not supported by this GPU; use fp16 or auto")
        return Precision("bf16", torch.bfloat16, False)
    if requested == "fp16":
        if device_type != "cuda":
            raise ValueError("runtime.precision: fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return Precision("fp16", torch.float16, True)
    raise ValueError(f"runtime.precision: unknown value {requested!r}")


def decide_device(requested: str, cuda_count: int, current: int = 0) -> torch.device:
    """Pure policy: the device of ``runtime.device`` on a machine with ``cuda_count`` GPUs, ``current`` being
    the current CUDA device. A CUDA device always carries its index: several CUDA calls
    (``set_per_process_memory_fraction``, ``mem_get_info``, NVML lookups) refuse an index-less ``cuda``."""
    if requested == "auto":
        return torch.device("cuda", current) if cuda_count > 0 else torch.device("cpu")
    dev = torch.device(requested)
    if dev.type != "cuda":
        return dev
    if cuda_count == 0:
        raise ValueError(f"runtime.device: {requested!r} asked for, but CUDA is not available on this machine")
    index = current if dev.index is None else dev.index
    if index >= cuda_count:
        raise ValueError(f"runtime.device: {requested!r} does not exist ({cuda_count} GPUs)")
    return torch.device("cuda", index)


def resolve_device(requested: str) -> torch.device:
    """:func:`decide_device` on this machine (queries CUDA only when it is available)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return decide_device(requested, count, torch.cuda.current_device() if count else 0)


@dataclass(frozen=True)
class BackendFlags:
    """Process-wide torch switches a run depends on. Changed only through :func:`backend_flags`, which puts
    the previous values back: a benchmark of a plain script must not inherit fasttrain's settings."""

    cudnn_benchmark: bool
    """cuDNN tries the convolution algorithms for each new shape and keeps the fastest."""
    tf32_matmul: bool
    """float32 matrix products on tensor cores in TF32 (10-bit mantissa inputs)."""
    tf32_cudnn: bool
    """float32 convolutions on tensor cores in TF32."""
    deterministic: bool
    """torch.use_deterministic_algorithms (warn only)."""

    @classmethod
    def current(cls) -> BackendFlags:
        return cls(
            bool(torch.backends.cudnn.benchmark),
            bool(torch.backends.cuda.matmul.allow_tf32),
            bool(torch.backends.cudnn.allow_tf32),
            torch.are_deterministic_algorithms_enabled(),
        )

    @classmethod
    def torch_defaults(cls) -> BackendFlags:
        """What a script that sets nothing runs with (torch's defaults: TF32 for convolutions only)."""
        return cls(cudnn_benchmark=False, tf32_matmul=False, tf32_cudnn=True, deterministic=False)

    def apply(self) -> None:
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = self.tf32_matmul
        torch.backends.cudnn.allow_tf32 = self.tf32_cudnn
        if self.deterministic != torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(self.deterministic, warn_only=True)


@contextlib.contextmanager
def backend_flags(flags: BackendFlags) -> Iterator[BackendFlags]:
    """Set ``flags`` for the duration of the block, then restore what was set before."""
    before = BackendFlags.current()
    flags.apply()
    try:
        yield flags
    finally:
        before.apply()


def _on_off(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


class Runtime:
    """Device, precision, memory format and compile policy for one run."""

    def __init__(self, cfg: RuntimeConfig, *, conv_model: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        is_cuda = self.device.type == "cuda"
        bf16_ok = is_cuda and torch.cuda.is_bf16_supported()
        self.precision = decide_precision(cfg.precision, self.device.type, bf16_ok)
        # channels_last pays off for convolutions on tensor cores; on CPU it is neutral at best.
        self.channels_last = _on_off(cfg.channels_last, is_cuda) and conv_model
        self.compile = _on_off(cfg.compile, is_cuda)
        self.non_blocking = is_cuda
        self.pin_memory = is_cuda
        # Decided here, applied only by flags() (constructing a Runtime changes nothing process-wide).
        tf32 = _on_off(cfg.tf32, True)
        self.backend_flags = BackendFlags(
            cudnn_benchmark=is_cuda and cfg.cudnn_benchmark and not cfg.deterministic,
            tf32_matmul=tf32,
            tf32_cudnn=tf32,
            deterministic=cfg.deterministic,
        )

    def flags(self) -> contextlib.AbstractContextManager[BackendFlags]:
        """The process-wide switches this run uses (cuDNN benchmark, TF32, determinism), for one block:
        ``with runtime.flags(): ...``; the previous values come back afterwards."""
        return backend_flags(self.backend_flags)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.precision
        if p.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=p.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler; disabled (every call a pass-through) unless the policy needs one (fp16)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)

    def input_spec(self, mean: list[float], std: list[float]) -> InputSpec:
        return InputSpec(self.device, self.precision.input_dtype, self.channels_last, tuple(mean), tuple(std))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device (channels_last when on) in place; return the module to call (compiled or not).

        The uncompiled module stays the one whose state_dict is saved (no ``_orig_mod.`` prefixes).
        """
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return self.compiled(model)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module`` compiled when the policy says so (itself otherwise); a DDP wrapper is compiled whole, so
        its bucketed all-reduce overlaps the compiled backward."""
        if not self.compile:
            return module
        # dynamic=False: a second batch shape (the last eval batch) gets its own static graph. By default dynamo
        # would switch to a dynamic-shape graph and keep using it for the static training shape too.
        compiled = torch.compile(
            module, dynamic=False, mode=None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        )
        return compiled  # type: ignore[return-value]  # an OptimizedModule: an nn.Module calling the graph

    def allow_shapes(self, n: int) -> None:
        """Let torch.compile keep ``n`` static graphs per compiled function (progressive resizing: one per training
        size, plus evaluation's): dynamo's recompile limit (8) would otherwise fall back to eager beyond it."""
        if not self.compile:
            return
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, n)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Fused optimizer kernels on CUDA (one launch for all parameters); foreach elsewhere."""
        return {"fused": True} if self.is_cuda else {"foreach": True}

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        tf32 = " tf32" if self.is_cuda and self.precision.name == "fp32" and self.backend_flags.tf32_matmul else ""
        return (
            f"device={self.device} precision={self.precision.name}{tf32} channels_last={self.channels_last} "
            f"compile={self.compile}"
        )


def environment() -> dict[str, Any]:
    """What produced a figure or a run: fasttrain's version and git commit (when run from a checkout), the
    command line, library versions, GPU, driver, CPU count. ``cuda`` is the CUDA version in use: None on a
    machine without a GPU (``cuda_build`` is the version torch was built for). Never initialises DALI eagerly."""
    from fasttrain import __version__

    has_gpu = torch.cuda.is_available()
    env: dict[str, Any] = {
        "fasttrain": __version__,
        "git_commit": _git_commit(),
        "command": sys.argv[:],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda if has_gpu else None,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "dali": dali_version(),
        "gpu": None,
        "gpu_memory_gib": None,
        "driver": None,
    }
    if has_gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        env["driver"] = _driver_version()
    return env


def _git_commit() -> str | None:
    """The commit of the checkout fasttrain runs from (with ``+dirty`` for uncommitted changes); None when it
    was installed from a wheel or git is unavailable."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def dali_version() -> str | None:
    """The installed DALI's version from package metadata (DALI itself is not imported)."""
    return _version("nvidia.dali")


def _version(module: str) -> str | None:
    from importlib import metadata

    dist = {"torchvision": "torchvision", "nvidia.dali": None}[module]
    if dist:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or unusable: the record says None
        return None


def runtime_for(cfg: Config, **overrides: Any) -> Runtime:
    """The runtime of a config: channels_last only where its model convolves. ``overrides`` replace
    ``runtime.*`` fields for this use (e.g. ``compile="off"`` for eager probes or prediction)."""
    from fasttrain.models import is_conv_model

    rcfg = dataclasses.replace(cfg.runtime, **overrides) if overrides else cfg.runtime
    return Runtime(rcfg, conv_model=is_conv_model(cfg.model.name))
