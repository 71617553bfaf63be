"""Your own dataset from Python: ``train(cfg, dataset=..., val_dataset=...)`` (and ``autotune``, ``bench``).

A map-style ``torch.utils.data.Dataset`` whose ``dataset[i]`` is ``(image, label)``:

- the image a C x H x W tensor, every item the same shape: ``uint8`` (0..255; fasttrain normalizes it on the
  device with ``data.mean`` / ``data.std``, so only bytes cross to the GPU) or floating point (model-ready: your
  own transforms already normalized it); ``data.channels``, ``data.image_size`` and ``data.resize_size`` are
  taken from the first item (so ``predict`` on image files resizes them to the size the items had);
- the label an int class index; class names come from the dataset's ``classes`` attribute (torchvision's
  datasets have one), else from ``model.num_outputs``.

An item that cannot be read is reported and skipped, never fatal: ``__getitem__`` may return ``None`` or raise,
and the loader lists it (``dataset[i]: why``) as it lists a bad file; more than ``data.max_bad_per_epoch`` in an
epoch stop the run with the list, as for files.

Backends: its splits are samples of the kind ``dataset`` (:mod:`fasttrain.data.samples`), served by the
backends that take tensors, chosen by the one policy of :mod:`fasttrain.data.loaders`: ``data.loader = auto``
keeps the dataset on the device (the GPU cache, RAM on a CPU) when it fits ``data.cache_budget`` *and* its items
are fixed (two reads of an item give the same tensor): read once, then no per-step host work at all. A dataset
with random transforms of its own is read through the torch loader every epoch (caching would freeze one draw
per item). DALI reads files, so it cannot serve a dataset from Python.
Without ``val_dataset``, ``data.val_fraction`` of the items (seeded) are held out for validation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset, IterableDataset

from fasttrain.config import Config, ConfigError, DataConfig
from fasttrain.data.base import RunSamples
from fasttrain.data.samples import Skip
from fasttrain.data.sources import DataSource, Split

log = logging.getLogger(__name__)

__all__ = [
    "DATASET_ROOT",
    "DatasetSplit",
    "dataset_source",
    "dataset_refusal",
    "dataset_parts",
    "is_dataset_run",
]

DATASET_ROOT = "python:"
"""``data.root`` of a run trained on a dataset from Python: ``python:<class name>`` (resuming needs it again)."""


class _ItemNames(Sequence):
    """``dataset[i]`` for every item (``i`` the index in *your* dataset, also for a held-out part), without a
    list of millions of strings: what messages call an item."""

    def __init__(self, label: str, n: int, rows: Sequence[int] | None = None):
        self.label, self.n, self.rows = label, n, rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        return f"{self.label}[{i if self.rows is None else self.rows[i]}]"


@dataclass
class DatasetSplit(Split):
    """A split backed by a map-style dataset instead of files (``paths`` name its items)."""

    dataset: Any = None
    """The dataset given from Python."""
    rows: list[int] | None = None
    """The items of ``dataset`` this split holds (None: all of them)."""
    label: str = "dataset"
    """The argument it came as (dataset or val_dataset), for messages."""
    fixed: bool = True
    """Items read twice gave the same tensors (no random transform): it may be cached."""
    item_nbytes: int = 0
    """Bytes one cached item takes (image and label)."""
    floating: bool = False
    """Its images are float, normalized the dataset's own way (uint8 ones fasttrain normalizes)."""

    def subset(self, indices: list[int]) -> DatasetSplit:
        rows = [i if self.rows is None else self.rows[i] for i in indices]
        return _split(self.name, self.dataset, rows, self.label, self.fixed, self.item_nbytes, self.floating)

    def items(self) -> Dataset:
        """The split's items as a dataset, a failing item turned into a :class:`Skip` that names it."""
        return _Checked(self.dataset, self.label, self.rows)


def _split(
    name: str, dataset: Any, rows: list[int] | None, label: str, fixed: bool, item_nbytes: int, floating: bool
) -> DatasetSplit:
    n = len(dataset) if rows is None else len(rows)
    return DatasetSplit(
        name,
        cast(list[str], _ItemNames(label, n, rows)),
        [],
        dataset=dataset,
        rows=rows,
        label=label,
        fixed=fixed,
        item_nbytes=item_nbytes,
        floating=floating,
    )


def is_dataset_run(cfg: Config) -> bool:
    return cfg.data.root.startswith(DATASET_ROOT)


class _Checked(Dataset):
    """``dataset[rows[i]]`` with a failure (an exception, or None) turned into a :class:`Skip` naming the item in
    the user's own indexing, so one bad image is reported and skipped, as a bad file is."""

    def __init__(self, dataset: Any, label: str, rows: list[int] | None = None):
        self.dataset, self.label, self.rows = dataset, label, rows

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int):
        row = i if self.rows is None else self.rows[i]
        try:
            item = self.dataset[row]
        except Exception as e:  # noqa: BLE001 - the user's code: any failure of one item is that item's
            return Skip(f"{self.label}[{row}]", f"cannot be read ({type(e).__name__}: {e})")
        if item is None:
            return Skip(f"{self.label}[{row}]", "the dataset returned None")
        return item


