import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

import fasttrain
from fasttrain.config import RuntimeConfig
from fasttrain.runtime import (
    BackendFlags,
    CpuJob,
    Runtime,
    backend_flags,
    cpu_bf16,
    cpu_flags,
    decide_cpu_compile,
    decide_device,
    decide_precision,
    environment,
    native_bf16,
)


@pytest.mark.parametrize(
    "requested, device, bf16, name, dtype, scaler",
    [
        ("auto", "cuda", True, "bf16", torch.bfloat16, False),
        ("auto", "cuda", False, "fp16", torch.float16, True),
        ("auto", "cpu", False, "fp32", None, False),
        ("auto", "cpu", True, "bf16", torch.bfloat16, False),
        ("fp32", "cpu", True, "fp32", None, False),
        ("fp32", "cuda", True, "fp32", None, False),
        ("bf16", "cpu", False, "bf16", torch.bfloat16, False),
        ("fp16", "cuda", True, "fp16", torch.float16, True),
    ],
)
def test_precision_policy(requested, device, bf16, name, dtype, scaler):
    p = decide_precision(requested, device, bf16)
    assert (p.name, p.autocast_dtype, p.use_scaler) == (name, dtype, scaler)
    assert p.input_dtype == (dtype or torch.float32)


def test_precision_refusals_name_the_field():
    with pytest.raises(ValueError, match="runtime.precision: bf16 is not supported"):
        decide_precision("bf16", "cuda", False)
    with pytest.raises(ValueError, match="runtime.precision: fp16 needs a CUDA device"):
        decide_precision("fp16", "cpu", False)


# /proc/cpuinfo as an AMD EPYC (Zen 4) and an older Xeon print it (shortened), and an ARM machine's.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512vl\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    "cpuinfo, mkldnn, fast, why",
    [
        (ZEN4, True, True, "avx512_bf16"),
        (SAPPHIRE, True, True, "amx_bf16"),
        (GRAVITON3, True, True, "bf16"),
        (SKYLAKE, True, False, "no bf16 instructions"),  # oneDNN emulates bf16 on AVX-512: slower than fp32
        ("", True, False, "no bf16 instructions"),
        (ZEN4, False, False, "no oneDNN bf16 kernels"),
    ],
)
def test_cpu_bf16_is_decided_from_the_cpu_flags(cpuinfo, mkldnn, fast, why):
    ok, reason = cpu_bf16(cpu_flags(cpuinfo), mkldnn)
    assert ok is fast and why in reason


def test_cpu_flags_reads_the_first_processor():
    assert "avx512_bf16" in cpu_flags(ZEN4) and "sysret_ss_attrs" not in cpu_flags(ZEN4)
    assert cpu_flags("processor\t: 0\n") == frozenset()


def test_cpu_compile_repays_only_on_a_long_fp32_job():
    small = CpuJob(samples=18 * 64 * 8, forward_flops=3.95e7, threads=2)  # the quickstart's size
    long = CpuJob(samples=50_000 * 30, forward_flops=3.95e7, threads=2)  # CIFAR-10, 30 epochs
    assert decide_cpu_compile("auto", "fp32", small)[0] is False
    on, why = decide_cpu_compile("auto", "fp32", long)
    assert on and "repays" in why
    assert decide_cpu_compile("auto", "bf16", long) == (False, decide_cpu_compile("auto", "bf16", None)[1])
    assert decide_cpu_compile("auto", "fp32", None) == (False, "the job's length is unknown")
    assert decide_cpu_compile("auto", "fp32", CpuJob(10**9, None, 2))[0] is False
    assert decide_cpu_compile("on", "bf16", small)[0] is True
    assert decide_cpu_compile("off", "fp32", long)[0] is False


