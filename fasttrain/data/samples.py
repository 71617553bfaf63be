"""What a task asks a loader for, whatever the backend, and the map-style datasets that decode it with PIL.

A task describes one split as :class:`Samples`: its files and targets and the *kind* of sample. Every backend
(torch, DALI, the GPU cache) serves every kind it can from that description, so ``data.loader`` means the same
for every task. Kinds:

- ``class``: an image and a class index (classify). Training: torchvision's random-resized-crop and flip;
  evaluation: shorter side to ``data.eval_resize``, centre crop ``data.image_size``.
- ``vector``: an image and a float vector (regress). The whole image resized to ``image_size`` squared,
  nothing cropped or flipped (a target may be a position in the image). With ``size_targets`` each image's width
  and height (from its header) are appended to its vector.
- ``pair``: an input and a target image (pix2pix); targets are the target files' paths, or
  :data:`~fasttrain.data.formats.SIDE_BY_SIDE` (left half input, right half target). Evaluation resizes both to
  ``image_size``; training resizes both to ``image_size x jitter`` and crops one random ``image_size`` window
  from both, flipping both or neither. The window and flip come from :func:`pair_jitter`, a pure function of
  (seed, epoch, index), so every backend draws the same ones.
- ``dataset``: the items of a map-style dataset given from Python (``train(cfg, dataset=...)``): the split is a
  :class:`~fasttrain.data.user.DatasetSplit`, each item an image tensor and a class index. The backends that
  take tensors serve it (torch, the cache); DALI, which reads files, does not.

The datasets here are the torch backend's per-sample path, and (with ``deterministic=True``, the evaluation
geometry or the training canvas) what the GPU cache decodes once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from fasttrain.config import PILLOW_BOMB_PIXELS, DataConfig
from fasttrain.data.checks import BadDataError, ImageInfo, UnusableImage, _none_usable, load_checked, precheck
from fasttrain.data.decode import DECODE_ERRORS, load_image
from fasttrain.data.formats import SIDE_BY_SIDE
from fasttrain.data.order import alternate_flips, sample_seed, sample_seeds
from fasttrain.data.progressive import TrainSizes
from fasttrain.data.sources import Split
from fasttrain.data.vectors import Vectors

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "PAIR_JITTER",
    "needs_pil",
    "Samples",
    "Checked",
    "Skip",
    "ImageDataset",
    "VectorDataset",
    "PairDataset",
    "load_pair",
    "pair_jitter",
    "pair_load_size",
    "precheck_samples",
    "reads_unchecked",
    "dataset_for",
    "EpochTransforms",
    "targets_tensor",
]

KINDS = ("class", "vector", "pair", "dataset")
PAIR_JITTER = 286 / 256
"""pix2pix's training resize before the random crop, relative to image_size (the reference: 286 -> 256)."""


@dataclass(frozen=True)
class Samples:
    """One split as a task asks a loader for it (see the module docstring)."""

    split: Split
    kind: str = "class"
    size_targets: bool = False
    """vector: append each image's width and height to its target vector."""
    jitter: float = PAIR_JITTER
    """pair: training resize before the random crop, relative to image_size."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sample kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "pair" and len({t == SIDE_BY_SIDE for t in self.split.targets}) > 1:
            raise ValueError(f"the {self.split.name} split mixes side-by-side images and A/B file pairs")

    @property
    def side_by_side(self) -> bool:
        """Pairs stored as one file each (input left, target right)."""
        return self.kind == "pair" and bool(self.split.targets) and self.split.targets[0] == SIDE_BY_SIDE


def needs_pil(data: DataConfig) -> str:
    """Why a backend that does not augment PIL images (the cache, DALI) cannot serve this config; '' when it
    can. timm's RandAugment (``data.rand_augment``) works on PIL images, which only the torch loader has."""
    if data.rand_augment:
        return "data.rand_augment: timm's RandAugment works on PIL images, which only the torch loader has"
    return ""


class Skip(NamedTuple):
    """What a dataset returns for a sample it cannot decode: the file and why (the loader records and skips it)."""

    path: str
    reason: str
    refused: bool = False
    """The validator refused the file (:func:`~fasttrain.data.checks.load_checked`): skipped as a pre-check
    failure would be, not counted as a failure to decode."""


