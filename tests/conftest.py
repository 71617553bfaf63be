"""Shared fixtures: small generated datasets, the real datasets from ../shared/data when present, markers."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (CI and sessions have it), or $FASTTRAIN_SHARED_DATA."""
    for cand in (os.environ.get("FASTTRAIN_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def extract_shared(name: str, dest: Path, members_filter=None) -> Path:
    """Extract ``name``.tar from ../shared/data into ``dest`` once; skip the test when it is absent."""
    d = shared_data_dir()
    tar = d / f"{name}.tar" if d else None
    if tar is None or not tar.is_file():
        pytest.skip(f"{name}.tar not found in ../shared/data")
    out = dest / name
    if not out.is_dir():
        tmp = dest / f".{name}.partial"
        with tarfile.open(tar) as tf:
            members = [m for m in tf.getmembers() if members_filter is None or members_filter(m.name)]
            tf.extractall(tmp, members=members, filter="data")
        inner = [p for p in tmp.iterdir() if p.is_dir()]
        (inner[0] if len(inner) == 1 else tmp).rename(out)
    return out


@pytest.fixture(scope="session")
def shared_extractor():
    """:func:`extract_shared` for tests (importing ``conftest`` clashes with benchmarks/conftest.py)."""
    return extract_shared


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def digits_root(shared_cache) -> Path:
    return extract_shared("sklearn_digits", shared_cache)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small coloured-shapes ImageFolder tree (train/ and val/), generated once per session."""
    from fasttrain.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(
        tmp_path_factory.mktemp("data") / "shapes",
        train_per_class=150,
        val_per_class=20,
        size=32,
        shapes=("circle", "square", "triangle"),
    )


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG states, whatever ran before it: tests pass alone and in any order."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the demo dataset and autotune caches out of the user's home during tests."""
    cache = tmp_path_factory.getbasetemp() / "fasttrain-cache"
    monkeypatch.setenv("FASTTRAIN_CACHE", str(cache))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