def test_cpu_runtime_defaults(monkeypatch):
    from fasttrain import runtime as rtmod

    for fast in (False, True):
        monkeypatch.setattr(rtmod, "_host_cpu_bf16", lambda fast=fast: (fast, "stub"))
        rt = Runtime(RuntimeConfig(device="cpu"))
        assert rt.device.type == "cpu"
        assert rt.precision.name == ("bf16" if fast else "fp32")
        assert rt.compile is False and rt.channels_last is True  # a conv model; no job length: eager
        assert rt.eager_eval
        assert "runtime.precision = auto -> " in rt.explain() and "runtime.compile = auto -> False" in rt.explain()
        assert not rt.grad_scaler().is_enabled()
    assert not Runtime(RuntimeConfig(device="cpu"), conv_model=False).channels_last
    explicit = Runtime(RuntimeConfig(device="cpu", precision="fp32", channels_last="off", compile="off"))
    assert explicit.explain() == "" and not explicit.channels_last
    forced = Runtime(RuntimeConfig(device="cpu", channels_last="on", compile="on"))
    assert forced.channels_last and forced.compile
    assert not Runtime(RuntimeConfig(device="cpu", channels_last="on"), conv_model=False).channels_last


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="runtime.device: 'cuda' asked for"):
        Runtime(RuntimeConfig(device="cuda"))


def test_bf16_autocast_on_cpu_changes_matmul_dtype():
    rt = Runtime(RuntimeConfig(device="cpu", precision="bf16"))
    a = torch.randn(4, 4)
    with rt.autocast():
        assert (a @ a).dtype == torch.bfloat16
    fp32 = Runtime(RuntimeConfig(device="cpu", precision="fp32"))
    with fp32.autocast():
        assert (a @ a).dtype == torch.float32