def _skip(path: str, e: BaseException) -> Skip:
    if isinstance(e, UnusableImage):  # the validator's own reason, as the pre-check words it
        return Skip(path, str(e), refused=True)
    return Skip(path, f"cannot be decoded ({type(e).__name__}: {e})")


class ImageDataset(Dataset):
    """(index, epoch) -> (uint8 C x H x W, target), or a :class:`Skip` when the file cannot be decoded.

    ``random``: the transform draws from torch's global CPU generator, seeded per (seed, epoch, index); the
    training process's generator is restored after each batch. A deterministic transform needs no seeding (and
    the cache's decode threads must not fork the global generator concurrently). ``checked``: each file is
    validated (:func:`check_header`'s rules) and decoded from one read, for a split that was not pre-checked (the
    GPU cache decodes every file once). ``unchecked``: per sample, whether its file was left unchecked by the
    pre-check (``data.header_checks = read``): those are validated so as they are read."""

    def __init__(
        self,
        split: Split,
        transform: Callable,
        channels: int,
        seed: int,
        target_fn: Callable[[Any], Any] = lambda t: t,
        max_pixels: int | None = None,
        random: bool = True,
        checked: bool = False,
        epoch_transform: Callable[[int], Callable] | None = None,
        unchecked: np.ndarray | None = None,
        alternate_flip: bool = False,
    ):
        self.split, self.transform, self.channels, self.seed = split, transform, channels, seed
        self.alternate_flip = alternate_flip
        """Mirror the transform's output as :func:`~fasttrain.data.order.alternate_flips` says (data.flip_alternate;
        the transform then has no flip of its own)."""
        self.target_fn, self.max_pixels, self.random, self.checked = target_fn, max_pixels, random, checked
        self.unchecked = unchecked
        self.epoch_transform = epoch_transform
        """epoch -> the transform of that epoch (progressive resizing: the size follows the epoch of the key)."""

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int] | int):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int] | int]) -> list:
        """A batch of samples (the DataLoader asks for a batch at once). Each random sample seeds torch's CPU
        generator from (seed, epoch, index): the same crops whatever the worker count or batch. In the training
        process (``data.workers = 0``) the generator is saved and restored once per batch, not per sample
        (dropout's stream must not move); a worker process owns its generator and needs neither."""
        if not self.random or get_worker_info() is not None:
            return [self._one(key) for key in keys]
        with torch.random.fork_rng(devices=[]):
            return [self._one(key) for key in keys]

    def _one(self, key: tuple[int, int] | int):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.split.paths[index]
        transform = self.transform if self.epoch_transform is None else self.epoch_transform(epoch)
        try:
            if self.checked or (self.unchecked is not None and self.unchecked[index]):
                im = load_checked(path, self.channels, self.max_pixels or PILLOW_BOMB_PIXELS)
            else:
                im = load_image(path, self.channels, self.max_pixels)
            if self.random:
                # torchvision's transforms draw from the global CPU generator. Only the CPU generator:
                # torch.manual_seed would also reseed every CUDA generator.
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            x = transform(im)
        except DECODE_ERRORS as e:
            return _skip(path, e)
        if self.alternate_flip and alternate_flips(self.seed, epoch, [index])[0]:
            x = x.flip(-1)
        return x, self.target_fn(self.split.targets[index])


class VectorDataset(Dataset):
    """(index, epoch) -> (uint8 C x S x S of the whole image, float32 targets [+ width, height]), or a
    :class:`Skip`. No randomness: the epoch is ignored."""

    def __init__(
        self,
        split: Split,
        image_size: int,
        channels: int,
        *,
        size_targets: bool = False,
        max_pixels: int | None = None,
        unchecked: np.ndarray | None = None,
    ):
        self.split, self.size, self.channels = split, image_size, channels
        self.size_targets, self.max_pixels, self.unchecked = size_targets, max_pixels, unchecked

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int] | int):
        index = key[0] if isinstance(key, tuple) else key
        path = self.split.paths[index]
        try:
            if self.unchecked is not None and self.unchecked[index]:  # validated as it is read (see ImageDataset)
                im = load_checked(path, self.channels, self.max_pixels or PILLOW_BOMB_PIXELS)
            else:
                im = load_image(path, self.channels, self.max_pixels)
        except DECODE_ERRORS as e:
            return _skip(path, e)
        t = torch.tensor(self.split.targets[index], dtype=torch.float32)
        if self.size_targets:
            t = torch.cat([t, torch.tensor(im.size, dtype=torch.float32)])
        from fasttrain.data.transforms import resize_square  # torchvision: imported where images are transformed

        return resize_square(im, self.size), t