def _check_dataset(dataset: Any, arg: str) -> None:
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(
            f"{arg}: needs a map-style dataset (__len__ and __getitem__ giving (image, label)), got "
            f"{type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{arg}: the dataset is empty")


def _first_item(dataset: Any, arg: str) -> tuple[int, torch.Tensor, Any]:
    """The first item that reads, as (index, image, label); errors name what is wrong with it."""
    errors = []
    for i in range(min(len(dataset), 16)):
        try:
            item = dataset[i]
        except Exception as e:  # noqa: BLE001 - reported below if no item reads
            errors.append(f"{arg}[{i}]: {type(e).__name__}: {e}")
            continue
        if item is None:
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{arg}[{i}]: expected an (image, label) pair, got {type(item).__name__}")
        x, y = item
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise TypeError(
                f"{arg}[{i}]: the image must be a C x H x W tensor (uint8 0..255, or float already "
                f"normalized), got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}; for PIL images use "
                f"torchvision's transforms.PILToTensor()"
            )
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"{arg}[{i}]: image dtype {x.dtype}: expected uint8 (0..255) or a floating point type")
        if x.shape[2] in (1, 3) and x.shape[0] not in (1, 3) and x.shape[0] == x.shape[1]:
            raise ValueError(
                f"{arg}[{i}]: image {tuple(x.shape)} looks like H x W x C; fasttrain takes C x H x W, as torchvision's "
                f"transforms give it (x.permute(2, 0, 1) in the dataset)"
            )
        if x.shape[1] != x.shape[2]:
            raise ValueError(
                f"{arg}[{i}]: image {tuple(x.shape)} is not square; data.image_size is one side "
                f"(resize or crop in the dataset)"
            )
        label = y.item() if isinstance(y, torch.Tensor) and y.numel() == 1 else y
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):  # NumPy's integers are Integral
            raise TypeError(f"{arg}[{i}]: the label must be an int class index, got {type(y).__name__} {y!r}")
        return i, x, int(label)
    raise ValueError(
        f"{arg}: none of the first {min(len(dataset), 16)} items could be read"
        + (f" ({errors[0]})" if errors else " (each was None)")
    )


def _check_sizes(dataset: Any, arg: str, start: int, shape: tuple[int, ...], ref: str, probes: int = 8) -> None:
    """The first ``probes`` items from ``start`` that read have ``shape``, the shape of item ``ref`` (the
    dataset's first): a dataset of images of several sizes (an ImageFolder without a Resize) failed in its first
    batch, in torch.stack."""
    seen = 0
    for i in range(start, min(len(dataset), start + 2 * probes)):  # a dataset of failing items is not read whole
        if seen == probes:
            return
        try:
            item = dataset[i]
        except Exception:  # noqa: BLE001 - an unreadable item is skipped when read for training
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
            continue
        seen += 1
        got = tuple(item[0].shape)
        if got != shape:
            side = shape[-1]
            raise ValueError(
                f"{arg}[{i}]: image {' x '.join(map(str, got))}, where {ref} is "
                f"{' x '.join(map(str, shape))}: every item must be one size (in the dataset's transform: "
                f"transforms.Resize(({side}, {side})), or a Resize and a CenterCrop({side}))"
            )


FIXED_PROBES = 8
"""Items read twice (under different seeds) to tell a fixed dataset from one with random transforms: a coin-flip
transform passes all of them unchanged with probability 2**-8."""


