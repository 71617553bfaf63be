"""Helpers of the benchmark suites: parameter sets, configs, benchmark data, the naive baseline.

Kept out of conftest.py so test modules import them by name (``from benchutil import ...``).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SHARED_DATA = tuple(
    Path(p) for p in (os.environ.get("FASTTRAIN_SHARED_DATA"), HERE.parent.parent / "shared" / "data") if p
)
"""Where the project's real datasets live: $FASTTRAIN_SHARED_DATA, or ``../shared/data`` beside the checkout."""


@dataclass(frozen=True)
class BenchSize:
    """One parameter set. Changing steps per round or image size changes what a round is: refresh the baseline."""

    name: str
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]
    image_size: int
    """Training crop side, in pixels."""
    num_classes: int
    """Classifier outputs of the model-step benchmarks (synthetic labels)."""
    model_width: int
    """Base width of the small nets (smallcnn)."""
    steps_per_round: int
    """Train steps (or loader batches) per benchmark round; a round ends with a device synchronize."""
    rounds: int
    warmup_rounds: int
    """Untimed rounds first: compile, cuDNN autotune, worker and pipeline start."""
    loader_batch_size: int
    e2e_models: tuple[str, ...]
    e2e_batch_size: int
    train_per_class: int
    """Training images per class taken from the dataset (0 = all)."""
    val_per_class: int
    torch_threads: int = 0
    """torch.set_num_threads for the run (0 = torch's default). 1 on shared 2-core machines: two spinning OpenMP
    threads beside other busy processes ran 3x slower than one."""


SIZES = {
    # Tiny: checks that every path runs and gives a rough figure, on 2 cores in about 30-40 s (32 s measured).
    "cpu": BenchSize(
        name="cpu",
        models=("smallcnn", "resnet18"),
        batch_sizes=(8, 16),
        precisions=("fp32",),
        image_size=32,
        num_classes=10,
        model_width=16,
        steps_per_round=2,
        rounds=3,
        warmup_rounds=1,
        loader_batch_size=32,
        e2e_models=("smallcnn",),
        e2e_batch_size=16,
        train_per_class=24,
        val_per_class=2,
        torch_threads=1,
    ),
    # The GPU figures: ImageNet-shaped inputs, batch sizes up to 256, bf16 against fp32.
    "gpu": BenchSize(
        name="gpu",
        models=("resnet18", "resnet50", "smallcnn"),
        batch_sizes=(64, 128, 256),
        precisions=("bf16", "fp32"),
        image_size=224,
        num_classes=1000,
        model_width=32,
        steps_per_round=20,
        rounds=5,
        warmup_rounds=2,
        loader_batch_size=256,
        e2e_models=("resnet50", "resnet18"),
        e2e_batch_size=256,
        train_per_class=0,
        val_per_class=0,
    ),
}


# -- data ----------------------------------------------------------------------------------------------------
def cache_root(config: pytest.Config) -> Path:
    """$FASTTRAIN_BENCH_CACHE, else pytest's cache folder (.pytest_cache), else the system temp folder."""
    override = os.environ.get("FASTTRAIN_BENCH_CACHE")
    if getattr(config, "cache", None) is not None and not override:  # absent with -p no:cacheprovider
        return Path(config.cache.mkdir("fasttrain-bench"))
    root = Path(override) if override else Path(tempfile.gettempdir()) / "fasttrain-bench"
    root.mkdir(parents=True, exist_ok=True)  # callers make temporary folders inside it
    return root


def find_tar(name: str) -> Path | None:
    for folder in SHARED_DATA:
        if (folder / name).is_file():
            return folder / name
    return None