def _halves(im: Image.Image) -> tuple[Image.Image, Image.Image]:
    w, h = im.size[0] // 2, im.size[1]
    if w < 1:
        raise ValueError(f"side-by-side image is {im.size[0]} px wide, too narrow to split")
    return im.crop((0, 0, w, h)), im.crop((w, 0, 2 * w, h))


def load_pair(path: str, target: str, channels: int, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image]:
    """(A, B): two files, or the left and right halves of one (target == SIDE_BY_SIDE). Raises the errors of
    :data:`~fasttrain.data.decode.DECODE_ERRORS`."""
    a = load_image(path, channels, max_pixels)
    if target == SIDE_BY_SIDE:
        return _halves(a)
    return a, load_image(target, channels, max_pixels)


def pair_load_size(image_size: int, jitter: float = PAIR_JITTER) -> int:
    """The square side pairs are resized to before the training crop."""
    return int(round(image_size * jitter))


def pair_jitter(seed: int, epoch: int, indices, room: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flipped) int64 arrays of the training crop of each sample in ``indices``: offsets in
    ``0..room - 1`` and a coin, all taken from :func:`~fasttrain.data.order.sample_seed` of (seed, epoch, index)
    (bits 0.., 21.., 42..), so the torch loader, the GPU cache and DALI draw the same ones, vectorized."""
    s = sample_seeds(seed, epoch, indices)
    r = np.uint64(max(1, room))
    top = (s % r).astype(np.int64)
    left = ((s >> np.uint64(21)) % r).astype(np.int64)
    flipped = ((s >> np.uint64(42)) & np.uint64(1)).astype(np.int64) if flip else np.zeros(len(s), np.int64)
    return top, left, flipped


class PairDataset(Dataset):
    """(index, epoch) -> (A, B) uint8 C x S x S with the same geometry, or a :class:`Skip` naming the file that
    cannot be decoded.

    Training resizes both to ``load_size`` (default ``image_size x jitter``) and crops the :func:`pair_jitter`
    window from both (flipping both or neither); evaluation resizes to ``image_size``. ``crop=False`` with a
    ``load_size`` gives the uncropped training canvas (what the GPU cache holds)."""

    def __init__(
        self,
        split: Split,
        image_size: int,
        channels: int,
        *,
        train: bool,
        flip: bool,
        seed: int,
        jitter: float = PAIR_JITTER,
        load_size: int | None = None,
        crop: bool | None = None,
        max_pixels: int | None = None,
    ):
        self.split, self.size, self.channels = split, image_size, channels
        self.train, self.flip, self.seed, self.max_pixels = train, flip, seed, max_pixels
        self.load_size = load_size or (pair_load_size(image_size, jitter) if train else image_size)
        self.crop = train if crop is None else crop

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int] | int):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, target = self.split.paths[index], self.split.targets[index]
        try:
            a = load_image(path, self.channels, self.max_pixels)
            if target == SIDE_BY_SIDE:
                a, b = _halves(a)
        except DECODE_ERRORS as e:
            return _skip(path, e)
        if target != SIDE_BY_SIDE:
            try:  # the target file on its own: a bad one is named, not its input
                b = load_image(target, self.channels, self.max_pixels)
            except DECODE_ERRORS as e:
                return _skip(target, e)
        from fasttrain.data.transforms import resize_square

        xa, xb = resize_square(a, self.load_size), resize_square(b, self.load_size)
        if self.crop:
            s = self.size
            top, left, flipped = (
                int(v[0]) for v in pair_jitter(self.seed, epoch, [index], self.load_size - s + 1, self.flip)
            )
            xa, xb = xa[:, top : top + s, left : left + s], xb[:, top : top + s, left : left + s]
            if flipped:
                xa, xb = xa.flip(-1), xb.flip(-1)
        return xa.contiguous(), xb.contiguous()


def targets_tensor(targets: Sequence[Any]) -> torch.Tensor:
    """Class indices -> int64 (N); float vectors -> float32 (N x K); image targets (paths) -> ValueError. An array
    stand-in (:class:`~fasttrain.data.vectors.Vectors`) is read as its array, not row by row."""
    try:
        t = torch.as_tensor(targets.array if isinstance(targets, Vectors) else targets)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            "targets must be class indices or numeric vectors (paired image targets are a kind of their own)"
        ) from e
    if t.dtype.is_floating_point:
        return t.float()
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"unsupported target dtype {t.dtype}")
    return t.long()


# -- the shared pre-check over a request ------------------------------------------------------------------------


@dataclass
class Checked:
    """The samples of a request whose files pass the shared pre-check, and what their headers say."""

    samples: Samples
    """The request, its split cut down to the usable samples (in order)."""
    infos: list[ImageInfo | None]
    """Per usable sample: its (input) file's header; None for a file left unchecked (see :func:`precheck_samples`)."""
    target_infos: list[ImageInfo] | None
    """Pairs of two files: per usable sample, the target file's header."""
    bad: list[tuple[str, str]]
    """(path, reason) of every file left out."""

    @property
    def unchecked(self) -> np.ndarray | None:
        """Per usable sample, whether its file is still to be checked as it is read; None when none is."""
        mask = np.fromiter((info is None for info in self.infos), np.bool_, len(self.infos))
        return mask if mask.any() else None


