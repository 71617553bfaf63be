"""Each loader backend alone over real JPEGs: batches drawn until the device has them (the loader's ceiling).

torch, dali and cache are fasttrain's backends built as ``fasttrain train`` builds them; naive is the
torchvision ImageFolder + PIL DataLoader of a hand-written script, on the same files, batch and workers.
"""

from __future__ import annotations

import pytest

from benchutil import bench_config, naive_loader, skip_unavailable_backend
from fasttrain import bench
from fasttrain.prepare import prepare
from fasttrain.runtime import BackendFlags

pytestmark = pytest.mark.benchmark(group="loader")


@pytest.mark.parametrize("backend", ["torch", "dali", "cache"])
def test_loader(benchmark, measure, size, device, data_root, backend):
    skip_unavailable_backend(backend)
    batch_size = size.loader_batch_size
    cfg = bench_config(size, model="smallcnn", batch_size=batch_size, loader=backend, data_root=data_root)
    prep = prepare(cfg)
    loader = prep.task.make_loader(prep.source.train, train=True, batch_size=batch_size, backend=prep.backend)
    try:
        batches = bench.cycle_batches(loader)
        measure(
            lambda: bench.run_steps(lambda: len(next(batches)), size.steps_per_round, device),
            samples_per_round=batch_size * size.steps_per_round,
            flags=prep.runtime.backend_flags,
            kind="loader", model=None, batch_size=batch_size, precision=prep.runtime.precision.name,
            backend=prep.backend, workers=cfg.data.num_workers, dali_threads=cfg.data.num_dali_threads,
            images=len(prep.source.train), image_size=size.image_size, workload=f"loader-b{batch_size}",
        )
    finally:
        loader.close()


def test_loader_naive(benchmark, measure, size, device, data_root):
    from fasttrain.config import default_workers

    batch_size, workers = size.loader_batch_size, default_workers()
    loader = naive_loader(data_root, image_size=size.image_size, batch_size=batch_size, workers=workers,
                          device=device)
    batches = bench.cycle_batches(loader)

    def step() -> int:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        return images.shape[0]

    measure(
        lambda: bench.run_steps(step, size.steps_per_round, device),
        samples_per_round=batch_size * size.steps_per_round,
        flags=BackendFlags.torch_defaults(),
        kind="loader", model=None, batch_size=batch_size, precision="fp32", backend="naive", workers=workers,
        images=len(loader.dataset), image_size=size.image_size, workload=f"loader-b{batch_size}",
    )
