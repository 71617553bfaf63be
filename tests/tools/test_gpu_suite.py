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
