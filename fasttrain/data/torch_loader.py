"""The torch/PIL backend: DataLoader workers decode and augment on the CPU, the device normalizes.

It is the best a CPU loader can be: uint8 batches (4x fewer bytes than float), pinned memory, persistent
workers, prefetching, and (on CUDA) the host-to-device copy and normalization on a side stream one batch
ahead of the step, as timm's PrefetchLoader does. Augmentation randomness is derived from (seed, epoch,
index), so a resumed run and an uninterrupted one see the same crops whatever the worker count.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fasttrain.data.base import Batch, InputSpec, normalize_on_device
from fasttrain.data.checks import BadDataError, BadFiles
from fasttrain.data.sources import Split
from fasttrain.data.transforms import DECODE_ERRORS, load_image

log = logging.getLogger(__name__)

__all__ = ["EpochSampler", "ImageDataset", "Skip", "collate_skip", "TorchLoader", "sample_seed"]

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, sample index)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` pairs: a seeded permutation per epoch (train) or the identity (eval).

    ``num_shards`` / ``shard_id`` give each rank a disjoint, equally long slice. ``drop_last`` trims to whole
    batches so every step has the same shape (what torch.compile and cudnn.benchmark like).
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 num_shards: int = 1, shard_id: int = 0):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.num_shards, self.shard_id = drop_last, num_shards, shard_id
        self.epoch = 0
        self.start = 0
        """Samples of the epoch to leave out of the next iteration only (resuming mid-epoch)."""

    def indices(self, epoch: int | None = None) -> list[int]:
        """This shard's sample order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[self.shard_id::self.num_shards]
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start, self.start = self.epoch, self.start, 0
        return iter([(i, epoch) for i in self.indices()[start:]])

    def __len__(self) -> int:
        per_shard = len(range(self.shard_id, self.n, self.num_shards))
        return per_shard // self.batch_size * self.batch_size if self.drop_last else per_shard


class Skip(NamedTuple):
    """What a dataset returns for a sample it cannot decode: the file and why (the loader records and skips it)."""

    path: str
    reason: str


class ImageDataset(Dataset):
    """(index, epoch) -> (uint8 C x H x W, target), or a :class:`Skip` when the file cannot be decoded."""

    def __init__(self, split: Split, transform: Callable, channels: int, seed: int,
                 target_fn: Callable[[Any], Any] = lambda t: t, max_pixels: int | None = None):
        self.split, self.transform, self.channels, self.seed = split, transform, channels, seed
        self.target_fn, self.max_pixels = target_fn, max_pixels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = self.split.paths[index]
        try:
            im = load_image(path, self.channels, self.max_pixels)
            # torchvision's transforms draw from the global CPU generator: seed it for this sample inside a fork
            # that restores it. Only the CPU generator: torch.manual_seed would also reseed every CUDA generator
            # (with data.workers = 0 this runs in the training process: dropout's stream, a restored RNG state).
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                x = self.transform(im)
        except DECODE_ERRORS as e:
            return Skip(path, f"cannot be decoded ({type(e).__name__}: {e})")
        return x, self.target_fn(self.split.targets[index])


def collate_skip(items: Sequence, fill_to: int = 0):
    """Stack the samples that decoded (None or :class:`Skip` items are left out); None when none did (the loader
    then skips the batch).

    ``fill_to``: training batches short of samples (an unreadable file was skipped) are topped up by repeating
    decoded ones, so every step keeps one shape (a new shape costs a torch.compile recompile).
    """
    items = [it for it in items if it is not None and not isinstance(it, Skip)]
    if not items:
        return None
    if len(items) < fill_to:
        items = [items[i % len(items)] for i in range(fill_to)]
    xs, ys = zip(*items)
    x = torch.stack(xs)
    y = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.as_tensor(ys)
    return x, y


