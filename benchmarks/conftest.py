"""Fixtures of the pytest-benchmark suites: parameter sets, benchmark data, environment, one ``measure`` helper.

Run explicitly (the default test run only collects ``tests/``)::

    pytest benchmarks/ --bench-size=cpu                       # about 30-40 s on 2 cores
    pytest benchmarks/ --bench-size=gpu --benchmark-json=out.json

Every benchmark round runs a fixed number of steps and ends with a device synchronize (``timing.run_steps``),
so pytest-benchmark's clock reads finished work and "time per round" is "time per N steps". samples/s,
peak memory and the environment go into ``benchmark.extra_info``; ``tools/bench_summary.py`` turns the JSON
into a table and plots.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchutil import SIZES, BenchSize, cache_root, extract_imagenette, find_tar, generate_imagenet_like
from fasttrain import memory
from fasttrain.runtime import BackendFlags, backend_flags


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=("auto", "cpu", "gpu"),
        default=os.environ.get("FASTTRAIN_BENCH_SIZE", "auto"),
        help="benchmark parameter set: cpu (tiny, ~40 s on 2 cores), gpu (full), auto (gpu when CUDA is "
        "present); env FASTTRAIN_BENCH_SIZE",
    )


def bench_size(config: pytest.Config) -> BenchSize:
    name = config.getoption("--bench-size")
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    return SIZES[name]


def pytest_report_header(config: pytest.Config) -> str:
    s = bench_size(config)
    return f"fasttrain bench size: {s.name} (steps/round {s.steps_per_round}, rounds {s.rounds})"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parameters depend on --bench-size; ids stay stable, since baselines are matched by test name."""
    s = bench_size(metafunc.config)
    if "model_case" in metafunc.fixturenames:
        cases = [(m, b, p) for m in s.models for b in s.batch_sizes for p in s.precisions]
        metafunc.parametrize("model_case", cases, ids=[f"{m}-b{b}-{p}" for m, b, p in cases])
    if "naive_case" in metafunc.fixturenames:
        cases = [(m, b) for m in s.models for b in s.batch_sizes]
        metafunc.parametrize("naive_case", cases, ids=[f"{m}-b{b}" for m, b in cases])
    if "e2e_model" in metafunc.fixturenames:
        metafunc.parametrize("e2e_model", s.e2e_models)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if bench_size(config).name == "gpu" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="--bench-size=gpu needs a CUDA device")
        for item in items:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    from fasttrain.runtime import environment

    machine_info["fasttrain"] = {**environment(), "bench_size": bench_size(config).name}


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> BenchSize:
    return bench_size(pytestconfig)


@pytest.fixture(scope="session")
def env(size: BenchSize) -> dict[str, Any]:
    from fasttrain.runtime import environment

    if size.torch_threads:
        torch.set_num_threads(size.torch_threads)
    return {**environment(), "torch_threads": torch.get_num_threads()}


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_device():
    """Each benchmark starts clean: no compiled graphs or cached blocks left over from the one before."""
    yield
    gc.collect()
    torch._dynamo.reset()  # otherwise recompiles across models hit the cache limit and fall back to eager
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def measure(benchmark, env, size, device) -> Callable[..., dict[str, Any]]:
    """``measure(round_fn, samples_per_round=N, flags=F, **info)``: time rounds with ``benchmark.pedantic`` under
    the backend flags ``F`` (cuDNN benchmark, TF32, determinism: set for this case, whatever ran before, and put
    back afterwards), and record samples/s (from the median round), peak memory, the flags, the
    batch/model/precision/backend and the environment. ``after``: called once the rounds ran, its figures
    recorded too (computed from what the rounds saw), in the JSON and in the per-case log."""

    def run(
        round_fn: Callable[[], int],
        *,
        samples_per_round: int,
        flags: BackendFlags,
        after: Callable[[], dict[str, Any]] | None = None,
        **info: Any,
    ) -> dict[str, Any]:
        memory.reset_peak_memory(device)
        with backend_flags(flags):
            benchmark.pedantic(round_fn, rounds=size.rounds, iterations=1, warmup_rounds=size.warmup_rounds)
        stats = benchmark.stats.stats if benchmark.stats is not None else None  # None with --benchmark-disable
        median = stats.median if stats is not None else None
        benchmark.extra_info.update(
            samples_per_s=samples_per_round / median if median else None,
            samples_per_round=samples_per_round,
            steps_per_round=size.steps_per_round,
            bench_size=size.name,
            device=str(device),
            **memory.peak_memory(device),
            flags=dataclasses.asdict(flags),
            **info,
            **(after() if after is not None else {}),
            env=env,
        )
        log = os.environ.get("FASTTRAIN_BENCH_LOG")
        if log:  # one line per case as it finishes: a run cut off (a lent machine's time limit) keeps its figures
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"name": benchmark.fullname, **benchmark.extra_info}, default=str) + "\n")
        return dict(benchmark.extra_info)

    return run


@pytest.fixture(scope="session")
def data_root(pytestconfig: pytest.Config, size: BenchSize) -> Path:
    """An ImageFolder root (train/, val/) of real JPEGs: $FASTTRAIN_BENCH_DATA, else Imagenette from the
    shared data folder (extracted once into the pytest cache), else generated ImageNet-size JPEGs."""
    given = os.environ.get("FASTTRAIN_BENCH_DATA")
    if given:
        return Path(given)
    cache = cache_root(pytestconfig)
    tar_path = find_tar("imagenette224.tar")
    if tar_path is not None:
        tag = "all" if not size.train_per_class else f"{size.train_per_class}-{size.val_per_class}"
        dest = cache / f"imagenette224-{tag}"
        if not dest.is_dir():
            extract_imagenette(tar_path, dest, size.train_per_class, size.val_per_class)
        return dest
    classes = 10
    n_train = size.train_per_class * classes if size.train_per_class else 8000
    n_val = max(size.val_per_class * classes, classes)
    dest = cache / f"imagenet-like-{n_train}-{n_val}"
    if not dest.is_dir():
        generate_imagenet_like(dest, n_train, n_val, classes)
    return dest
