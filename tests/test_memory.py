"""Device memory helpers on CPU: byte formatting, the out-of-memory classifier, peaks, the per-process cap (CUDA
calls stubbed) and NVML's per-process reading (pynvml stubbed)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fasttrain import memory as M


def test_format_bytes_picks_a_unit_and_can_be_forced():
    assert M.format_bytes(None) == "-"
    assert M.format_bytes(512) == "512 B"
    assert M.format_bytes(3 * M.KIB) == "3.0 KiB"
    assert M.format_bytes(32 * M.MIB) == "32.0 MiB"
    assert M.format_bytes(int(1.5 * M.GIB)) == "1.50 GiB"
    assert M.format_bytes(32 * M.MIB, "GiB") == "0.03 GiB"
    with pytest.raises(ValueError, match="unit"):
        M.format_bytes(1, "TB")


def test_oom_classifier_accepts_only_out_of_memory():
    assert M.is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert M.is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert M.is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert M.is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"))
    assert M.is_oom_error(RuntimeError("[DALI] Can't allocate 1048576 bytes on device 0."))  # DALI's memory pool
    # cuDNN 9 (torch's CUDA 13 wheels): cudnnGetErrorString(4004), cudnn_frontend's text, and the host one (4003)
    assert M.is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"))
    assert M.is_oom_error(
        RuntimeError("cudnnFinalize failed cudnn_status: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")
    )
    assert M.is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"))
    assert not M.is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))  # not memory
    assert M.is_oom_error(MemoryError())
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert M.is_oom_error(wrapped)
    assert not M.is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x4)"))
    assert not M.is_oom_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not M.is_oom_error(ValueError("out of memory"))  # not a runtime error from torch
    assert not M.is_oom_error(KeyError("x"))
    assert not M.is_oom_error(None)


def test_an_out_of_memory_error_replaced_while_it_was_handled_is_still_one():
    """torch.cuda.graph's exit ends the capture whatever raised inside it: an allocation that failed while a CUDA
    graph recorded comes back as the capture's error, the out-of-memory one its context."""

    def recorded() -> None:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    with pytest.raises(RuntimeError) as caught:
        recorded()
    assert M.is_oom_error(caught.value)
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("a bug, its context suppressed") from None
    except RuntimeError as e:
        assert not M.is_oom_error(e)
    try:
        try:
            raise KeyError("x")
        except KeyError:
            raise RuntimeError("a bug raised while handling another")  # noqa: B904
    except RuntimeError as e:
        assert not M.is_oom_error(e)


def test_oom_summary_is_one_line_and_short():
    text = M.oom_summary(torch.OutOfMemoryError("CUDA out of memory. " + "x" * 500 + "\nsecond line"))
    assert text.startswith("out of memory (CUDA out of memory.") and "\n" not in text and len(text) < 200
    assert M.oom_summary(MemoryError()) == "out of memory (MemoryError)"


def test_peaks_on_cpu_report_rss_only():
    peak = M.read_peak("cpu")
    assert peak.peak_allocated_bytes is None and peak.peak_reserved_bytes is None
    assert peak.peak_rss_bytes > 10 * M.MIB  # a Python process with torch holds far more than 10 MiB
    assert M.peak_memory(torch.device("cpu")) == {
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        "peak_rss_bytes": M.peak_memory("cpu")["peak_rss_bytes"],
    }
    assert "RSS" in peak.describe()
    M.reset_peak_memory("cpu")  # no-op, no CUDA init
    assert M.alloc_retries("cpu") == 0 and M.allocated_bytes("cpu") is None and M.reserved_bytes("cpu") is None
    assert M.outside_torch_bytes("cpu") is None
    with pytest.raises(ValueError, match="CUDA"):
        M.device_memory("cpu")


def test_memory_peak_max_keeps_the_larger_of_each():
    a = M.MemoryPeak(10, 20, 100)
    b = M.MemoryPeak(15, None, 50)
    assert a.max(b) == M.MemoryPeak(15, 20, 100)
    assert "reserved" in a.describe()


class FakeCuda:
    """torch.cuda's per-process fraction, as a dict per device index."""

    def __init__(self, start: float):
        self.fraction = {0: start}

    def get(self, device=None):
        return self.fraction[torch.device(device).index]

    def set(self, fraction, device=None):
        assert isinstance(fraction, float)
        self.fraction[torch.device(device).index] = fraction


def test_memory_fraction_restores_the_users_own_cap(monkeypatch):
    fake = FakeCuda(0.7)  # the user capped this process at 70 % before calling us
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fake.get)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fake.set)
    dev = torch.device("cuda", 0)
    with M.memory_fraction(dev, 0.25):
        assert M.get_memory_fraction(dev) == 0.25
        M.set_memory_fraction(dev, 1.7)  # clamped
        assert fake.fraction[0] == 1.0
    assert fake.fraction[0] == 0.7  # not 1.0: the user's value comes back
    with pytest.raises(RuntimeError), M.memory_fraction(dev, 0.5):
        raise RuntimeError("a failing probe")
    assert fake.fraction[0] == 0.7


