"""Dataset discovery shared by every backend: plain file lists and targets, never decoded images.

Each format returns a :class:`DataSource` with train / val / test :class:`Split` objects. The torch loader,
DALI and the GPU cache are all built from these lists, so every backend sees the same files with the same
labels in the same order.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "Split", "DataSource", "discover", "list_images", "holdout_split"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"})


@dataclass
class Split:
    name: str
    """train, val or test."""
    paths: list[str]
    """Absolute image paths."""
    targets: list[Any]
    """Per path: an int class index (classify), a list of floats (regress) or a target image path (paired)."""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> "Split":
        return Split(self.name, [self.paths[i] for i in indices], [self.targets[i] for i in indices])


@dataclass
class DataSource:
    root: Path
    format: str
    train: Split
    val: Split | None
    test: Split | None = None
    class_names: list[str] | None = None
    """Classification: index -> class folder name."""
    target_names: list[str] | None = None
    """Regression: names of the target values (e.g. x, y, r, g, b)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) for records found unusable during discovery (reported, not fatal)."""

    @property
    def num_outputs(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        if self.target_names is not None:
            return len(self.target_names)
        return 0


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / f)
    return out


def holdout_split(targets: list[Any], fraction: float, seed: int, stratify: bool) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists. Stratified by class when asked: each class gives its share."""
    if fraction <= 0:
        return list(range(len(targets))), []
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t if stratify else 0, []).append(i)
    train, val = [], []
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if n_val == 0 and len(idx) >= 2:
            n_val = 1
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return sorted(train), sorted(val)


def _class_folder_split(folder: Path, name: str, class_names: list[str]) -> Split:
    paths, targets = [], []
    index = {c: i for i, c in enumerate(class_names)}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in index:
            raise ConfigError(f"data.root: {name} split {folder} has class folder {sub.name!r} that the training "
                              f"split lacks (training classes: {', '.join(class_names)})")
        for f in list_images(sub):
            paths.append(str(f))
            targets.append(index[sub.name])
    return Split(name, paths, targets)


def _discover_folder(cfg: DataConfig, root: Path) -> DataSource:
    train_dir = root / cfg.train_dir
    if not train_dir.is_dir():
        train_dir = root  # one folder of class folders
    # When the root itself is the training split, its val/ and test/ folders are splits, not classes.
    reserved = {cfg.val_dir, cfg.test_dir} if train_dir == root else set()
    class_names = sorted(p.name for p in train_dir.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and p.name not in reserved)
    if not class_names:
        raise ConfigError(f"data.root: {train_dir} holds no class folders (expected {train_dir}/<class>/<image>)")
    train = _class_folder_split(train_dir, "train", class_names)
    if len(train) == 0:
        raise ConfigError(f"data.root: no images under {train_dir} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    present = set(train.targets)
    empty = [c for i, c in enumerate(class_names) if i not in present]
    if empty:
        log.warning("class folders without images in %s: %s", train_dir, ", ".join(empty))
    val_dir = root / cfg.val_dir
    if val_dir.is_dir() and val_dir != train_dir:
        val = _class_folder_split(val_dir, "val", class_names)
    else:
        tr, va = holdout_split(train.targets, cfg.val_fraction, cfg.split_seed, stratify=True)
        train, val = train.subset(tr), train.subset(va)
        val.name = "val"
        log.info("no %s/ folder: held out %d of %d training images for validation (seed %d)",
                 cfg.val_dir, len(va), len(tr) + len(va), cfg.split_seed)
    test_dir = root / cfg.test_dir
    test = _class_folder_split(test_dir, "test", class_names) if test_dir.is_dir() and test_dir != train_dir else None
    return DataSource(root, "folder", train, val if len(val) else None, test, class_names=class_names)


def discover(cfg: DataConfig, root: str | os.PathLike | None = None) -> DataSource:
    """Find the dataset's files for ``cfg.format`` under ``root`` (default ``cfg.root``)."""
    root = Path(root if root is not None else cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder")
    if cfg.format == "folder":
        src = _discover_folder(cfg, root)
    else:
        from fasttrain.data import formats

        src = formats.discover(cfg, root)
    if cfg.max_samples and len(src.train) > cfg.max_samples:
        rng = random.Random(cfg.split_seed)
        keep = sorted(rng.sample(range(len(src.train)), cfg.max_samples))
        src.train = src.train.subset(keep)
    for f, why in src.skipped:
        log.warning("skipped %s: %s", f, why)
    return src