class _NamedSkips:
    """Wraps a collate function: the :class:`Skip` items of a batch travel beside it (from the worker processes
    to the loader, which records them); the wrapped function sees None in their place."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items: Sequence) -> dict[str, Any]:
        skips = [(it.path, it.reason) for it in items if isinstance(it, Skip)]
        return {"batch": self.collate([None if isinstance(it, Skip) else it for it in items]), "skipped": skips}


def _default_prepare(spec: InputSpec) -> Callable:
    scale_shift = spec.scale_shift()

    def prepare(cpu_batch) -> Batch:
        x, y = cpu_batch
        return Batch(normalize_on_device(x, spec, scale_shift), y.to(spec.device, non_blocking=True))

    return prepare


class TorchLoader:
    """A DataLoader behind the loader contract; ``prepare`` turns a CPU batch into a device Batch.

    ``skipped``: (path, reason) of files already left out (the pre-check's); files that fail to decode during
    the run are added (a dataset reports them by returning :class:`Skip`). More than ``max_bad_per_epoch`` new
    ones in one epoch, or an epoch in which nothing decodes, raise :class:`~fasttrain.data.checks.BadDataError`.
    """

    def __init__(self, dataset: Dataset, spec: InputSpec, *, batch_size: int, train: bool, seed: int,
                 workers: int, prefetch: int = 2, pin_memory: bool | None = None,
                 prepare: Callable[[Any], Batch] | None = None, collate: Callable = collate_skip,
                 num_shards: int = 1, shard_id: int = 0, skipped: list[tuple[str, str]] | None = None,
                 max_bad_per_epoch: int = 10, split: str | None = None):
        self.spec = spec
        self.batch_size = batch_size
        self.num_samples = len(dataset)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self._bad = BadFiles(self.skipped, max_bad_per_epoch)
        self._split = split or ("train" if train else "evaluation")
        self.sampler = EpochSampler(len(dataset), batch_size=batch_size, shuffle=train, seed=seed,
                                    drop_last=train, num_shards=num_shards, shard_id=shard_id)
        self.prepare = prepare or _default_prepare(spec)
        cuda = spec.device.type == "cuda"
        if train and collate is collate_skip:
            collate = functools.partial(collate_skip, fill_to=batch_size)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, collate_fn=_NamedSkips(collate),
            pin_memory=cuda if pin_memory is None else pin_memory,
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
            drop_last=False,  # the sampler already trimmed to whole batches for training
            # Its own generator: otherwise each new iterator draws its base seed from the global RNG, and a
            # resumed run (fresh persistent workers) would shift dropout and init randomness.
            generator=torch.Generator().manual_seed(seed),
        )
        self._stream = torch.cuda.Stream(spec.device) if cuda else None

    def __len__(self) -> int:
        n = len(self.sampler)
        return -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def skip_batches(self, n: int) -> None:
        """Start the next iteration ``n`` batches into the epoch without decoding them (resume mid-epoch).
        Augmentation is seeded per sample, so the batches after the skip are the ones a full pass yields."""
        self.sampler.start = n * self.batch_size

    def _decoded(self) -> Iterator[Any]:
        """The DataLoader's CPU batches; files that failed are recorded (and may stop the run), empty batches
        dropped."""
        self._bad.start_epoch(self.sampler.epoch)
        drawn = decoded = 0
        try:
            for out in self.loader:
                drawn += 1
                for path, reason in out["skipped"]:
                    self._bad.add(path, reason)
                if out["batch"] is not None:
                    decoded += 1
                    yield out["batch"]
            if drawn and not decoded:
                raise self._bad.none_decoded(self._split)
        except BadDataError:
            # The run stops: end the workers now. Reached only through the exception's traceback, they would be
            # left to the cycle collector, whose shutdown waits 5 s per worker.
            self.close()
            raise

    def __iter__(self) -> Iterator[Batch]:
        batches = self._decoded()
        if self._stream is None:
            for b in batches:
                yield self.prepare(b)
            return
        # Side-stream prefetch: copy + normalize batch k+1 while the step runs on batch k.
        stream, pending = self._stream, None
        for b in batches:
            with torch.cuda.stream(stream):
                nxt = self.prepare(b)
            if pending is not None:
                yield pending
            main = torch.cuda.current_stream(self.spec.device)
            main.wait_stream(stream)
            for t in (nxt.inputs, nxt.targets):
                t.record_stream(main)  # the caching allocator must not reuse these while the step reads them
            pending = nxt
        if pending is not None:
            yield pending

    def close(self) -> None:
        # Dropping the iterator shuts persistent workers down.
        self.loader = None  # type: ignore[assignment]