def test_memory_fraction_works_on_a_torch_that_cannot_read_the_cap_back(monkeypatch):
    """torch.cuda.get_per_process_memory_fraction came after torch 2.4 (pyproject's floor): without it the cap
    that fasttrain set is what comes back, and an uncapped device reads 1.0."""
    fake = FakeCuda(1.0)
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fake.set)
    monkeypatch.setattr(M, "_FRACTIONS_SET", {})
    dev = torch.device("cuda", 0)
    assert M.get_memory_fraction(dev) == 1.0
    with M.memory_fraction(dev, 0.5):
        assert fake.fraction[0] == 0.5 and M.get_memory_fraction(dev) == 0.5
        with M.memory_fraction(dev, 0.25):
            assert fake.fraction[0] == 0.25
        assert fake.fraction[0] == 0.5
    assert fake.fraction[0] == 1.0 and M.get_memory_fraction(dev) == 1.0


def test_process_device_bytes_reads_this_process_from_nvml(monkeypatch):
    import os

    proc = types.SimpleNamespace
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: ("handle", uuid)
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        proc(pid=1, usedGpuMemory=5 * M.GIB),
        proc(pid=os.getpid(), usedGpuMemory=3 * M.GIB),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="abc"))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 2 * M.GIB)
    dev = torch.device("cuda", 0)
    assert M.process_device_bytes(dev) == 3 * M.GIB
    assert M.outside_torch_bytes(dev) == 1 * M.GIB  # 3 GiB held, 2 GiB of it torch's reserved cache
    assert M.held_device_bytes(dev) == (3 * M.GIB, "nvml process")
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [proc(pid=1, usedGpuMemory=5 * M.GIB)]
    assert M.process_device_bytes(dev) is None  # this process not visible (container PID namespace)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: proc(total=80 * M.GIB, used=9 * M.GIB)
    assert M.outside_torch_bytes(dev) == 7 * M.GIB  # then the whole device (other processes included)
    assert M.held_device_bytes(dev) == (9 * M.GIB, "nvml")
    assert M.device_memory(dev) == M.DeviceMemory(80 * M.GIB, 9 * M.GIB, "nvml")


def test_cublas_workspace_constant_is_the_hopper_default():
    assert M.CUBLAS_WORKSPACE_BYTES == 4096 * M.KIB * 8


def test_the_host_heap_is_kept_at_train_start_never_on_import(shapes_root, tmp_path, monkeypatch):
    import subprocess
    import sys

    from fasttrain import memory
    from fasttrain.engine import train
    from tests.tinyrun import tiny_cfg

    # Importing fasttrain (engine included) changes nothing in the allocator.
    code = "import fasttrain.engine, fasttrain.memory as m; print(m._heap_kept)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "None"
    # The user's own glibc settings win (in a process where no run has kept the heap yet).
    monkeypatch.setattr(memory, "_heap_kept", None)
    assert memory.keep_host_heap({"MALLOC_TRIM_THRESHOLD_": "0"}) is None
    calls = []
    monkeypatch.setattr(memory, "keep_host_heap", lambda: calls.append(1) or "kept")
    train(tiny_cfg(shapes_root, tmp_path, epochs=1, max_steps=1), progress=False)
    assert calls == [1]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_host_heap_sets_the_thresholds_on_glibc(monkeypatch):
    from fasttrain import memory

    monkeypatch.setattr(memory, "_heap_kept", None)
    done = memory.keep_host_heap({})
    assert done is not None and "trim threshold 512" in done


def test_a_cpu_batch_that_cannot_fit_the_host_is_refused_in_one_line_before_the_first_step(
    shapes_root, tmp_path, monkeypatch
):
    from fasttrain import memory
    from fasttrain.config import ConfigError, load_config
    from fasttrain.engine import train
    from fasttrain.prepare import prepare

    # The README's tour command on a small machine (stubbed: 2 GiB available); only meta tensors are built.
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2 * memory.GIB)
    cfg = load_config(
        "resnet50-imagenet", [f"data.root={shapes_root}", "runtime.device=cpu", f"train.runs_dir={tmp_path}"]
    )
    with pytest.raises(
        ConfigError, match=r"^train.batch_size: .* resnet50 at 224 px and micro-batch 256 needs about"
    ) as e:
        prepare(cfg)
    assert (
        "\n" not in str(e.value)
        and "2.00 GiB available" in str(e.value)
        and "fits: lower train.batch_size" in str(e.value)
    )
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(cfg, progress=False)
    assert not list(tmp_path.iterdir())  # refused before a run folder existed
    small = load_config("resnet50-imagenet", [f"data.root={shapes_root}", "runtime.device=cpu", "train.batch_size=2"])
    assert prepare(small).cfg.train.batch_size == 2  # a batch that fits is let through


def test_the_host_step_estimate_grows_with_the_batch_and_bf16_keeps_less():
    from fasttrain.runtime import HOST_ACTIVATION_SHARE, ModelProfile, host_batch_limit, host_step_bytes

    p = ModelProfile(forward_flops=1e9, saved_bytes=100 * 2**20, param_bytes=10 * 2**20)
    assert host_step_bytes(p, 8, "fp32") == int(8 * 100 * 2**20 * HOST_ACTIVATION_SHARE["fp32"]) + 40 * 2**20
    assert host_step_bytes(p, 8, "bf16") < host_step_bytes(p, 8, "fp32") < host_step_bytes(p, 9, "fp32")
    limit = host_batch_limit(p, "fp32", 2**30)
    assert host_step_bytes(p, limit, "fp32") <= 0.9 * 2**30 < host_step_bytes(p, limit + 1, "fp32")
    assert host_batch_limit(p, "fp32", 2**20) == 0
