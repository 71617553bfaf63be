"""Loader + train step as ``fasttrain train`` runs them, against the naive hand-written script in the same run.

Same files, model, batch size and worker count; the naive script is fp32, NCHW, eager, ImageFolder + PIL
DataLoader with a ``loss.item()`` per step. ``tools/bench_summary.py`` prints fasttrain / naive as a ratio.
"""

from __future__ import annotations

import pytest

from benchutil import NaiveScript, bench_config, naive_loader, skip_on_oom, skip_unavailable_backend
from fasttrain import timing
from fasttrain.prepare import prepare
from fasttrain.runtime import BackendFlags
from fasttrain.timing import train_step_fn

pytestmark = pytest.mark.benchmark(group="end_to_end")


@pytest.mark.parametrize("backend", ["torch", "dali", "cache"])
def test_end_to_end(benchmark, measure, size, device, data_root, e2e_model, backend):
    skip_unavailable_backend(backend)
    batch_size = size.e2e_batch_size
    cfg = bench_config(size, model=e2e_model, batch_size=batch_size, loader=backend, data_root=data_root)
    prep = prepare(cfg)
    task = prep.task
    state = task.build_state()
    loader = task.make_loader(prep.source.train, train=True, batch_size=batch_size, backend=prep.backend)
    batches = timing.cycle_batches(loader)
    step = train_step_fn(task, state, lambda: next(batches), accumulation=1)  # as fasttrain bench times it

    try:
        skip_on_oom(
            lambda: measure(
                lambda: timing.run_steps(step, size.steps_per_round, device),
                samples_per_round=batch_size * size.steps_per_round,
                flags=prep.runtime.backend_flags,
                kind="end_to_end",
                model=e2e_model,
                batch_size=batch_size,
                precision=prep.runtime.precision.name,
                backend=prep.backend,
                compile=prep.runtime.compile,
                channels_last=prep.runtime.channels_last,
                workers=cfg.data.num_workers,
                workload=f"{e2e_model}-b{batch_size}",
            ),
            f"{e2e_model} batch {batch_size}",
        )
    finally:
        loader.close()


def test_end_to_end_naive(benchmark, measure, size, device, data_root, e2e_model):
    from fasttrain.config import default_workers

    batch_size, workers = size.e2e_batch_size, default_workers()
    loader = naive_loader(data_root, image_size=size.image_size, batch_size=batch_size, workers=workers, device=device)
    script = NaiveScript(
        e2e_model,
        num_classes=len(loader.dataset.classes),
        image_size=size.image_size,
        width=size.model_width,
        device=device,
    )
    batches = timing.cycle_batches(loader)

    def step() -> int:
        images, labels = next(batches)
        return script.step(images, labels)

    skip_on_oom(
        lambda: measure(
            lambda: timing.run_steps(step, size.steps_per_round, device),
            samples_per_round=batch_size * size.steps_per_round,
            flags=BackendFlags.torch_defaults(),  # a script that sets nothing
            kind="end_to_end",
            model=e2e_model,
            batch_size=batch_size,
            precision="fp32",
            backend="naive",
            compile=False,
            channels_last=False,
            workers=workers,
            workload=f"{e2e_model}-b{batch_size}",
        ),
        f"naive {e2e_model} batch {batch_size}",
    )
