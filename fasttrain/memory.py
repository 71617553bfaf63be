"""Device memory in one place: out-of-memory detection, peak readings, whole-device readings, the per-process
cap, and byte formatting. Used by training, ``fasttrain bench``, autotune and the benchmarks.

Every function takes the run's device and is a cheap no-op (or an honest ``None``) on a CPU: there is no VRAM
there, only the process's resident set, whose peak :func:`peak_rss_bytes` reads (a lifetime peak that cannot
be reset). Nothing here initialises CUDA unless given a CUDA device.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import torch

from fasttrain.numbers import GIB, KIB, MIB

log = logging.getLogger(__name__)

__all__ = [
    "KIB",
    "MIB",
    "GIB",
    "CUBLAS_WORKSPACE_BYTES",
    "format_bytes",
    "is_oom_error",
    "oom_summary",
    "MemoryPeak",
    "reset_peak_memory",
    "read_peak",
    "peak_memory",
    "peak_rss_bytes",
    "alloc_retries",
    "allocated_bytes",
    "reserved_bytes",
    "free_device_memory",
    "DeviceMemory",
    "device_memory",
    "process_device_bytes",
    "outside_torch_bytes",
    "load_cuda_libraries",
    "get_memory_fraction",
    "release_dali_pools",
    "set_memory_fraction",
    "memory_fraction",
    "keep_host_heap",
    "available_host_bytes",
]

CUBLAS_WORKSPACE_BYTES = 32 * MIB
"""cuBLAS workspace torch allocates per (cuBLAS handle, stream) on Hopper (``CUBLAS_WORKSPACE_CONFIG``'s
default there is 4096 KiB x 8); cuBLASLt gets one of the same size. Handles are per thread, and the backward pass
runs on autograd's device thread, so a first train step leaves two or more of these allocated for good: they
live in torch's allocator (``memory_allocated`` counts them) and are not a leak."""


def format_bytes(n: int | float | None, unit: str | None = None) -> str:
    """``1.50 GiB``, ``32.0 MiB``, ``512 B``; ``-`` for None. ``unit`` (B, KiB, MiB, GiB) forces one."""
    if n is None:
        return "-"
    units = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB}
    if unit is None:
        unit = "GiB" if abs(n) >= GIB else "MiB" if abs(n) >= MIB else "KiB" if abs(n) >= KIB else "B"
    if unit not in units:
        raise ValueError(f"format_bytes: unit must be one of {', '.join(units)}, got {unit!r}")
    value = n / units[unit]
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.1f} {unit}"


# -- out of memory --------------------------------------------------------------------------------------------
_OOM_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",  # cuDNN 8
    # cuDNN 9 (torch's CUDA 13 wheels) names its allocation failures so; CUDNN_STATUS_ALLOC_FAILED is only an alias
    # of the host one there, and cudnnGetErrorString spells the new names (cudnn_graph.h)
    "cudnn_status_internal_error_device_allocation_failed",
    "cudnn_status_internal_error_host_allocation_failed",
    "can't allocate",  # the CPU allocator's "can't allocate memory", DALI's pool's "Can't allocate N bytes on ..."
    "cuda allocation failed",  # DALI's own allocator
)


def is_oom_error(exc: BaseException | None) -> bool:
    """True only for out-of-memory errors: ``torch.OutOfMemoryError``, a ``MemoryError``, or a RuntimeError whose
    message says out of memory (CUDA, cuBLAS / cuDNN allocation failures, the CPU allocator), also when it is
    the ``__cause__`` of another error (torch.compile re-raises) or the error another one was raised while
    handling (``__context__``): ``torch.cuda.graph``'s exit ends the capture whatever happened inside it, and
    when an allocation failed during a CUDA graph's recording, the capture's own error replaces the out-of-memory
    one. Everything else is a real bug."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS):
            return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def oom_summary(exc: BaseException) -> str:
    """A one-line description that keeps no reference to the exception (or the frames holding its tensors)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"out of memory ({first[:160]})"


# -- peaks ----------------------------------------------------------------------------------------------------
def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