def reads_unchecked(samples: Samples, data: DataConfig) -> bool:
    """Whether the loaders may take files the dataset index left unchecked (``data.header_checks`` is not start)
    and check each as they read it: classes and vectors; not a task that needs every header at construction
    (``size_targets``: each image's width and height), nor pairs (two files, a side-by-side file's width)."""
    return data.header_checks != "start" and samples.kind in ("class", "vector") and not samples.size_targets


def precheck_samples(samples: Samples, data: DataConfig, threads: int) -> Checked:
    """:func:`~fasttrain.data.checks.precheck` on every file of the request (inputs, and the target files of
    pairs); a sample is kept when all its files pass. Raises BadDataError when none does. Files the dataset index
    left unchecked are kept with no header where :func:`reads_unchecked` allows it, else checked now."""
    split = samples.split
    pre = precheck(
        split.paths,
        max_pixels=data.max_image_pixels,
        threads=threads,
        split=split.name,
        unchecked=reads_unchecked(samples, data),
    )
    bad = list(pre.bad)
    keep, infos = list(pre.keep), list(pre.infos)
    target_infos = None
    if samples.kind == "pair":
        if samples.side_by_side:
            for i, info in zip(keep, _all_checked(infos)):
                if info.width < 2:
                    bad.append((split.paths[i], f"side-by-side image is {info.width} px wide, too narrow to split"))
                    log.warning("skipping %s: %s", *bad[-1])
            ok = [k for k, info in enumerate(_all_checked(infos)) if info.width >= 2]
            keep, infos = [keep[k] for k in ok], [infos[k] for k in ok]
            _warn_of_narrow_pairs(split.name, [split.paths[i] for i in keep], _all_checked(infos))
        else:
            targets = split.subset(keep).targets  # an index's view stays a view
            pre_b = precheck(targets, max_pixels=data.max_image_pixels, threads=threads, split=split.name)
            bad += pre_b.bad
            keep, infos = [keep[k] for k in pre_b.keep], [infos[k] for k in pre_b.keep]
            target_infos = _all_checked(pre_b.infos)  # checked here: never unchecked (no `unchecked=True`)
    if not keep:
        raise BadDataError(_none_usable(split.name, len(split), bad))
    return Checked(replace(samples, split=split.subset(keep)), infos, target_infos, bad)