def extract_imagenette(tar_path: Path, dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """Extract (a per-class subset of) imagenette224.tar into ``dest`` (ImageFolder: train/, val/), atomically."""
    from fasttrain.data.synthetic import atomic_dir

    limits = {"train": train_per_class, "val": val_per_class}
    counts: dict[tuple[str, str], int] = {}
    with atomic_dir(dest) as tmp, tarfile.open(tar_path) as tar:
        for m in tar:
            parts = Path(m.name).parts  # imagenette224/<split>/<class>/<file>
            if not m.isfile() or len(parts) != 4 or parts[1] not in limits:
                continue
            key = (parts[1], parts[2])
            limit = limits[parts[1]]
            if limit and counts.get(key, 0) >= limit:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = tmp.joinpath(*parts[1:])
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest


def generate_imagenet_like(dest: Path, n_train: int, n_val: int, classes: int) -> Path:
    """ImageNet-size JPEGs (500x375, quality 90, ~ImageNet file sizes) when no real data is around."""
    from fasttrain.data import synthetic

    return synthetic.make_imagenet_like(dest, n_train, classes, val=n_val)


def bench_config(
    size: BenchSize,
    *,
    model: str,
    batch_size: int,
    precision: str = "auto",
    loader: str = "torch",
    data_root: Path | None = None,
    num_outputs: int = 0,
) -> Any:
    """A fasttrain Config for one benchmark, built the way users build theirs (overrides over defaults)."""
    from fasttrain.config import config_from_dict

    data = {"image_size": size.image_size, "loader": loader}
    if data_root is not None:
        data["root"] = str(data_root)
    return config_from_dict(
        {
            "name": f"bench-{size.name}",
            "data": data,
            "model": {"name": model, "num_outputs": num_outputs, "width": size.model_width},
            # "fp32" rows are float32, not TF32: the label says what ran (bf16 rows keep TF32 for their fp32 parts).
            "runtime": {"precision": precision, **({"tf32": "off"} if precision == "fp32" else {})},
            "train": {"batch_size": batch_size},
        }
    )


def skip_on_oom(fn: Any, what: str) -> Any:
    """``fn()``, or skip the benchmark (not fail it) when it runs out of memory: fasttrain's own rule for what
    counts as out of memory (torch's OOM error, cuBLAS / cuDNN allocation failures, one re-raised by compile).
    Any other error is a real failure and propagates."""
    from fasttrain.memory import is_oom_error, oom_summary

    try:
        return fn()
    except Exception as e:
        if not is_oom_error(e):
            raise
        why = oom_summary(e)
    pytest.skip(f"{what}: {why} on this device")  # outside the except: the traceback's tensors are gone


def skip_unavailable_backend(backend: str) -> None:
    """Skip (not fail) a backend whose module has not been written or whose library cannot run here."""
    import importlib.util

    if backend == "dali":
        if importlib.util.find_spec("nvidia.dali") is None:
            pytest.skip("DALI is not installed")
        if importlib.util.find_spec("fasttrain.data.dali") is None:
            pytest.skip("fasttrain.data.dali is not there yet")
        from fasttrain.data.dali import dali_status

        ok, why = dali_status()
        if not ok:
            pytest.skip(f"DALI cannot run here: {why}")
    elif backend == "cache":
        if importlib.util.find_spec("fasttrain.data.gpu_cache") is None:
            pytest.skip("fasttrain.data.gpu_cache is not there yet")


# -- the naive baseline ---------------------------------------------------------------------------------------
# What a typical hand-written script does, kept deliberately plain: fp32, NCHW, eager, torchvision ImageFolder +
# PIL transforms + DataLoader (normalizing float32 on the CPU and copying 4x the bytes), and a per-step
# `loss.item()` for the running loss. It runs on the same files, batch, model and worker count as fasttrain.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def naive_loader(root: Path, *, image_size: int, batch_size: int, workers: int, device: Any) -> Any:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    train_dir = Path(root) / "train"
    dataset = datasets.ImageFolder(str(train_dir if train_dir.is_dir() else root), tf)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=getattr(device, "type", "cpu") == "cuda",
        drop_last=True,
    )


class NaiveScript:
    """The model, optimizer and loop body of a hand-written training script."""

    def __init__(self, model_name: str, *, num_classes: int, image_size: int, width: int, device: Any):
        import torch
        from torch import nn

        from fasttrain.models import build_model

        self.device = device
        self.model = build_model(
            model_name, in_channels=3, num_outputs=num_classes, image_size=image_size, width=width
        ).to(device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.criterion = nn.CrossEntropyLoss()
        self.running_loss = 0.0

    def step(self, images: Any, labels: Any) -> int:
        images, labels = images.to(self.device), labels.to(self.device)
        outputs = self.model(images)
        loss = self.criterion(outputs, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item()  # as scripts do: a device read-back (sync) every step
        return images.shape[0]


def epoch_batch_times(
    loader: Any, sync: Any, since: float | None = None, clock: Any = None
) -> tuple[int, list[float], float]:
    """(samples, seconds per batch, clock at the last batch) over one pass of ``loader``; the first batch's time
    runs from ``since`` (the previous pass's last batch) when given. ``sync()`` (the device's synchronize) runs
    before every clock reading: a GPU batch is handed over as soon as its work is enqueued, so without it the
    times are those of enqueueing, not of the batches being ready."""
    import time

    clock = clock or time.perf_counter
    times: list[float] = []
    n = 0
    if since is None:
        sync()
        since = clock()
    t = since
    for batch in loader:
        sync()
        now = clock()
        times.append(now - t)
        t = now
        n += len(batch)
    return n, times, t
