import json
import os
import platform

import pytest
import torch

from fasttrain.config import RuntimeConfig
from fasttrain.runtime import Runtime, decide_precision, environment


@pytest.mark.parametrize("requested, device, bf16, name, dtype, scaler", [
    ("auto", "cuda", True, "bf16", torch.bfloat16, False),
    ("auto", "cuda", False, "fp16", torch.float16, True),
    ("auto", "cpu", False, "fp32", None, False),
    ("fp32", "cuda", True, "fp32", None, False),
    ("bf16", "cpu", False, "bf16", torch.bfloat16, False),
    ("fp16", "cuda", True, "fp16", torch.float16, True),
])
def test_precision_policy(requested, device, bf16, name, dtype, scaler):
    p = decide_precision(requested, device, bf16)
    assert (p.name, p.autocast_dtype, p.use_scaler) == (name, dtype, scaler)
    assert p.input_dtype == (dtype or torch.float32)


def test_precision_refusals_name_the_field():
    with pytest.raises(ValueError, match="runtime.precision: bf16 is not supported"):
        decide_precision("bf16", "cuda", False)
    with pytest.raises(ValueError, match="runtime.precision: fp16 needs a CUDA device"):
        decide_precision("fp16", "cpu", False)


def test_cpu_runtime_defaults():
    rt = Runtime(RuntimeConfig(device="cpu"))
    assert rt.device.type == "cpu"
    assert rt.precision.name == "fp32"
    assert rt.compile is False and rt.channels_last is False  # auto: off on CPU
    assert not rt.grad_scaler().is_enabled()
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
    fp32 = Runtime(RuntimeConfig(device="cpu"))
    with fp32.autocast():
        assert (a @ a).dtype == torch.float32


def test_environment_record_has_versions():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda and env["cpu_count"] == os.cpu_count()
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