@dataclass
class MemoryPeak:
    """Peak memory since the last :func:`reset_peak_memory`: torch's allocator on CUDA (None on CPU) and the
    process's lifetime peak RSS."""

    peak_allocated_bytes: int | None
    """CUDA: bytes handed out to tensors at the peak."""
    peak_reserved_bytes: int | None
    """CUDA: bytes the caching allocator held from the driver at the peak (what other processes cannot use)."""
    peak_rss_bytes: int
    """Peak resident set of this process over its lifetime (loader worker processes not included)."""

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)

    def max(self, other: MemoryPeak) -> MemoryPeak:
        def mx(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else max(a, b)

        return MemoryPeak(
            mx(self.peak_allocated_bytes, other.peak_allocated_bytes),
            mx(self.peak_reserved_bytes, other.peak_reserved_bytes),
            max(self.peak_rss_bytes, other.peak_rss_bytes),
        )

    def describe(self) -> str:
        if self.peak_reserved_bytes is not None:
            return (
                f"peak {format_bytes(self.peak_allocated_bytes, 'GiB')} allocated, "
                f"{format_bytes(self.peak_reserved_bytes, 'GiB')} reserved"
            )
        return f"peak RSS {format_bytes(self.peak_rss_bytes, 'GiB')} (process lifetime)"


def reset_peak_memory(device: torch.device | str | None) -> None:
    """Start a fresh peak on CUDA. On CPU the process peak RSS cannot be reset (getrusage is a lifetime peak)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (not of loader worker processes), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def read_peak(device: torch.device | str | None) -> MemoryPeak:
    """Peak allocated / reserved CUDA bytes since the last reset (None on CPU) and the process peak RSS."""
    dev = _device(device)
    if dev.type == "cuda":
        return MemoryPeak(
            int(torch.cuda.max_memory_allocated(dev)), int(torch.cuda.max_memory_reserved(dev)), peak_rss_bytes()
        )
    return MemoryPeak(None, None, peak_rss_bytes())


def peak_memory(device: torch.device | str | None) -> dict[str, int | None]:
    """:func:`read_peak` as a dict (``peak_allocated_bytes``, ``peak_reserved_bytes``, ``peak_rss_bytes``), for
    records that are dicts anyway (benchmark extra_info)."""
    return read_peak(device).to_dict()


def alloc_retries(device: torch.device | str | None) -> int:
    """Times torch's allocator flushed its cache and retried a cudaMalloc since the process started (0 on CPU).
    A step that needs retries runs at the limit: it stalls, and a long run fails on fragmentation."""
    dev = _device(device)
    if dev.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(dev).get("num_alloc_retries", 0))


def allocated_bytes(device: torch.device | str | None) -> int | None:
    dev = _device(device)
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else None


def reserved_bytes(device: torch.device | str | None) -> int | None:
    dev = _device(device)
    return int(torch.cuda.memory_reserved(dev)) if dev.type == "cuda" else None


def release_dali_pools() -> None:
    """Hand back what DALI's device and pinned-host pools keep after its pipelines were closed: closing a
    pipeline returns its buffers to those pools, not to the driver, so a later reading (an autotune trial, a
    verification, a run after ``autotune()`` in the same process) would count or hold them. A no-op when DALI
    was never imported (nothing is imported here)."""
    backend = sys.modules.get("nvidia.dali.backend")
    release = getattr(backend, "ReleaseUnusedMemory", None)
    if release is not None:
        release()


def free_device_memory(device: torch.device | str | None) -> None:
    """After dropping references: collect reference cycles, then hand torch's cached blocks back (CUDA), and
    DALI's pooled memory (:func:`release_dali_pools`)."""
    gc.collect()
    release_dali_pools()
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


# -- the whole device -----------------------------------------------------------------------------------------
@dataclass
class DeviceMemory:
    total_bytes: int
    used_bytes: int
    """Everything in use on the device: every process, CUDA contexts, memory outside torch's allocator."""
    source: str
    """nvml or cudaMemGetInfo."""


def _nvml_handle(pynvml, device: torch.device):
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def device_memory(device: torch.device | str) -> DeviceMemory:
    """Total and used bytes of the whole CUDA device: NVML, else cudaMemGetInfo (MIG, containers without NVML)."""
    dev = _device(device)
    if dev.type != "cuda":
        raise ValueError(f"device_memory: needs a CUDA device, got {dev}")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(pynvml, dev))
            return DeviceMemory(int(info.total), int(info.used), "nvml")
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - NVML missing, MIG, no NVML in a container: CUDA knows the totals
        log.debug("NVML unavailable (%s); using cudaMemGetInfo", e)
        free, total = torch.cuda.mem_get_info(dev)
        return DeviceMemory(int(total), int(total - free), "cudaMemGetInfo")


def process_device_bytes(device: torch.device | str) -> int | None:
    """Device bytes this process holds (its CUDA context, torch's reserved memory and everything allocated
    outside torch, such as DALI's buffers), from NVML's per-process accounting; None where NVML cannot see
    processes (containers without the host PID namespace, MIG)."""
    dev = _device(device)
    if dev.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(_nvml_handle(pynvml, dev))
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no NVML, or no per-process accounting here
        log.debug("NVML per-process memory unavailable (%s)", e)
        return None
    pid = os.getpid()
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        if p.pid == pid and used is not None:
            return int(used)
    return None