def _is_fixed(dataset: Any) -> bool:
    """Whether items read twice, under different seeds of torch's, Python's and NumPy's RNGs, give the same images
    (no random transform in the dataset). The caller's RNG states are restored."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    checked = 0
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(min(len(dataset), 4 * FIXED_PROBES)):
                images = []
                for seed in (i, i + 7919):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    np.random.seed(seed)
                    try:
                        item = dataset[i]
                    except Exception:  # noqa: BLE001 - an unreadable item says nothing about randomness
                        break
                    if not (isinstance(item, (tuple, list)) and isinstance(item[0], torch.Tensor)):
                        break
                    images.append(item[0])
                if len(images) == 2:
                    if not torch.equal(images[0], images[1]):
                        return False
                    checked += 1
                    if checked == FIXED_PROBES:
                        break
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return True


def dataset_source(cfg: Config, dataset: Any, val_dataset: Any = None) -> tuple[Config, DataSource]:
    """The config (data.root, channels, image size and output count taken from the dataset) and a
    :class:`DataSource` over ``dataset`` (and ``val_dataset``, else a seeded ``data.val_fraction`` hold-out)."""
    if cfg.task.name != "classify":
        raise ConfigError(
            f"task.name: a dataset from Python is served to the classify task (an (image, label) "
            f"pair per item); got {cfg.task.name!r}: give that task's data as files in data.root"
        )
    if cfg.data.loader == "dali":
        raise ConfigError(
            "data.loader: DALI reads files; a dataset from Python is served by the torch loader or "
            "the cache (data.loader = auto, torch or cache)"
        )
    _check_dataset(dataset, "dataset")
    if val_dataset is not None:
        _check_dataset(val_dataset, "val_dataset")
    i, x, label = _first_item(dataset, "dataset")
    _check_sizes(dataset, "dataset", i + 1, tuple(x.shape), f"dataset[{i}]")
    if val_dataset is not None:  # its own size may differ (validated at another resolution): one size of its own
        j, v, _ = _first_item(val_dataset, "val_dataset")
        _check_sizes(val_dataset, "val_dataset", j + 1, tuple(v.shape), f"val_dataset[{j}]")
    c, side = int(x.shape[0]), int(x.shape[1])
    if c not in (1, 3):
        raise ValueError(f"dataset[{i}]: {c} channels; fasttrain's models take 1 (grayscale) or 3 (RGB)")
    classes = getattr(dataset, "classes", None)
    n_out = cfg.model.num_outputs
    if classes is not None:
        names = [str(n) for n in classes]
        if n_out and n_out != len(names):
            raise ConfigError(
                f"model.num_outputs = {n_out}, but the dataset's classes attribute names {len(names)} classes"
            )
    elif n_out:
        names = [str(k) for k in range(n_out)]
    else:
        raise ConfigError(
            "model.num_outputs: the dataset has no `classes` attribute (torchvision's datasets "
            "have one): give it one, or set model.num_outputs to the class count"
        )
    if not 0 <= label < len(names):
        raise ValueError(f"dataset[{i}]: label {label} is outside 0..{len(names) - 1} ({len(names)} classes)")
    if (c, side, side) != (cfg.data.channels, cfg.data.image_size, cfg.data.eval_resize):
        log.info(
            "data.channels = %d, data.image_size = data.resize_size = %d: taken from the dataset's items (%s)",
            c,
            side,
            "x".join(map(str, x.shape)),
        )
    name = type(dataset).__name__
    # The model learns from the items whole, at their own size: every size derived from it follows, so that
    # the run's config.toml (and predict on image files) resizes to the side the items had instead of
    # resizing to a configured resize_size and centre-cropping a part of it.
    data = dataclasses.replace(cfg.data, root=f"{DATASET_ROOT}{name}", channels=c, image_size=side, resize_size=side)
    cfg = dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, num_outputs=len(names)))
    fixed = _is_fixed(dataset)
    item_nbytes = x.numel() * x.element_size() + 8
    floating = x.is_floating_point()
    rows: list[int] | None = None
    val = (
        None
        if val_dataset is None
        else _split("val", val_dataset, None, "val_dataset", fixed and _is_fixed(val_dataset), item_nbytes, floating)
    )
    if val is None and cfg.data.val_fraction > 0 and len(dataset) > 1:
        order = list(range(len(dataset)))
        random.Random(cfg.runtime.seed).shuffle(order)
        k = max(1, math.floor(len(order) * cfg.data.val_fraction))
        rows = sorted(order[k:])
        val = _split("val", dataset, sorted(order[:k]), "dataset", fixed, item_nbytes, floating)
        log.info(
            "no val_dataset: %d of %d items held out for validation (data.val_fraction = %g)",
            k,
            len(dataset),
            cfg.data.val_fraction,
        )
    if cfg.data.max_samples and (len(dataset) if rows is None else len(rows)) > cfg.data.max_samples:
        rows = (rows or list(range(len(dataset))))[: cfg.data.max_samples]
    train = _split("train", dataset, rows, "dataset", fixed, item_nbytes, floating)
    source = DataSource(root=Path(data.root), format="dataset", train=train, val=val, class_names=names)
    return cfg, source


def dataset_refusal(data: DataConfig) -> str:
    """Why no backend can serve a dataset from Python under these settings ('' when they can): each of them
    works on the images fasttrain decodes from files, and a dataset hands over finished tensors."""
    if data.rand_augment:
        return (
            "data.rand_augment: timm's RandAugment works on image files' PIL images, not on the tensors of a "
            "dataset from Python; put it in your dataset's transform and leave data.rand_augment empty"
        )
    if data.progressive or data.eval_size:
        key = "data.progressive" if data.progressive else "data.eval_size"
        return f"{key}: resizes the images fasttrain decodes; a dataset from Python sets its own size"
    return ""


def dataset_parts(run: RunSamples) -> tuple[list[DatasetSplit], bool]:
    """The splits of a run on a dataset from Python, and whether every item is fixed (may be cached)."""
    parts = [cast(DatasetSplit, s.split) for s in (run.train, run.val) if s is not None]
    return parts, all(p.fixed for p in parts)
