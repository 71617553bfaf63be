"""Each loader backend alone over real JPEGs: batches drawn until the device has them (the loader's ceiling).

torch, dali and cache are fasttrain's backends built as ``fasttrain train`` builds them; naive is the
torchvision ImageFolder + PIL DataLoader of a hand-written script, on the same files, batch and workers.
``test_task_loader``: the same backends for the other workloads, on generated data: regress (128 px grayscale
drawing canvases, resized whole) and pix2pix (256 px image pairs; 64 px in the cpu set), training batches.
"""

from __future__ import annotations

import pytest

from benchutil import bench_config, cache_root, epoch_batch_times, naive_loader, skip_unavailable_backend
from fasttrain import timing
from fasttrain.prepare import prepare
from fasttrain.runtime import BackendFlags

pytestmark = pytest.mark.benchmark(group="loader")


def _measure_training_loader(measure, size, device, cfg, batch_size: int, *, workload: str) -> None:
    """Training batches of ``cfg``'s loader, built as ``fasttrain train`` builds it, drawn until the device has
    them."""
    prep = prepare(cfg)
    loader = prep.task.make_loader(prep.source.train, train=True, batch_size=batch_size, backend=prep.backend)
    try:
        batches = timing.cycle_batches(loader)
        measure(
            lambda: timing.run_steps(lambda: len(next(batches)), size.steps_per_round, device),
            samples_per_round=batch_size * size.steps_per_round,
            flags=prep.runtime.backend_flags,
            kind="loader",
            model=None,
            batch_size=batch_size,
            precision=prep.runtime.precision.name,
            backend=prep.backend,
            workers=cfg.data.num_workers,
            dali_threads=cfg.data.num_dali_threads,
            images=len(prep.source.train),
            image_size=size.image_size,
            workload=workload,
        )
    finally:
        loader.close()


@pytest.mark.parametrize("backend", ["torch", "dali", "cache"])
def test_loader(benchmark, measure, size, device, data_root, backend):
    skip_unavailable_backend(backend)
    batch_size = size.loader_batch_size
    cfg = bench_config(size, model="smallcnn", batch_size=batch_size, loader=backend, data_root=data_root)
    _measure_training_loader(measure, size, device, cfg, batch_size, workload=f"loader-b{batch_size}")


@pytest.fixture(scope="session")
def task_roots(pytestconfig, size):
    """Generated data of the regress and pix2pix workloads, written once into the benchmark cache."""
    from fasttrain.data.synthetic import make_drawing_dataset, make_paired_dataset

    cache = cache_root(pytestconfig)
    small = size.name == "cpu"
    sessions, pairs, side = (20, 160, 64) if small else (400, 2000, 256)
    drawing = cache / f"drawing-{sessions}x8-128"
    if not drawing.is_dir():
        make_drawing_dataset(drawing, sessions=sessions, steps=8, size=128)
    paired = cache / f"paired-{pairs}-{side}"
    if not paired.is_dir():
        make_paired_dataset(paired, n=pairs, size=side)
    return {"regress": drawing, "pix2pix": paired}


TASK_SETTINGS = {
    "regress": [
        "data.format=drawing",
        "data.channels=1",
        "data.mean=[0.5]",
        "data.std=[0.5]",
        "task.name=regress",
        "model.name=convnet",
    ],
    "pix2pix": ["data.format=paired", "task.name=pix2pix", "model.name=unet", "optim.name=adam"],
}


@pytest.mark.parametrize("backend", ["torch", "dali", "cache"])
@pytest.mark.parametrize("task", ["regress", "pix2pix"])
def test_task_loader(benchmark, measure, size, device, task_roots, task, backend):
    from fasttrain.config import apply_overrides

    skip_unavailable_backend(backend)
    batch_size = size.loader_batch_size
    cfg = bench_config(size, model="convnet", batch_size=batch_size, loader=backend, data_root=task_roots[task])
    cfg = apply_overrides(cfg, TASK_SETTINGS[task])
    _measure_training_loader(measure, size, device, cfg, batch_size, workload=f"{task}-loader-b{batch_size}")