def held_device_bytes(device: torch.device | str) -> tuple[int, str]:
    """(bytes, where they were read): what this process holds on the device (NVML's per-process accounting,
    ``nvml process``), else, where NVML cannot see processes, the whole device's used bytes (``nvml`` or
    ``cudaMemGetInfo``), other processes included."""
    held = process_device_bytes(device)
    if held is not None:
        return held, "nvml process"
    dm = device_memory(device)
    return dm.used_bytes, dm.source


def outside_torch_bytes(device: torch.device | str) -> int | None:
    """Device bytes held outside torch's caching allocator (CUDA context, library handles, DALI's decode buffers
    and prefetched batches): NVML's figure for this process minus torch's reserved bytes; where NVML cannot see
    processes (containers without the host PID namespace, MIG), the whole device's used bytes minus torch's
    reserved, which includes other processes. Either way only the difference of two readings taken close
    together isolates one component (a loader). None on CPU."""
    dev = _device(device)
    if dev.type != "cuda":
        return None
    return max(0, held_device_bytes(dev)[0] - int(torch.cuda.memory_reserved(dev)))


def load_cuda_libraries(device: torch.device | str) -> None:
    """Create the CUDA context and load cuBLAS and cuDNN (lazily loaded, hundreds of MiB) so a reading taken
    afterwards counts them, and drop what this took from torch's cache."""
    dev = _device(device)
    if dev.type != "cuda":
        return
    a = torch.ones(64, 64, device=dev)
    torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8, device=dev), torch.ones(4, 3, 3, 3, device=dev))
    (a @ a).sum().item()
    del a
    free_device_memory(dev)


# -- the per-process cap --------------------------------------------------------------------------------------
_FRACTIONS_SET: dict[int | None, float] = {}
"""The caps :func:`set_memory_fraction` set, by device index: what :func:`get_memory_fraction` answers on a
torch without ``torch.cuda.get_per_process_memory_fraction`` (added after 2.4, the floor pyproject declares)."""


def get_memory_fraction(device: torch.device | str) -> float:
    """The caching allocator's per-process cap on ``device`` as a share of its total (1.0 when never set). On a
    torch that cannot read it back: the last cap fasttrain set (a cap set outside fasttrain is not seen)."""
    dev = _device(device)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return _FRACTIONS_SET.get(dev.index, 1.0)
    return float(getter(dev))


def set_memory_fraction(device: torch.device | str, fraction: float) -> None:
    """Cap torch's allocator on ``device`` at ``fraction`` of the device's total (clamped to 0..1)."""
    dev = _device(device)
    fraction = float(min(1.0, max(0.0, fraction)))
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    _FRACTIONS_SET[dev.index] = fraction


@contextlib.contextmanager
def memory_fraction(device: torch.device | str, fraction: float) -> Iterator[float]:
    """Cap torch's allocator for the block; the cap that was set before (the user's own, or none) comes back."""
    before = get_memory_fraction(device)
    set_memory_fraction(device, fraction)
    try:
        yield fraction
    finally:
        set_memory_fraction(device, before)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HOST_TRIM_THRESHOLD = 512 * MIB
"""Free memory glibc keeps at the top of the heap before giving it back to the kernel."""
HOST_MMAP_THRESHOLD = 32 * MIB
"""Allocations from here up get their own mapping (glibc's largest allowed value on 64-bit)."""
_heap_kept: str | None = None


def keep_host_heap(env: Mapping[str, str] | None = None) -> str | None:
    """Stop glibc from trimming the heap on every ``free`` of a CPU training step (measured: 8% of the step in
    ``sbrk``; 1.06-1.36x steady state with the thresholds raised): ``mallopt`` of the trim and mmap thresholds,
    once per process, called at the start of a CPU run (never on import). What was set, or None where nothing
    was: not glibc, or the user set ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` (theirs wins)."""
    global _heap_kept
    given: Mapping[str, str] = os.environ if env is None else env
    if _heap_kept is not None:
        return _heap_kept
    if any(k in given for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return None
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD) and libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    _heap_kept = (
        f"glibc heap kept: trim threshold {format_bytes(HOST_TRIM_THRESHOLD)}, mmap threshold "
        f"{format_bytes(HOST_MMAP_THRESHOLD)} (MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ override)"
    )
    return _heap_kept


def available_host_bytes() -> int | None:
    """What the kernel says new allocations may take without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError):
        pass
    return None
