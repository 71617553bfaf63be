"""The torch/PIL backend: DataLoader workers decode and augment on the CPU, the device normalizes.

It is the best a CPU loader can be: uint8 batches (4x fewer bytes than float), pinned memory, persistent
workers, prefetching, and (on CUDA) the host-to-device copy and normalization on a side stream one batch
ahead of the step, as timm's PrefetchLoader does. Augmentation randomness is derived from (seed, epoch,
index), so a resumed run and an uninterrupted one see the same crops whatever the worker count. The order (and
its shards under torchrun) is :class:`~fasttrain.data.order.EpochSampler`'s; the datasets are those of
:mod:`fasttrain.data.samples` (both re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from fasttrain.config import Config, DataConfig, default_workers
from fasttrain.data.base import (
    Backend,
    Batch,
    InputSpec,
    LoaderRequest,
    RunSamples,
    epoch_order,
    model_input,
    normalize_on_device,
)
from fasttrain.data.checks import BadDataError, BadFiles
from fasttrain.data.order import EpochSampler, sample_seed
from fasttrain.data.progressive import train_sizes
from fasttrain.data.samples import ImageDataset, Skip, dataset_for, precheck_samples
from fasttrain.data.stream import ShardStream, ghost_batches, is_streamed
from fasttrain.data.user import DatasetSplit, dataset_refusal
from fasttrain.stop import ignore_stop_signals

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "EpochSampler",
    "ImageDataset",
    "Skip",
    "StreamTorchLoader",
    "collate_skip",
    "TorchLoader",
    "sample_seed",
]


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
    to the loader, which records them); the wrapped function sees None in their place. ``refusals``: a file the
    header rules refused (:attr:`Skip.refused`, one the pre-check left unchecked) is not counted against
    ``data.max_bad_per_epoch``; False (a stream, which has no pre-check) counts every skip."""

    def __init__(self, collate: Callable, refusals: bool = True):
        self.collate, self.refusals = collate, refusals

    def __call__(self, items: Sequence) -> dict[str, Any]:
        skips = [(it.path, it.reason, it.refused and self.refusals) for it in items if isinstance(it, Skip)]
        return {"batch": self.collate([None if isinstance(it, Skip) else it for it in items]), "skipped": skips}


def _default_prepare(spec: InputSpec) -> Callable:
    scale_shift = spec.scale_shift()

    def prepare(cpu_batch) -> Batch:
        x, y = cpu_batch  # uint8 pixels from fasttrain's datasets; float from a dataset that normalized them
        inputs = model_input(x, spec, pixels=x.dtype == torch.uint8, scale_shift=scale_shift)
        return Batch(inputs, y.to(spec.device, non_blocking=True))

    return prepare


