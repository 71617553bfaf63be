"""Runtime decisions, made once: device, precision (autocast + scaler), memory format, compile, seeding.

The loop never branches on precision or device: it enters ``runtime.autocast()``, calls the scaler (a no-op
when disabled) and uses the model ``runtime.prepare_model`` returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import platform
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fasttrain.config import CUDA_GRAPH_COMPILE_MODES, Config, RuntimeConfig, trained_samples
from fasttrain.data.base import InputSpec
from fasttrain.numbers import GIB
from fasttrain.rundir import git_commit

log = logging.getLogger(__name__)

__all__ = [
    "Precision",
    "decide_precision",
    "Runtime",
    "runtime_for",
    "environment",
    "seed_everything",
    "rank_seed",
    "decide_device",
    "native_bf16",
    "resolve_device",
    "dali_version",
    "BackendFlags",
    "backend_flags",
    "CpuJob",
    "cpu_flags",
    "cpu_bf16",
    "decide_cpu_compile",
    "ModelProfile",
    "model_profile",
    "matmul_flops",
    "PROFILE_CPU_BYTES",
    "host_step_bytes",
    "host_batch_limit",
    "HOST_ACTIVATION_SHARE",
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
    """Pure policy. auto: bf16 where the GPU supports it, fp16 + scaler where it does not; on CPU bf16 where the
    CPU has bf16 instructions (``bf16_supported``: :func:`cpu_bf16`; measured 1.96x on smallcnn), else fp32.

    An explicit bf16 on a GPU without it is an error; fp16 on CPU is refused (CPU autocast has no fp16 kernels
    worth using); bf16 on CPU is allowed when asked (it runs, on recent CPUs it is faster).
    """
    if requested == "auto":
        if device_type == "cuda":
            requested = "bf16" if bf16_supported else "fp16"
        else:
            requested = "bf16" if bf16_supported else "fp32"
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


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes in bf16 natively (Ampere, 8.0, and later).
    ``torch.cuda.is_bf16_supported()`` also counts emulation (slow on a T4) and reads the current device."""
    return tuple(capability) >= (8, 0)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (``flags`` on x86, ``Features`` on
    ARM); empty when there are none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # AMX tiles; AVX-512 BF16 (Cooper Lake, Zen 4); ARM's BF16


def cpu_bf16(flags: frozenset[str], mkldnn_bf16: bool) -> tuple[bool, str]:
    """Pure policy: whether bf16 autocast pays on this CPU, and why. It needs bf16 arithmetic in hardware
    (``flags`` from :func:`cpu_flags`) and oneDNN's bf16 kernels (``mkldnn_bf16``): oneDNN also runs bf16 on plain
    AVX-512 by converting, which is slower than fp32."""
    found = [f for f in _BF16_FLAGS if f in flags]
    if not found:
        return False, "the CPU has no bf16 instructions (no avx512_bf16 / amx_bf16 in /proc/cpuinfo)"
    if not mkldnn_bf16:
        return False, f"the CPU has {found[0]} but this torch has no oneDNN bf16 kernels"
    return True, f"the CPU has {found[0]}"