def test_loader_naive(benchmark, measure, size, device, data_root):
    from fasttrain.config import default_workers

    batch_size, workers = size.loader_batch_size, default_workers()
    loader = naive_loader(data_root, image_size=size.image_size, batch_size=batch_size, workers=workers, device=device)
    batches = timing.cycle_batches(loader)

    def step() -> int:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        return images.shape[0]

    measure(
        lambda: timing.run_steps(step, size.steps_per_round, device),
        samples_per_round=batch_size * size.steps_per_round,
        flags=BackendFlags.torch_defaults(),
        kind="loader",
        model=None,
        batch_size=batch_size,
        precision="fp32",
        backend="naive",
        workers=workers,
        images=len(loader.dataset),
        image_size=size.image_size,
        workload=f"loader-b{batch_size}",
    )


def test_dali_epoch_boundary_gap(benchmark, measure, size, device, data_root):
    """The wait for an epoch's first batch against a steady-state batch (DALI; CPU-only mode without CUDA).

    A round runs ``EPOCHS`` whole epochs of the training loader, timing each ``next()``. ``extra_info``:
    ``epoch_gap_s`` (median over the round's epoch boundaries of the time from the last batch of epoch e to the
    first of e+1), ``steady_batch_s`` (median of every other batch), and ``gap_ratio`` (their quotient: 1 means
    the boundary costs no more than any batch; a pipeline rebuilt per epoch costs its build and an empty
    prefetch queue there).
    """
    import statistics

    skip_unavailable_backend("dali")
    epochs = 4
    batch_size = size.loader_batch_size
    cfg = bench_config(size, model="smallcnn", batch_size=batch_size, loader="dali", data_root=data_root)
    prep = prepare(cfg)
    loader = prep.task.make_loader(prep.source.train, train=True, batch_size=batch_size, backend="dali")
    gaps: list[float] = []
    steady: list[float] = []
    state = {"epoch": 0}

    def one_round() -> int:
        # Every batch waits for the device (a synchronize per batch, and so per round): the times are of batches
        # ready, not of work enqueued. The first batch's time runs from the previous epoch's last batch.
        n, last = 0, None
        for _ in range(epochs):
            loader.set_epoch(state["epoch"])
            state["epoch"] += 1
            got, times, last = epoch_batch_times(loader, prep.runtime.synchronize, since=last)
            gaps.append(times[0])
            steady.extend(times[1:])
            n += got
        return n

    def figures() -> dict[str, float]:
        gap, step = statistics.median(gaps), statistics.median(steady)
        return {"epoch_gap_s": gap, "steady_batch_s": step, "gap_ratio": gap / step, "epochs_per_round": epochs}

    try:
        one_round()  # warm-up: the first epoch's start (pipeline build, first decode) is not a boundary
        gaps.clear()
        steady.clear()
        info = measure(
            one_round,
            samples_per_round=epochs * len(loader) * batch_size,
            flags=prep.runtime.backend_flags,
            kind="loader-epoch-gap",
            model=None,
            batch_size=batch_size,
            precision=prep.runtime.precision.name,
            backend="dali",
            dali_threads=cfg.data.num_dali_threads,
            images=len(prep.source.train),
            image_size=size.image_size,
            workload=f"epoch-gap-b{batch_size}",
            batches_per_epoch=len(loader),
            after=figures,  # in the per-case log too, which a stage cut off keeps
        )
    finally:
        loader.close()
    gap, step = info["epoch_gap_s"], info["steady_batch_s"]
    print(
        f"\nDALI epoch boundary: {gap * 1e3:.2f} ms to the first batch vs {step * 1e3:.2f} ms per steady batch "
        f"(x{gap / step:.2f}; {len(loader)} batches/epoch, {len(gaps)} boundaries)"
    )
    assert info["backend"] == "dali"
