"""Tar shards against files (issue 21's shard targets): the loader alone over CIFAR-10 JPEGs from ``fasttrain pack``
shards and from the extracted files (both in the page cache), on the torch loader and DALI (CPU-only mode without
CUDA); and ``pack`` itself on the whole CIFAR-10 tree.

Data: ``cifar10.tar`` from ``$FASTTRAIN_SHARED_DATA`` or ``../shared/data``, extracted once into the benchmark
cache and packed once beside it (skipped when absent). A round is ``SHARD_STEPS`` batches of ``SHARD_BATCH``
32 px images drawn until the device has them (the loader's ceiling); ``extra_info.source`` says files or shards
and ``workload`` pairs the two rows. The targets: shards >= 1.0x files per backend; pack <= 60 s.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from benchutil import bench_config, cache_root, find_tar, skip_unavailable_backend
from fasttrain import timing
from fasttrain.prepare import prepare

pytestmark = pytest.mark.benchmark(group="shards")

SHARD_BATCH = 256
SHARD_STEPS = {"cpu": 40, "gpu": 100}
"""Batches per round: enough for a round to outlast a worker's start and the pre-check's noise."""


@pytest.fixture(scope="session")
def cifar_files(pytestconfig) -> Path:
    """CIFAR-10's JPEG tree (train/, test/), extracted once into the benchmark cache."""
    tar_path = find_tar("cifar10.tar")
    if tar_path is None:
        pytest.skip("cifar10.tar not found in ../shared/data")
    dest = cache_root(pytestconfig) / "cifar10"
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10.", dir=dest.parent))
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / "cifar10").rename(dest)
        shutil.rmtree(tmp)
    return dest


@pytest.fixture(scope="session")
def cifar_shards(pytestconfig, cifar_files) -> Path:
    """``fasttrain pack`` of :func:`cifar_files` (default shard size), written once."""
    from fasttrain.config import DataConfig
    from fasttrain.data.pack import pack

    dest = cache_root(pytestconfig) / "cifar10-shards"
    if not dest.is_dir():
        pack(DataConfig(root=str(cifar_files)), dest)
    return dest


@pytest.mark.parametrize("source", ["files", "shards"])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_shard_loader(benchmark, measure, size, device, cifar_files, cifar_shards, backend, source):
    skip_unavailable_backend(backend)
    root = cifar_shards if source == "shards" else cifar_files
    cfg = bench_config(size, model="smallcnn", batch_size=SHARD_BATCH, loader=backend, data_root=root)
    prep = prepare(cfg)
    steps = SHARD_STEPS[size.name]
    loader = prep.task.make_loader(prep.source.train, train=True, batch_size=SHARD_BATCH, backend=prep.backend)
    try:
        batches = timing.cycle_batches(loader)
        measure(
            lambda: timing.run_steps(lambda: len(next(batches)), steps, device),
            samples_per_round=SHARD_BATCH * steps,
            flags=prep.runtime.backend_flags,
            kind="loader",
            model=None,
            batch_size=SHARD_BATCH,
            precision=prep.runtime.precision.name,
            backend=prep.backend,
            source=source,
            workers=cfg.data.num_workers,
            dali_threads=cfg.data.num_dali_threads,
            images=len(prep.source.train),
            image_size=cfg.data.image_size,
            workload=f"cifar10-{backend}-b{SHARD_BATCH}",
        )
    finally:
        loader.close()


def test_pack_cifar10(benchmark, cifar_files, tmp_path):
    """One pack of the whole tree (50,000 train + 10,000 test JPEGs) into a new folder, timed once."""
    from fasttrain.config import DataConfig
    from fasttrain.data.pack import pack

    outs = iter(range(100))

    def once() -> None:
        pack(DataConfig(root=str(cifar_files)), tmp_path / f"out-{next(outs)}")

    start = time.perf_counter()
    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    report_dir = tmp_path / "out-0"
    benchmark.extra_info.update(
        seconds=time.perf_counter() - start,
        images=sum(1 for _ in cifar_files.rglob("*.jpg")),
        shard_bytes=sum(p.stat().st_size for p in report_dir.glob("*.tar")),
    )
