"""tools/gpu_suite.sh: the parts that run without a GPU (FASTTRAIN_SUITE_CPU=1 is its dry-run switch)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


@pytest.mark.slow  # eight make-data processes and their imports
def test_a_relative_bench_cache_is_the_callers_and_the_merge_finds_it(tmp_path):
    """The merge cds into each shard: with FASTTRAIN_BENCH_CACHE=rel-cache it moved files to a rel-cache/merge
    inside every shard, and the data root stayed empty."""
    env = {
        **os.environ,
        "FASTTRAIN_SUITE_CPU": "1",
        "FASTTRAIN_BENCH_CACHE": "rel-cache",
        "FASTTRAIN_SUITE_SHARED": str(tmp_path / "no-shared-data"),
        "FASTTRAIN_SUITE_PER_SHARD": "80",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FASTTRAIN_BENCH_DATA", None)
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_suite.sh"), "out", "data"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path / "rel-cache" / "imagenet-like"
    assert f"data root: {root}" in (tmp_path / "out" / "suite.log").read_text()
    assert len(list(root.rglob("*.jpg"))) == 8 * (80 + 10)  # 8 shards of 80 training and 10 validation images
    assert not (tmp_path / "rel-cache" / "shards").exists()


@pytest.mark.slow  # three short trainings in fresh processes
def test_the_speedrun_stage_extracts_a_gzipped_cifar_tar_trains_three_times_and_judges_the_runs(tmp_path):
    """The stage a lent GPU runs for issue 22 (dry run on the CPU, a small class-folder tree in CIFAR's layout,
    gzipped as tools/device_cifar.sh packs it): extracted once, two runs, their figures in targets.md."""
    import tarfile
    import tomllib

    from fasttrain.data.synthetic import make_shapes_dataset

    src = make_shapes_dataset(tmp_path / "src" / "cifar10", train_per_class=12, val_per_class=4, size=32)
    (src / "val").rename(src / "test")
    with tarfile.open(tmp_path / "cifar10.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar10")
    env = {
        **os.environ,
        "FASTTRAIN_SUITE_CPU": "1",
        "FASTTRAIN_BENCH_CACHE": str(tmp_path / "cache"),
        "FASTTRAIN_SUITE_SHARED": str(tmp_path / "no-shared-data"),
        "FASTTRAIN_SUITE_CIFAR": "cifar10.tar.gz",  # relative: the caller's folder, not the repository's
        "FASTTRAIN_SUITE_SET": "train.batch_size=8 train.epochs=2 train.eval_batch_size=8 data.std=[0.25,0.25,0.25]",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_suite.sh"), str(tmp_path / "out"), "speedrun"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "out" / "suite.log").read_text()
    assert done.returncode == 0, log + done.stderr[-3000:]
    assert "speedrun-1: rc=0" in log and "speedrun-2: rc=0" in log and "speedrun-3: rc=0" in log
    assert len(list((tmp_path / "cache" / "cifar10" / "train").rglob("*.png"))) == 4 * 12  # this tar's tree
    assert not list((tmp_path / "cache").glob(".cifar10.*"))  # extracted aside, then renamed
    targets = (tmp_path / "out" / "targets.md").read_text()
    for n in (1, 2, 3):
        (run,) = (tmp_path / "out" / f"speedrun-{n}").iterdir()
        assert (run / "metrics.jsonl").is_file()
        assert tomllib.loads((run / "config.toml").read_text())["data"]["std"] == [0.25, 0.25, 0.25]
        assert f"run {n}{' (TORCH_WARM_POOL=0)' if n == 3 else ''}: final " in targets
    assert "| cifar10-speedrun whole run, decode included | <= 15 s | run 1: final" in targets
    probe = (tmp_path / "out" / "speedrun-imports.txt").read_text()
    assert "startup probe: imports" in probe and "| fasttrain.engine" in probe  # and -X importtime's table
