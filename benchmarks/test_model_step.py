"""The train step alone on synthetic tensors already on the device: the ceiling no loader can beat.

fasttrain's step (the task's ``train_step``, compiled and channels_last where the runtime decides so, in the
requested precision) against the naive script's step (fp32, NCHW, eager, ``loss.item()`` every step) on the
same model and batch size.
"""

from __future__ import annotations

import pytest
import torch

from benchutil import NaiveScript, bench_config, skip_on_oom
from fasttrain import timing
from fasttrain.runtime import BackendFlags, runtime_for
from fasttrain.tasks import make_task
from fasttrain.timing import train_step_fn

pytestmark = pytest.mark.benchmark(group="model_step")


def test_model_step(benchmark, measure, size, device, model_case):
    model, batch_size, precision = model_case
    cfg = bench_config(size, model=model, batch_size=batch_size, precision=precision, num_outputs=size.num_classes)
    try:
        runtime = runtime_for(cfg)
    except ValueError as e:  # e.g. bf16 asked for on a GPU without it
        pytest.skip(str(e))
    task = make_task(cfg, runtime, None)
    state = task.build_state()
    batch = task.synthetic_batch(batch_size, task.input_spec(), train=True)
    step = train_step_fn(task, state, lambda: batch, accumulation=1)  # the step fasttrain bench and autotune time

    skip_on_oom(
        lambda: measure(
            lambda: timing.run_steps(step, size.steps_per_round, device),
            samples_per_round=batch_size * size.steps_per_round,
            flags=runtime.backend_flags,
            kind="model_step",
            model=model,
            batch_size=batch_size,
            precision=runtime.precision.name,
            backend="synthetic",
            compile=runtime.compile,
            channels_last=runtime.channels_last,
            workload=f"{model}-b{batch_size}",
        ),
        f"{model} batch {batch_size}",
    )


def test_model_step_naive(benchmark, measure, size, device, naive_case):
    model, batch_size = naive_case
    script = NaiveScript(
        model, num_classes=size.num_classes, image_size=size.image_size, width=size.model_width, device=device
    )
    images = torch.randn(batch_size, 3, size.image_size, size.image_size, device=device)
    labels = torch.randint(0, size.num_classes, (batch_size,), device=device)

    skip_on_oom(
        lambda: measure(
            lambda: timing.run_steps(lambda: script.step(images, labels), size.steps_per_round, device),
            samples_per_round=batch_size * size.steps_per_round,
            flags=BackendFlags.torch_defaults(),  # a script that sets nothing
            kind="model_step",
            model=model,
            batch_size=batch_size,
            precision="fp32",
            backend="naive",
            compile=False,
            channels_last=False,
            workload=f"{model}-b{batch_size}",
        ),
        f"naive {model} batch {batch_size}",
    )