def test_environment_record_has_versions():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["cpu_count"] == os.cpu_count()
    # the CUDA in use: none without a GPU, whatever the wheel was built for (that is cuda_build)
    assert env["cuda"] == (torch.version.cuda if torch.cuda.is_available() else None)
    assert env["cuda_build"] == torch.version.cuda
    assert env["fasttrain"] == fasttrain.__version__ and env["command"] == sys.argv
    if (Path(fasttrain.__file__).parents[1] / ".git").exists():  # run from a checkout: its commit
        assert env["git_commit"] and len(env["git_commit"].split("+")[0]) == 40
    assert env["cudnn"] == (torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    assert env["python"] == platform.python_version()
    assert (env["gpu"] is None) == (not torch.cuda.is_available())
    assert json.loads(json.dumps(env)) == env  # written as environment.json with every run


@pytest.mark.gpu
def test_cuda_runtime_defaults():
    rt = Runtime(RuntimeConfig(device="cuda"))
    assert rt.compile and rt.channels_last
    assert rt.precision.name in ("bf16", "fp16")
    assert rt.grad_scaler().is_enabled() == (rt.precision.name == "fp16")


@pytest.mark.parametrize(
    "requested, count, current, expected",
    [
        ("auto", 1, 0, "cuda:0"),
        ("auto", 4, 2, "cuda:2"),  # torchrun / torch.cuda.set_device chose the current device
        ("auto", 0, 0, "cpu"),
        ("cuda", 2, 1, "cuda:1"),
        ("cuda:1", 2, 0, "cuda:1"),
        ("cpu", 2, 0, "cpu"),
    ],
)
def test_cuda_device_decision_always_carries_an_index(requested, count, current, expected):
    dev = decide_device(requested, count, current)
    assert dev == torch.device(expected)
    if dev.type == "cuda":
        # torch.cuda.set_per_process_memory_fraction and mem_get_info resolve the device strictly; an
        # index-less torch.device("cuda") raises "Expected a torch.device with a specified index".
        assert dev.index is not None
        assert torch.cuda._utils._get_device_index(dev, optional=False) == dev.index


def test_device_decision_refusals_name_the_field():
    with pytest.raises(ValueError, match="runtime.device: 'cuda' asked for, but CUDA is not available"):
        decide_device("cuda", 0)
    with pytest.raises(ValueError, match=r"runtime.device: 'cuda:3' does not exist \(2 GPUs\)"):
        decide_device("cuda:3", 2)


def test_constructing_a_runtime_changes_no_process_wide_flag():
    before = BackendFlags.current()
    rt = Runtime(RuntimeConfig(device="cpu", deterministic=True, tf32="off"))
    assert BackendFlags.current() == before
    with rt.flags() as applied:
        assert BackendFlags.current() == applied == rt.backend_flags
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.allow_tf32
    assert BackendFlags.current() == before  # restored, whatever ran inside


def test_backend_flags_restore_after_an_error():
    before = BackendFlags.current()
    wanted = BackendFlags(
        cudnn_benchmark=not before.cudnn_benchmark,
        tf32_matmul=not before.tf32_matmul,
        tf32_cudnn=not before.tf32_cudnn,
        deterministic=False,
    )
    with pytest.raises(RuntimeError, match="boom"), backend_flags(wanted):
        assert BackendFlags.current() == wanted
        raise RuntimeError("boom")
    assert BackendFlags.current() == before


def test_cuda_runtime_decides_cudnn_benchmark_and_tf32(monkeypatch):
    # CUDA stubbed: the decision is pure, nothing touches a device.
    _stub_gpus(monkeypatch, [(9, 0)])
    rt = Runtime(RuntimeConfig())
    assert rt.backend_flags == BackendFlags(
        cudnn_benchmark=True, tf32_matmul=True, tf32_cudnn=True, deterministic=False
    )
    exact = Runtime(RuntimeConfig(precision="fp32", tf32="off", deterministic=True))
    assert exact.backend_flags == BackendFlags(
        cudnn_benchmark=False, tf32_matmul=False, tf32_cudnn=False, deterministic=True
    )
    assert "tf32" not in exact.describe() and "fp32 tf32" in Runtime(RuntimeConfig(precision="fp32")).describe()


def test_only_cuda_graph_modes_on_cuda_warm_up_for_two_calls(monkeypatch):
    """reduce-overhead and max-autotune record a CUDA graph at a function's second call (the CIFAR speed run's
    mode): a measurement that times the second call times the recording."""
    _stub_gpus(monkeypatch, [(9, 0)])
    for mode, calls in (("default", 1), ("reduce-overhead", 2), ("max-autotune", 2), ("max-autotune-no-cudagraphs", 1)):
        assert Runtime(RuntimeConfig(compile="on", compile_mode=mode)).warmup_calls == calls, mode
    assert Runtime(RuntimeConfig(compile="off", compile_mode="reduce-overhead")).warmup_calls == 1
    assert Runtime(RuntimeConfig(device="cpu", compile="on", compile_mode="reduce-overhead")).warmup_calls == 1
    assert Runtime(RuntimeConfig(compile="on", compile_mode="max-autotune")).cuda_graphs
    assert not Runtime(RuntimeConfig(compile="on", compile_mode="max-autotune-no-cudagraphs")).cuda_graphs
    assert not Runtime(RuntimeConfig(device="cpu", compile="on", compile_mode="reduce-overhead")).cuda_graphs


def test_what_cuda_graphs_would_overwrite_is_refused_before_a_run(shapes_root, tmp_path, monkeypatch):
    """CUDA graphs hand a call's memory to the next compiled call once no backward is pending: gradients kept
    across micro-batches and a second network's pending backward would read overwritten memory (wrong gradients
    or torch's "accessing tensor output of CUDAGraphs that has been overwritten"). prepare refuses both, naming
    the settings; one network without accumulation (the CIFAR speed run) passes. The CPU twin: the runtime says
    it runs CUDA graphs."""
    from fasttrain.config import Config, ConfigError, apply_overrides
    from fasttrain.data.synthetic import make_paired_dataset
    from fasttrain.prepare import prepare

    monkeypatch.setattr(Runtime, "cuda_graphs", property(lambda self: True))
    base = [f"data.root={shapes_root}", "data.image_size=32", "model.name=smallcnn", "runtime.compile=off"]
    base += ["runtime.compile_mode=reduce-overhead", "train.batch_size=8"]
    assert prepare(apply_overrides(Config(), base)).runtime.cuda_graphs
    with pytest.raises(ConfigError, match=r"train\.accumulation = 2 with runtime\.compile_mode = reduce-overhead"):
        prepare(apply_overrides(Config(), [*base, "train.accumulation=2"]))
    paired = make_paired_dataset(tmp_path / "paired", n=8, size=32)
    p2p = [f"data.root={paired}", "data.format=paired", "data.image_size=32", "model.name=unet", "model.width=8"]
    p2p += ["task.name=pix2pix", "optim.name=adam", "runtime.compile_mode=max-autotune"]
    with pytest.raises(ConfigError, match=r"max-autotune: the pix2pix task cannot run as CUDA graphs"):
        prepare(apply_overrides(Config(), p2p))
    monkeypatch.undo()
    assert prepare(apply_overrides(Config(), p2p)).task.name == "pix2pix"  # no CUDA graphs: nothing to refuse


def _stub_gpus(monkeypatch, capabilities, current=0):
    """A machine with GPUs of these compute capabilities (nothing touches a device); returns set_device's calls."""
    state = {"current": current, "set": []}

    def set_device(d):
        state["set"].append(torch.device(d))
        state["current"] = torch.device(d).index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capabilities[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulation answers on a T4
    return state["set"]


def test_bf16_is_decided_by_the_run_devices_compute_capability(monkeypatch):
    """GPU 0 an H100, GPU 1 a T4: a run on the T4 gets fp16 (bf16 there is emulated), an explicit bf16 is refused;
    torch.cuda.is_bf16_supported() counted emulation and read the current device, so both went wrong."""
    _stub_gpus(monkeypatch, [(9, 0), (7, 5)])
    assert Runtime(RuntimeConfig(device="cuda:1")).precision.name == "fp16"
    with pytest.raises(ValueError, match="runtime.precision: bf16 is not supported"):
        Runtime(RuntimeConfig(device="cuda:1", precision="bf16"))
    assert Runtime(RuntimeConfig(device="cuda:0")).precision.name == "bf16"
    assert [native_bf16(c) for c in ((7, 5), (8, 0), (8, 6), (12, 0))] == [False, True, True, True]


def test_a_cuda_runtime_makes_its_device_the_current_one(monkeypatch):
    """One process on cuda:1: pinned memory, streams and the environment record must use GPU 1, not GPU 0."""
    calls = _stub_gpus(monkeypatch, [(9, 0), (9, 0)])
    Runtime(RuntimeConfig(device="cuda:1"))
    assert calls == [torch.device("cuda", 1)] and torch.cuda.current_device() == 1
    names = {0: "GPU zero", 1: "GPU one"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: type("P", (), {"name": names[i], "total_memory": 2**30})(),
    )
    assert environment(torch.device("cuda", 1))["gpu"] == "GPU one"  # named by the run's device


@pytest.mark.gpu
def test_a_runtime_on_a_gpu_makes_it_current_and_decides_bf16_by_its_capability():
    last = torch.cuda.device_count() - 1
    rt = Runtime(RuntimeConfig(device=f"cuda:{last}"))
    assert torch.cuda.current_device() == last
    assert environment(rt.device)["gpu"] == torch.cuda.get_device_name(last)
    assert (rt.precision.name == "bf16") == (torch.cuda.get_device_capability(last) >= (8, 0))


def test_the_environment_record_never_writes_the_users_git_index(tmp_path):
    """``git status`` refreshes a stale index and writes it under .git/index.lock: every train inside a checkout
    took the user's lock for a moment. The record reads the commit without touching the index."""
    import subprocess

    from fasttrain.rundir import git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    os.utime(tmp_path / "f.txt", (1, 1))  # same content, new stat data: the index is stale
    index = tmp_path / ".git" / "index"
    before = index.stat()
    commit = git_commit(tmp_path)
    after = index.stat()
    assert commit is not None and len(commit) == 40  # clean: the content did not change
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_long_fp32_cpu_job_compiles_and_the_job_is_counted_only_where_compile_could_gain(monkeypatch):
    from fasttrain import runtime as rtmod

    calls = []

    def job():
        calls.append(1)
        return CpuJob(samples=50_000 * 30, forward_flops=3.95e7, threads=2)

    monkeypatch.setattr(rtmod, "_host_cpu_bf16", lambda: (True, "stub"))
    bf16 = Runtime(RuntimeConfig(device="cpu"), cpu_job=job)
    assert not bf16.compile and calls == []  # no gain over bf16: not even a meta-device forward
    fp32 = Runtime(RuntimeConfig(device="cpu", precision="fp32"), cpu_job=job)
    assert fp32.compile and calls == [1] and "repays" in fp32.explain()
    assert fp32.eager_eval  # evaluation calls the uncompiled module: no recompiles on CPU
    model = torch.nn.Linear(2, 2)
    assert fp32.for_eval(model, fp32.compiled(model)) is model


# -- the model profile: FLOPs from the shapes the layers see, compared with torch's FlopCounterMode ---------------
FLOP_TOLERANCE = 0.02
"""The profile counts the products of convolution, linear and attention layers, as FlopCounterMode does
(both leave biases and element-wise work out): on the packaged models they agree to this share."""


@pytest.fixture
def fresh_profiles():
    from fasttrain import runtime as rtmod

    rtmod._profile.cache_clear()  # profiles are cached per process: each test counts its own
    yield rtmod
    rtmod._profile.cache_clear()


def _flop_counter(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return float(counter.get_total_flops())


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("quickstart", []),  # smallcnn
        ("quickstart", ["model.name=mlp"]),
        ("cifar10-speedrun", []),  # speednet
        ("convnet", []),
        ("drawing", []),  # convnet at 128 px
        ("pix2pix", ["data.image_size=64"]),  # unet: transposed convolutions
        ("resnet50-imagenet", ["model.name=resnet18"]),
        ("resnet50-imagenet", []),
    ],
)
def test_the_profiles_flops_agree_with_torchs_flop_counter_on_the_packaged_models(config, overrides, fresh_profiles):
    from fasttrain.config import load_config
    from fasttrain.models import build_model

    cfg = load_config(config, overrides)
    m, d = cfg.model, cfg.data
    profile = fresh_profiles.model_profile(cfg)
    assert profile is not None
    with torch.device("meta"):
        model = build_model(
            m.name,
            in_channels=d.channels,
            num_outputs=m.num_outputs or 2,
            image_size=d.image_size,
            width=m.width,
            dropout=m.dropout,
            pretrained=False,
        )
        expected = _flop_counter(model, torch.zeros(1, d.channels, d.image_size, d.image_size))
    assert profile.forward_flops == pytest.approx(expected, rel=FLOP_TOLERANCE)
    assert profile.param_bytes == sum(p.numel() * 4 for p in model.parameters())


class _Mixed(torch.nn.Module):
    """Layers whose counts are not a plain (out x in) product: attention both ways round, transposed and
    grouped convolutions, a linear layer over a sequence."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(3, 8, 4, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(8, 16, 3, groups=4, stride=2)
        self.seq_first = torch.nn.MultiheadAttention(16, 4)
        self.batch_first = torch.nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=12)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.grouped(self.up(x)).flatten(2)  # N x 16 x L
        t = self.seq_first(t.permute(2, 0, 1), t.permute(2, 0, 1), t.permute(2, 0, 1))[0].transpose(0, 1)
        memory = torch.ones(t.shape[0], 3, 8)
        t = self.batch_first(t, key=memory, value=torch.ones(t.shape[0], 3, 12), need_weights=False)[0]
        return self.head(t)


def test_the_count_of_attention_and_transposed_or_grouped_convolutions_agrees_with_the_flop_counter():
    from fasttrain.runtime import _one_sample

    model, x = _Mixed(), torch.zeros(1, 3, 10, 10)
    expected = _flop_counter(model, x)
    flops, saved = _one_sample(model, 3, 10)
    assert expected > 0 and flops == pytest.approx(expected, rel=FLOP_TOLERANCE)
    assert saved > 0


def test_the_cpu_and_meta_profiles_agree_and_leave_the_generator_and_threads_as_they_were(fresh_profiles, monkeypatch):
    from fasttrain.config import load_config

    rtmod = fresh_profiles
    real = rtmod._one_sample
    devices: list[str] = []

    def spy(model, *args):
        devices.append(next(model.parameters()).device.type)
        return real(model, *args)

    monkeypatch.setattr(rtmod, "_one_sample", spy)
    monkeypatch.setattr(rtmod, "_meta_costs_nothing", lambda: False)  # as in a process without torch._dynamo
    cfg = load_config("quickstart", ["model.dropout=0.5"])  # dropout draws from the CPU generator
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    on_cpu = rtmod.model_profile(cfg)
    assert devices == ["cpu"] and torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads  # one thread for the sample, the run's count restored

    def meta_profile(**patches):
        rtmod._profile.cache_clear()
        devices.clear()
        with monkeypatch.context() as mp:
            for name, value in patches.items():
                mp.setattr(rtmod, name, value)
            return rtmod.model_profile(cfg)

    assert meta_profile(_meta_costs_nothing=lambda: True) == on_cpu and devices == ["meta"]
    # Beyond the bounds, the CPU pass stops and the meta device counts (smallcnn: 10 MFLOPs, 0.25 MB of
    # weights, 0.6 MB saved).
    assert meta_profile(PROFILE_CPU_FLOPS=1e6) == on_cpu and devices == ["cpu", "meta"]
    assert meta_profile(PROFILE_CPU_BYTES=400_000) == on_cpu and devices == ["cpu", "meta"]
    assert meta_profile(PROFILE_CPU_BYTES=100_000) == on_cpu and devices == ["meta"]  # the weights alone: no try
    assert on_cpu is not None and on_cpu.forward_flops > 0 and on_cpu.saved_bytes > on_cpu.param_bytes > 0


def test_trained_samples_caps_each_epoch_at_max_steps_and_the_run_at_total_steps():
    """train.max_steps cuts every epoch, not the run: 3 epochs of 10 batches capped at 4 steps train 12 batches
    (the old count said 4, and autotune's CPU shortcut took a 3-epoch smoke job for a third of its length)."""
    from fasttrain.config import TrainConfig
    from fasttrain.runtime import trained_samples

    assert trained_samples(TrainConfig(epochs=3, batch_size=8), 85) == 3 * 10 * 8  # whole batches only
    assert trained_samples(TrainConfig(epochs=3, batch_size=8, max_steps=4), 85) == 3 * 4 * 8
    assert trained_samples(TrainConfig(epochs=3, batch_size=8, total_steps=25), 85) == 25 * 8
    assert trained_samples(TrainConfig(epochs=1, batch_size=8, total_steps=25), 85) == 25 * 8  # epochs fit the plan


@pytest.mark.parametrize(
    "requested, count, expected",
    [("cuda:0", 2, "cuda:1"), ("auto", 2, "cuda:1"), ("cuda", 2, "cuda:1"), ("cpu", 2, "cpu"), ("auto", 0, "auto")],
)
def test_under_torchrun_a_cuda_device_is_the_processs_local_rank(requested, count, expected):
    """Rank 1 of a config naming cuda:0 (autotune built its runtimes from the config) sat on rank 0's GPU."""
    from fasttrain.runtime import process_device

    assert process_device(requested, 1, count) == expected


def test_runtime_for_under_torchrun_takes_local_ranks_device(monkeypatch):
    from fasttrain import runtime as R
    from fasttrain.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = []
    monkeypatch.setattr(R, "Runtime", lambda rcfg, **kw: seen.append(rcfg.device))
    asked = []
    monkeypatch.setattr(R, "process_device", lambda requested, rank, count: asked.append((requested, rank)) or "cpu")
    R.runtime_for(load_config(None, ["runtime.device=cuda:0"]))
    assert asked == [("cuda:0", 1)] and seen == ["cpu"]  # the process's device, not the config's
    R.runtime_for(load_config(None, []), device="cuda:3")  # a caller's own (prediction's --device): as given
    assert len(asked) == 1 and seen[-1] == "cuda:3"


def test_each_rank_seed_is_its_own_and_stable():
    from fasttrain.runtime import rank_seed

    assert rank_seed(1, 0) != rank_seed(0, 1)  # seed + rank would give both 1
    assert rank_seed(0, 1) == rank_seed(0, 1) and rank_seed(0, 1, 8) != rank_seed(0, 1)
    assert len({rank_seed(s, r) for s in range(8) for r in range(8)}) == 64
    assert 0 <= rank_seed(-3, 2) < 2**32