@functools.cache
def _host_cpu_bf16() -> tuple[bool, str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False, "/proc/cpuinfo is unreadable, so bf16 support is unknown"
    mkldnn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return cpu_bf16(cpu_flags(text), mkldnn)


@dataclass(frozen=True)
class CpuJob:
    """How much training a CPU run does, for ``runtime.compile = auto``: whether a compile can repay itself."""

    samples: int
    """Training samples the run processes (:func:`trained_samples`)."""
    forward_flops: float | None
    """Forward FLOPs of one sample (None: unknown, e.g. a model from Python)."""
    threads: int
    """CPU threads torch computes with."""


CPU_EAGER_FLOPS_PER_THREAD = 50e9
"""Eager training FLOP/s per thread assumed by the compile decision: set above what was measured (~43 GFLOP/s
per thread, smallcnn fp32 on an EPYC), so a job's eager time is underestimated and compile chosen only when
it surely repays."""
CPU_COMPILE_COLD_S = 20.0
"""What a cold torch.compile of a training step costs on 2 CPU cores (measured 20-37 s)."""
CPU_COMPILE_GAIN = {"fp32": 0.35, "bf16": 0.0}
"""Share of the eager step time compile saves on CPU (measured on smallcnn: 1.61x in fp32; nothing over
bf16 + channels_last, 2.03x against 2.10x)."""


def decide_cpu_compile(requested: str, precision: str, job: CpuJob | None) -> tuple[bool, str]:
    """Pure policy for ``runtime.compile`` on CPU: on/off as asked; auto compiles only when the job's estimated
    eager time times compile's gain repays the cold compile (evaluation then runs eagerly: no recompiles)."""
    if requested != "auto":
        return requested == "on", f"runtime.compile = {requested}"
    gain = CPU_COMPILE_GAIN.get(precision, 0.0)
    if gain <= 0:
        return False, f"compile gains nothing measurable over {precision} + channels_last on CPU"
    if job is None or job.forward_flops is None:
        return False, "the job's length is unknown"
    eager_s = 3 * job.forward_flops * job.samples / (CPU_EAGER_FLOPS_PER_THREAD * max(job.threads, 1))
    saved = gain * eager_s
    verdict = "repays" if saved > CPU_COMPILE_COLD_S else "does not repay"
    return saved > CPU_COMPILE_COLD_S, (
        f"the job's ~{eager_s:.0f} s of eager steps ({job.samples} samples) would save ~{saved:.0f} s, which "
        f"{verdict} a ~{CPU_COMPILE_COLD_S:.0f} s cold compile"
    )


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


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """Process ``rank``'s own seed from the run's (and ``more``): numpy's SeedSequence mixes them, so no two
    pairs share a stream (seed + rank would give (1, 0) and (0, 1) one)."""
    return int(np.random.SeedSequence([seed % 2**64, rank, *more]).generate_state(1)[0])


class Runtime:
    """Device, precision, memory format and compile policy for one run."""

    def __init__(self, cfg: RuntimeConfig, *, conv_model: bool = True, cpu_job: Callable[[], CpuJob] | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        is_cuda = self.device.type == "cuda"
        self.reasons: dict[str, str] = {}
        """Why each ``auto`` setting was decided as it was (logged once by the run)."""
        if is_cuda:
            # What torchrun's set-up does for each rank: pinned memory, streams, the environment record and every
            # call without an index then use the run's GPU, not GPU 0.
            torch.cuda.set_device(self.device)
            bf16_ok = native_bf16(torch.cuda.get_device_capability(self.device))
        elif cfg.precision == "auto":
            bf16_ok, self.reasons["precision"] = _host_cpu_bf16()
        else:
            bf16_ok = False
        self.precision = decide_precision(cfg.precision, self.device.type, bf16_ok)
        # channels_last pays off for convolutions on tensor cores, and on CPU too: oneDNN's convolutions are
        # NHWC-native (measured 1.33x on smallcnn fp32, 1.38x in bf16).
        self.channels_last = _on_off(cfg.channels_last, True) and conv_model
        if cfg.channels_last == "auto" and not is_cuda:
            self.reasons["channels_last"] = "a conv model (oneDNN convolves NHWC)" if conv_model else "not a conv model"
        if is_cuda:
            self.compile = _on_off(cfg.compile, True)
        else:
            # The job's length is counted (one sample through the model) only where compile could gain.
            counted = cfg.compile == "auto" and CPU_COMPILE_GAIN.get(self.precision.name, 0.0) > 0
            job = cpu_job() if cpu_job is not None and counted else None
            self.compile, why = decide_cpu_compile(cfg.compile, self.precision.name, job)
            if cfg.compile == "auto":
                self.reasons["compile"] = why
        self.eager_eval = not is_cuda
        """Evaluation calls the uncompiled module: on CPU a recompile for eval mode and the last partial batch
        costs 4-7 s, more than a small job's evaluation; on CUDA the compiled evaluation pays."""
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

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled functions run as CUDA graphs: torch.compile's reduce-overhead and max-autotune modes
        on CUDA (:data:`~fasttrain.config.CUDA_GRAPH_COMPILE_MODES`; on the CPU the modes capture nothing)."""
        return self.is_cuda and self.compile and self.cfg.compile_mode in CUDA_GRAPH_COMPILE_MODES

    @property
    def warmup_calls(self) -> int:
        """Calls of a compiled function at a new shape before its time is the steady state's: 1 (the compile),
        2 with CUDA graphs (torch.compile's reduce-overhead and max-autotune modes on CUDA run a new function
        once to warm it up and record its graph at the second call; replays start at the third)."""
        return 2 if self.cuda_graphs else 1

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

    def for_eval(self, module: nn.Module, compiled: nn.Module) -> nn.Module:
        """What evaluation calls: the uncompiled ``module`` where evaluation runs eagerly (CPU), else
        ``compiled``."""
        return module if self.eager_eval else compiled

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

    def explain(self) -> str:
        """The ``auto`` decisions and why, one clause each (empty when nothing was decided automatically)."""
        values = {"precision": self.precision.name, "channels_last": self.channels_last, "compile": self.compile}
        return "; ".join(f"runtime.{k} = auto -> {values[k]}: {why}" for k, why in self.reasons.items())

    def describe(self) -> str:
        tf32 = " tf32" if self.is_cuda and self.precision.name == "fp32" and self.backend_flags.tf32_matmul else ""
        return (
            f"device={self.device} precision={self.precision.name}{tf32} channels_last={self.channels_last} "
            f"compile={self.compile}"
        )


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What produced a figure or a run: fasttrain's version and git commit (when run from a checkout), the
    command line, library versions, GPU (``device``'s, else the current one), driver, CPU count. ``cuda`` is the
    CUDA version in use: None on a machine without a GPU (``cuda_build`` is the version torch was built for).
    Never initialises DALI eagerly."""
    from fasttrain import __version__

    has_gpu = torch.cuda.is_available()
    env: dict[str, Any] = {
        "fasttrain": __version__,
        "git_commit": git_commit(),
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
        index = device.index if device is not None and device.type == "cuda" else None
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 2)
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


def process_device(requested: str, local_rank: int, cuda_count: int) -> str:
    """``runtime.device`` for one process of a torchrun job: a CUDA device is GPU ``LOCAL_RANK`` whatever index
    is asked for (one GPU per process), anything else as asked. A rank built on the config's ``cuda:0`` moved
    its current device there: its object collectives ran on another rank's GPU, and it left a CUDA context on
    GPU 0 that rank 0's memory readings counted."""
    return f"cuda:{local_rank}" if decide_device(requested, cuda_count).type == "cuda" else requested


def runtime_for(cfg: Config, *, train_samples: int | None = None, **overrides: Any) -> Runtime:
    """The runtime of a config: channels_last only where its model convolves, under torchrun on this process's
    GPU (:func:`process_device`) unless ``overrides`` name a device. ``overrides`` replace
    ``runtime.*`` fields for this use (e.g. ``compile="off"`` for eager probes or prediction).
    ``train_samples``: the training set's size, from which ``runtime.compile = auto`` on CPU judges the job's
    length (without it, auto stays eager there)."""
    from fasttrain.distributed import dist_info
    from fasttrain.models import is_conv_model

    rcfg = dataclasses.replace(cfg.runtime, **overrides) if overrides else cfg.runtime
    info = dist_info()
    if info.world_size > 1 and "device" not in overrides:  # under torchrun (from its environment: before the
        # process group is joined too); a caller's own device (prediction's --device) is taken as given
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        rcfg = dataclasses.replace(rcfg, device=process_device(rcfg.device, info.local_rank, count))
    job = None
    if train_samples is not None:
        n = train_samples
        job = lambda: cpu_job(cfg, n)  # noqa: E731 - called only where compile = auto could gain on CPU
    return Runtime(rcfg, conv_model=is_conv_model(cfg.model.name), cpu_job=job)


def cpu_job(cfg: Config, train_samples: int) -> CpuJob:
    """The job's length: samples trained (:func:`trained_samples`) and one sample's forward FLOPs
    (:func:`model_profile`)."""
    return CpuJob(trained_samples(cfg.train, train_samples), _forward_flops(cfg), torch.get_num_threads())


@dataclass(frozen=True)
class ModelProfile:
    """What one sample costs a model: one float32 forward pass, its FLOPs counted from the shapes its layers
    see (:func:`matmul_flops`)."""

    forward_flops: float
    """Forward FLOPs of one sample (the matrix products: convolutions, linear layers, attention)."""
    saved_bytes: int
    """Bytes autograd saves for the backward pass per sample, in float32 (distinct tensors)."""
    param_bytes: int
    """Bytes of the parameters (float32)."""


PROFILE_CPU_BYTES = 256 << 20
"""A model is profiled on the meta device (nothing allocated, nothing computed) where ``torch._dynamo`` is
imported already (torchvision's models import it). Elsewhere, the meta device would import it (its kernels are
Python decompositions that ask for it): 1.5 s of start-up, which a small CPU job's quick answers, such as
autotune's "too short to tune", would pay; one real sample through a small net on the CPU costs some 0.05 s
instead. It is tried while the parameters and the activations saved stay under this many bytes
and the FLOPs under :data:`PROFILE_CPU_FLOPS`; the meta device takes over beyond. Both count the same FLOPs and,
for convolutional nets, the same bytes (attention may save other tensors on the CPU than its meta kernels)."""
PROFILE_CPU_FLOPS = 2e9
"""See :data:`PROFILE_CPU_BYTES`."""


def model_profile(cfg: Config) -> ModelProfile | None:
    """The profile of ``model.name`` at the config's input size; None for a model from Python or one that
    cannot run one sample (on the CPU, nor on the meta device)."""
    from fasttrain.models import CUSTOM

    m, d = cfg.model, cfg.data
    if m.name == CUSTOM:
        return None
    return _profile(m.name, d.channels, d.image_size, m.width, m.dropout, m.num_outputs or 2)


def _meta_costs_nothing() -> bool:
    return "torch._dynamo" in sys.modules


class _TooLarge(Exception):
    """Not on the CPU: see :data:`PROFILE_CPU_BYTES`."""


@functools.cache
def _profile(name: str, c: int, s: int, width: int, dropout: float, outputs: int) -> ModelProfile | None:
    from fasttrain.models import build_model

    def build(device: str) -> nn.Module:
        with torch.device(device):
            return build_model(
                name, in_channels=c, num_outputs=outputs, image_size=s, width=width, dropout=dropout, pretrained=False
            )

    # fork_rng: the CPU model's initial weights and dropout draw from the CPU generator, which a seeded run must
    # find as it left it.
    with torch.random.fork_rng(devices=[]):
        try:
            model = build("meta")  # nothing allocated: the parameters are counted before any is made
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            try:
                if params > PROFILE_CPU_BYTES or _meta_costs_nothing():
                    raise _TooLarge
                with _one_thread():
                    flops, saved = _one_sample(build("cpu"), c, s, PROFILE_CPU_BYTES - params, PROFILE_CPU_FLOPS)
            except Exception as e:  # noqa: BLE001 - meta's import paid, too large, or a model the CPU cannot run
                log.debug("%s profiled on the meta device (%s)", name, type(e).__name__)
                flops, saved = _one_sample(model, c, s)
        except Exception as e:  # noqa: BLE001 - a model that cannot run one sample: its cost stays unknown
            log.debug("%s not profiled: %s", name, e)
            return None
    return ModelProfile(flops, saved, params)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One sample of a small net gains nothing from threads, and the first parallel kernel spends 0.5 s starting
    them on a loaded 2-core machine (measured: 0.05 s in one thread): a job that stops after its profile, such as
    autotune's "too short to tune", would pay it for nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_sample(
    model: nn.Module, c: int, s: int, max_bytes: float = math.inf, max_flops: float = math.inf
) -> tuple[float, int]:
    """(forward FLOPs, bytes saved for backward) of one float32 sample through ``model`` on its device, in
    training mode; raises :class:`_TooLarge` as soon as more than ``max_bytes`` are saved or ``max_flops`` run."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    saved: dict[int, int] = {}
    total = [0, 0.0]  # saved bytes, FLOPs

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in saved:  # each is kept alive until the end: an id is never reused meanwhile
            saved[id(base)] = base.numel() * base.element_size()
            total[0] += saved[id(base)]
            if total[0] > max_bytes:
                raise _TooLarge
        return t

    def count(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        total[1] += matmul_flops(module, args, kwargs, output)
        if total[1] > max_flops:
            raise _TooLarge

    hooks = [m.register_forward_hook(count, with_kwargs=True) for m in model.modules()]
    try:
        with (
            torch.enable_grad(),
            torch.autocast("cpu", enabled=False),  # float32, as the meta device counts
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model.train()(torch.zeros(1, c, s, s, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total[1], int(total[0])


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def matmul_flops(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> float:
    """Pure: the FLOPs (2 per multiply-add) of one call of a convolution, linear or multi-head attention layer,
    from the shapes it saw, as ``torch.utils.flop_counter`` counts them (biases and everything else: 0). Matrix
    products a model makes outside these layers (``F.linear``, ``torch.matmul``, ``F.scaled_dot_product_attention``
    in its own forward) are not seen: the count is then low by their share."""
    if isinstance(module, _CONV_T):  # weight: in x out/groups x kernel, applied at every input position
        return 2.0 * _input(args, kwargs).numel() * (module.weight.numel() // module.weight.shape[0])
    if isinstance(module, _CONV):  # weight: out x in/groups x kernel, applied at every output position
        return 2.0 * output.numel() * (module.weight.numel() // module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return 2.0 * _input(args, kwargs).numel() * module.out_features
    if isinstance(module, nn.MultiheadAttention):
        return _attention_flops(module, args, kwargs)
    return 0.0


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _attention_flops(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> float:
    """Projections of query, key, value and output, then query x key and weights x value (2 x L x S x E)."""
    q, k = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key")))
    seq = 1 if m.batch_first and q.dim() == 3 else 0
    n_q, n_k, e = q.shape[seq], k.shape[seq], m.embed_dim
    batch = q.numel() // (n_q * q.shape[-1])
    return 2.0 * batch * (2 * n_q * e * e + n_k * (m.kdim + m.vdim) * e + 2 * n_q * n_k * e)


HOST_ACTIVATION_SHARE = {"fp32": 0.7, "bf16": 0.4}
"""Resident bytes per sample of a CPU step over the float32 bytes counted as saved for backward (distinct
tensors on the meta device also count what oneDNN never keeps). Measured on resnet50 at 224 px (peak RSS growth
from batch 4 to 12, 2-core EPYC): fp32 111 MiB and bf16 + channels_last 57 MiB per sample against 180 MiB
counted, i.e. 0.62 and 0.32; set a little above."""


def _per_sample(profile: ModelProfile, precision: str) -> float:
    return profile.saved_bytes * HOST_ACTIVATION_SHARE.get(precision, 1.0)


def host_step_bytes(profile: ModelProfile, batch: int, precision: str) -> int:
    """Pure estimate of the host memory a CPU training step at ``batch`` adds: the activations it keeps for
    the backward pass (:data:`HOST_ACTIVATION_SHARE`) plus weights, gradients and two optimizer states."""
    return int(batch * _per_sample(profile, precision)) + 4 * profile.param_bytes


def host_batch_limit(profile: ModelProfile, precision: str, available: int, share: float = 0.9) -> int:
    """Pure: the largest batch whose :func:`host_step_bytes` fits ``share`` of ``available`` host bytes (0: none)."""
    per_sample = _per_sample(profile, precision)
    room = share * available - 4 * profile.param_bytes
    return max(0, int(room // per_sample)) if per_sample else 1 << 30


def _forward_flops(cfg: Config) -> float | None:
    profile = model_profile(cfg)
    return None if profile is None else profile.forward_flops