def _warn_of_narrow_pairs(split: str, paths: list[str], infos: list[ImageInfo]) -> None:
    """Side-by-side pairs are about twice as wide as tall (two images of one size): a folder of plain photos
    read as pairs trained on their halves without a word."""
    narrow = [(p, info) for p, info in zip(paths, infos) if info.width < 1.5 * info.height]
    if narrow:
        path, info = narrow[0]
        log.warning(
            "%s split: %d of %d side-by-side images are not about twice as wide as tall (%s is %d x %d): each is cut "
            "into a left half (the input) and a right half (the target); are they pairs?",
            split,
            len(narrow),
            len(paths),
            path,
            info.width,
            info.height,
        )


def _all_checked(infos: list[ImageInfo | None]) -> list[ImageInfo]:
    if any(info is None for info in infos):
        raise RuntimeError("precheck_samples: a file left unchecked where every header is needed")
    return cast("list[ImageInfo]", infos)


class EpochTransforms:
    """epoch -> the training transform at that epoch's size (:class:`~fasttrain.data.progressive.TrainSizes`),
    one transform built per size."""

    def __init__(self, data: DataConfig, sizes: TrainSizes):
        self.data, self.sizes = data, sizes
        self._by_size: dict[int, Callable] = {}

    def __call__(self, epoch: int) -> Callable:
        size = self.sizes.size(epoch)
        if size not in self._by_size:
            from fasttrain.data.transforms import train_transform

            self._by_size[size] = train_transform(self.data, size)
        return self._by_size[size]


def dataset_for(
    samples: Samples,
    data: DataConfig,
    seed: int,
    *,
    train: bool,
    deterministic: bool = False,
    sizes: TrainSizes | None = None,
    checked: bool = False,
    unchecked: np.ndarray | None = None,
) -> Dataset:
    """The map-style dataset of a request. ``deterministic``: what the GPU cache decodes once, the evaluation
    geometry, or for training the canvas its device augmentation draws from (class: the centre square resized
    to the largest training size when random-resized-crop is on, else the evaluation geometry at that size;
    pair: both images resized to the jitter size, uncropped). ``sizes``: class training under progressive
    resizing, the size of each epoch (the torch loader's transform follows the epoch of each key). ``checked``:
    class images are validated as they are decoded (the split was not pre-checked). ``unchecked``: per sample,
    whether its file is validated as it is read (:attr:`Checked.unchecked`; classes and vectors)."""
    # torchvision (whose import pulls torch._dynamo, seconds on a CPU) only once a dataset is built: the run's
    # other paths (discovery, checks, autotune's short-job answer) never need it.
    from fasttrain.data.transforms import eval_transform, train_transform

    split, channels, size, px = samples.split, data.channels, data.image_size, data.max_image_pixels
    if samples.kind == "vector":
        return VectorDataset(
            split, size, channels, size_targets=samples.size_targets, max_pixels=px, unchecked=unchecked
        )
    if samples.kind == "pair":
        if deterministic:
            load = pair_load_size(size, samples.jitter) if train else size
            return PairDataset(
                split, size, channels, train=False, flip=False, seed=seed, load_size=load, crop=False, max_pixels=px
            )
        return PairDataset(
            split, size, channels, train=train, flip=data.hflip, seed=seed, jitter=samples.jitter, max_pixels=px
        )
    if deterministic:
        canvas = data
        if train:  # the training canvas: at the largest training size, whatever the evaluation crop
            big = data.train_size_max
            resize = big if data.random_resized_crop else data.resize_size if big == size else 0
            canvas = replace(data, image_size=big, eval_size=big, resize_size=resize)
        tf = eval_transform(canvas)
        return ImageDataset(
            split, tf, channels, seed, max_pixels=px, random=False, checked=checked, unchecked=unchecked
        )
    alternate = train and data.hflip and data.flip_alternate
    if train and sizes is not None and sizes.progressive:
        return ImageDataset(
            split,
            train_transform(data),
            channels,
            seed,
            max_pixels=px,
            epoch_transform=EpochTransforms(data, sizes),
            unchecked=unchecked,
            alternate_flip=alternate,
        )
    tf = train_transform(data) if train else eval_transform(data)
    return ImageDataset(
        split, tf, channels, seed, max_pixels=px, random=train, unchecked=unchecked, alternate_flip=alternate
    )
