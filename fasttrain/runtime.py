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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fasttrain.config import Config, RuntimeConfig
from fasttrain.data.base import InputSpec

log = logging.getLogger(__name__)

__all__ = ["Precision", "decide_precision", "Runtime", "runtime_for", "environment", "seed_everything",
           "resolve_device", "dali_version"]

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


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"runtime.device: {requested!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"runtime.device: {requested!r} does not exist ({torch.cuda.device_count()} GPUs)")
    return dev


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
        if is_cuda:
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

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
        if self.compile:
            # dynamic=False: a second batch shape (the last eval batch) gets its own static graph. By default
            # dynamo would switch to a dynamic-shape graph and keep using it for the static training shape too.
            return torch.compile(model, dynamic=False,
                                 mode=None if self.cfg.compile_mode == "default" else self.cfg.compile_mode)
        return model

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Fused optimizer kernels on CUDA (one launch for all parameters); foreach elsewhere."""
        return {"fused": True} if self.is_cuda else {"foreach": True}

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        return (f"device={self.device} precision={self.precision.name} channels_last={self.channels_last} "
                f"compile={self.compile}")


def environment() -> dict[str, Any]:
    """What produced a figure or a run: versions, GPU, driver, CPU count. Never initialises DALI eagerly."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "dali": dali_version(),
        "gpu": None,
        "gpu_memory_gib": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        env["driver"] = _driver_version()
    return env


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