class _IndexKeys(Dataset):
    """A dataset indexed by plain ints behind the loader's ``(index, epoch)`` keys."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[key[0]]


class TorchLoader:
    """A DataLoader behind the loader contract; ``prepare`` turns a CPU batch into a device Batch.

    ``skipped``: (path, reason) of files already left out (the pre-check's); files that fail to decode during
    the run are added (a dataset reports them by returning :class:`Skip`). More than ``max_bad_per_epoch`` new
    ones in one epoch, or an epoch in which nothing decodes, raise :class:`~fasttrain.data.checks.BadDataError`.
    ``epoch_keys``: the dataset takes ``(index, epoch)`` keys (fasttrain's, which seed augmentation per sample);
    False for a plain map-style dataset indexed by int.
    """

    order = ""
    """Nothing beyond (seed, epoch): see :attr:`fasttrain.data.base.Loader.order`."""

    def __init__(
        self,
        dataset: Dataset,
        spec: InputSpec,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        workers: int,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        prepare: Callable[[Any], Batch] | None = None,
        collate: Callable = collate_skip,
        num_shards: int = 1,
        shard_id: int = 0,
        skipped: list[tuple[str, str]] | None = None,
        max_bad_per_epoch: int = 10,
        split: str | None = None,
        epoch_keys: bool = True,
    ):
        if not epoch_keys:  # a plain map-style dataset: dataset[i], its own randomness
            dataset = _IndexKeys(dataset)
        self.spec = spec
        self.batch_size = batch_size
        self.train = train
        self.num_samples = len(cast(Sized, dataset))
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self._bad = BadFiles(self.skipped, max_bad_per_epoch)
        self._split = split or ("train" if train else "evaluation")
        self.sampler = epoch_order(self.num_samples, batch_size, train, seed, num_shards, shard_id)
        self.prepare = prepare or _default_prepare(spec)
        cuda = spec.device.type == "cuda"
        if train and collate is collate_skip:
            collate = functools.partial(collate_skip, fill_to=batch_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_NamedSkips(collate),
            pin_memory=cuda if pin_memory is None else pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
            drop_last=False,  # the sampler already trimmed to whole batches for training
            # Its own generator: otherwise each new iterator draws its base seed from the global RNG, and a
            # resumed run (fresh persistent workers) would shift dropout and init randomness.
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
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

    def _epoch(self) -> int:
        return self.sampler.epoch

    def _outputs(self) -> Iterator[dict[str, Any]]:
        """The DataLoader's batches of one epoch, each with the files it skipped."""
        return iter(self.loader)

    def _decoded(self) -> Iterator[Any]:
        """The DataLoader's CPU batches; files that failed are recorded (and may stop the run).

        A batch in which no file decoded is dropped in evaluation. In training the next batch that decodes is
        yielded once more in its place: every process of a torchrun job must take the same number of steps
        (each step all-reduces gradients), and each reads its own shard, so one process dropping a batch
        would leave the others waiting for ever."""
        self._bad.start_epoch(self._epoch())
        drawn = decoded = owed = 0
        last: Any = None
        try:
            for out in self._outputs():
                drawn += 1
                for path, reason, refused in out["skipped"]:
                    # refused by the header rules: a file left unchecked at start, skipped as the pre-check
                    # would have skipped it, not counted against max_bad_per_epoch
                    self._bad.add(path, reason, counted=not refused)
                if out["batch"] is None:
                    owed += self.train
                    continue
                decoded += 1
                last = out["batch"]
                for _ in range(1 + owed):
                    yield last
                owed = 0
            if drawn and not decoded:
                raise self._bad.none_decoded(self._split)
            if owed:  # the epoch's last batches failed: the last one that decoded stands in
                log.warning(
                    "%d training batch(es) at the end of the epoch had no decodable file: the previous "
                    "batch repeats in their place",
                    owed,
                )
                for _ in range(owed):
                    yield last
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


def _as_is(out: Any) -> Any:
    """The DataLoader's collate for a stream whose workers already batch (module-level: workers may pickle it)."""
    return out


class StreamTorchLoader(TorchLoader):
    """The torch loader over a streamed split (remote shards, :class:`~fasttrain.data.stream.ShardStream`).

    **Epoch length.** Training takes ``samples // (batch x processes)`` batches on every process, as from local
    data, whatever its shards hold (data-parallel processes must take the same number of steps): a process whose
    shards hold more drops the rest of its stream; one whose shards hold fewer starts its stream over and takes
    the batches it lacks from its beginning (a few samples are seen twice). Evaluation reads every sample once;
    processes may take different numbers of batches (its sums are all-reduced).

    **Resume.** ``skip_batches(n)`` restarts the epoch's stream at its start and reads, without decoding, the
    batches already trained: the batches after it are those of the uninterrupted epoch, bit for bit, given the
    same seed, number of processes and ``data.workers`` (each worker reads its own shards and buffer)."""

    def __init__(
        self,
        stream: ShardStream,
        spec: InputSpec,
        *,
        workers: int,
        prefetch: int = 2,
        seed: int = 0,
        prepare: Callable[[Any], Batch] | None = None,
        max_bad_per_epoch: int = 10,
        split: str | None = None,
    ):
        self.stream, self.spec = stream, spec
        self.batch_size, self.train = stream.batch_size, stream.train
        self.num_samples = sum(stream.plan.count(s) for s in stream.plan.shards)
        self.skipped: list[tuple[str, str]] = []
        self._bad = BadFiles(self.skipped, max_bad_per_epoch)
        self._split = split or ("train" if self.train else "evaluation")
        self.prepare = prepare or _default_prepare(spec)
        per_process = -(-len(stream.plan.shards) // stream.num_shards)
        self.workers = min(workers, per_process)  # a worker without a shard would only take a process
        self.order = (
            f"a streamed root read by {stream.num_shards} process(es) of {self.workers} worker(s), "
            f"data.shuffle_buffer = {stream.buffer}"
        )
        self._epoch_no = self._skip = 0
        if self.train and len(stream.plan.shards) < stream.num_shards:
            raise ValueError(
                f"the {self._split} split streams {len(stream.plan.shards)} shard(s) to {stream.num_shards} "
                f"processes: each needs at least one (pack smaller shards, or set data.stream = off)"
            )
        if self.train and len(self) == 0:
            raise ValueError(
                f"train.batch_size: the {self._split} split has {self.num_samples} samples, fewer than one batch "
                f"of {self.batch_size} x {stream.num_shards} processes; lower train.batch_size"
            )
        cuda = spec.device.type == "cuda"
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=cuda,
            persistent_workers=False,  # each pass starts workers that copy the stream's epoch and skips
            prefetch_factor=prefetch if self.workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )
        self._stream = torch.cuda.Stream(spec.device) if cuda else None

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.batch_size * self.stream.num_shards)
        return sum(self.stream.batches_per_worker(self._epoch_no, self.workers))

    def set_epoch(self, epoch: int) -> None:
        self._epoch_no = epoch

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def _epoch(self) -> int:
        return self._epoch_no

    def _pass_batches(self, epoch: int) -> list[int]:
        """This process's batches per worker in one pass of ``epoch``; ValueError (on every process alike) when
        some process's pass holds not one full batch."""
        st = self.stream
        every = [st.batches_of(n) for n in st.samples_per_rank_and_worker(epoch, self.workers)]
        if self.train:
            for rank, per in enumerate(every):
                if sum(per) == 0:
                    raise ValueError(
                        f"epoch {epoch}: no DataLoader worker of process {rank} reads a full batch of "
                        f"{self.batch_size} from its shards; lower data.workers or the batch size, or pack "
                        f"smaller shards"
                    )
        return every[st.shard_id]

    def _outputs(self) -> Iterator[dict[str, Any]]:
        epoch, taken, self._skip = self._epoch_no, self._skip, 0
        self.stream.epoch = epoch
        per = self._pass_batches(epoch)
        total, passes = sum(per), 0
        want = len(self) if self.train else total
        while taken < want:
            if passes == 1:
                log.info(
                    "epoch %d: this process's shards hold %d of its %d batches; its stream starts over",
                    epoch,
                    total,
                    want,
                )
            self.stream.ghosts = ghost_batches(per, taken % total)
            passes += 1
            for out in self.loader:
                if out.get("ghost"):
                    continue
                yield out
                taken += 1
                if taken >= want:
                    break


class TorchBackend(Backend):
    """``data.loader = torch``: serves every kind of sample (files and datasets from Python); ``auto``'s fallback."""

    name = "torch"
    rank = 0

    def build(self, request: LoaderRequest, cfg: Config, spec: InputSpec) -> TorchLoader:
        """The shared pre-check, then the kind's dataset decoded by ``data.workers`` processes. Pairs are
        normalized on the device, both images alike. A dataset from Python is read as it is, item by item."""
        samples, d = request.samples, cfg.data
        common: dict[str, Any] = dict(
            batch_size=request.batch_size,
            train=request.train,
            seed=cfg.runtime.seed,
            workers=d.workers_for(spec.device.type),
            prefetch=d.prefetch,
            num_shards=request.num_shards,
            shard_id=request.shard_id,
            max_bad_per_epoch=d.max_bad_per_epoch,
            split=samples.split.name,
        )
        if samples.kind == "dataset":  # its own randomness: plain int keys
            items = cast(DatasetSplit, samples.split).items()
            return TorchLoader(items, spec, **common, epoch_keys=False)
        if is_streamed(samples.split):
            return _stream_loader(request, cfg, spec)
        # The same pre-check as DALI and the cache: every backend samples from the same files, in the same order.
        checked = precheck_samples(samples, d, threads=max(1, d.num_workers))
        sizes = train_sizes(cfg) if request.train else None  # progressive resizing: each key's epoch, its size
        ds = dataset_for(
            checked.samples, d, cfg.runtime.seed, train=request.train, sizes=sizes, unchecked=checked.unchecked
        )
        prepare = _pair_prepare(spec) if samples.kind == "pair" else None
        return TorchLoader(ds, spec, **common, prepare=prepare, skipped=checked.bad)

    def serves(self, run: RunSamples, cfg: Config, device: torch.device) -> tuple[bool, str]:
        refusal = dataset_refusal(cfg.data) if run.kind == "dataset" else ""
        return not refusal, refusal

    def fits(
        self, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None = None
    ) -> tuple[bool, str]:
        if run.kind == "dataset":
            return True, "the torch loader reads the items every epoch"
        if is_streamed(run.train.split):
            return True, "the torch loader streams the remote shards"
        if cfg.data.rand_augment:
            return True, "the torch loader augments PIL images"
        return True, "the torch loader decodes on the CPU"

    def knobs(self, data: DataConfig, device_type: str) -> list[dict[str, Any]]:
        """Worker processes: the config's own, then a quarter, half and all of the machine's share."""
        w = default_workers(device_type)
        counts = sorted({max(1, w // 4), max(1, w // 2), w})
        return self.ladder(
            {"workers": data.workers},
            [{"workers": n} for n in counts],
            lambda s: dataclasses.replace(data, **s).workers_for(device_type),
        )

    def queue_depth(self, data: DataConfig) -> int:
        """Each worker process keeps ``data.prefetch`` batches ready; none without workers."""
        return data.prefetch * max(1, data.num_workers) if data.num_workers > 0 else 0


def _stream_loader(request: LoaderRequest, cfg: Config, spec: InputSpec) -> StreamTorchLoader:
    """A streamed split (remote shards): no pre-check (it would read every member); each sample is validated as
    it is decoded, by the dataset every split of its kind uses."""
    from fasttrain.data.shards import open_url

    samples, d, seed = request.samples, cfg.data, cfg.runtime.seed
    sizes = train_sizes(cfg) if request.train else None
    ds = dataset_for(samples, d, seed, train=request.train, sizes=sizes, checked=True)
    collate = functools.partial(collate_skip, fill_to=request.batch_size) if request.train else collate_skip
    stream = ShardStream(
        samples.split,
        ds,
        open_url,
        batch_size=request.batch_size,
        train=request.train,
        seed=seed,
        buffer=d.shuffle_buffer,
        num_shards=request.num_shards,
        shard_id=request.shard_id,
        collate=_NamedSkips(collate, refusals=False),
    )
    return StreamTorchLoader(
        stream,
        spec,
        workers=d.workers_for(spec.device.type),
        prefetch=d.prefetch,
        seed=seed,
        prepare=_pair_prepare(spec) if samples.kind == "pair" else None,
        max_bad_per_epoch=d.max_bad_per_epoch,
        split=samples.split.name,
    )


def _pair_prepare(spec: InputSpec) -> Callable[[Any], Batch]:
    scale_shift = spec.scale_shift()

    def prepare(cpu_batch) -> Batch:
        a, b = cpu_batch
        return Batch(normalize_on_device(a, spec, scale_shift), normalize_on_device(b, spec, scale_shift))

    return prepare


BACKEND = TorchBackend()
