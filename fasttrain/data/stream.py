"""Streaming remote tar shards: each shard read once, in order, over the network, never stored.

A split whose paths are member addresses of shards given by URL (``data.stream`` kept them remote, see
:mod:`fasttrain.data.shards`) is read as WebDataset and DALI's webdataset reader read shards, and with their
semantics:

- **Shards per process.** An epoch's shard list is shuffled by (seed, epoch) (training; evaluation keeps the
  listed order), then split by rank (``shards[rank::world]``, WebDataset's ``split_by_node``) and by DataLoader
  worker (``[worker::workers]``, ``split_by_worker``). Each process reads a disjoint set of shards.
- **Samples.** A worker opens each of its shards once (one HTTP GET, or fsspec's ``open`` for an object store),
  reads the tar sequentially and groups consecutive members by key (the name up to the first dot of its last
  part, as WebDataset does). Only the split's samples are kept (a held-out validation sample lives in a
  training shard); their targets are the split's (from the shard index), so nothing is parsed from the stream.
- **Shuffle buffer** (training): ``data.shuffle_buffer`` undecoded samples per worker, filled before the first
  one leaves (DALI's ``initial_fill``), then each new sample takes the place of a random one, which leaves; the
  rest leave in random order when the stream ends. Seeded by (seed, epoch, rank, worker).
- **Decode.** A sample's members are handed to the split's map-style dataset (:func:`fasttrain.data.files.holding`)
  under their index in the split: the same decode, validation and per-(seed, epoch, index) augmentation as a
  local shard's, and a member that cannot be decoded is named ``url:member`` and skipped the same way. A sample
  the stream lacks is named and skipped too, never fatal on its own. A stream that breaks off (or ends short of
  the shard's indexed size) is opened again, with a growing pause, and read on past the samples it gave; one that
  gives nothing for :data:`RETRY_S` stops the run with an error naming it (the network or server is down).
- **Batches.** A worker batches its own samples. Training keeps full batches only (a worker's last < batch
  samples are dropped, WebDataset's ``batched(partial=False)``); evaluation yields the last partial one.

:class:`ShardStream` is the ``IterableDataset``; the torch loader (:mod:`fasttrain.data.torch_loader`) fixes
the epoch's length and resumes (:class:`~fasttrain.data.torch_loader.StreamTorchLoader`, :func:`ghost_batches`).
"""

from __future__ import annotations

import http.client
import logging
import random
import tarfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from fasttrain.data.files import SEP, address, holding, is_remote_address, known_index, split_address
from fasttrain.data.samples import Skip
from fasttrain.data.sources import Split

log = logging.getLogger(__name__)

__all__ = ["ShardStream", "StreamPlan", "ghost_batches", "is_streamed", "shuffled"]

_READ_BLOCK = 1 << 20


def is_streamed(split: Split) -> bool:
    """Whether ``split``'s samples include members of remote shards (read by streaming on the torch loader). Any
    one decides: a root whose remote shards lack an index has those downloaded (``data.stream = auto``), and the
    split then mixes local and remote shards; the stream reads the local ones from disk, in the same order."""
    if not len(split) or SEP not in split.paths[0]:
        return False  # files, or a dataset index's view: not shard members (and not to be listed whole)
    return any(is_remote_address(p) for p in split.paths)


def _key(member: str) -> str:
    """WebDataset's sample key: the name up to the first dot of its last path part."""
    folder, _, base = member.rpartition("/")
    stem = base.partition(".")[0]
    return f"{folder}/{stem}" if folder else stem


@dataclass(frozen=True)
class StreamPlan:
    """A split's shards and, per shard, the samples wanted from it: key -> (index in the split, input member)."""

    shards: tuple[str, ...]
    wanted: dict[str, dict[str, tuple[int, str]]]

    @classmethod
    def of(cls, split: Split) -> StreamPlan:
        wanted: dict[str, dict[str, tuple[int, str]]] = {}
        for i, path in enumerate(split.paths):
            parts = split_address(path)
            if parts is None:
                raise ValueError(f"{path} is no member of a shard: a split is streamed only when all of it is")
            shard, member = parts
            wanted.setdefault(shard, {})[_key(member)] = (i, member)
        return cls(tuple(wanted), wanted)

    def count(self, shard: str) -> int:
        return len(self.wanted[shard])

    def epoch_shards(self, seed: int, epoch: int, shuffle: bool) -> list[str]:
        """Every shard of the epoch in reading order: shuffled by (seed, epoch) for training."""
        order = list(self.shards)
        if shuffle:
            random.Random(f"fasttrain-shards/{seed}/{epoch}").shuffle(order)
        return order

    def worker_shards(
        self, seed: int, epoch: int, shuffle: bool, rank: int, world: int, worker: int, workers: int
    ) -> list[str]:
        """The shards one DataLoader worker of one process reads this epoch (split by rank, then by worker)."""
        return self.epoch_shards(seed, epoch, shuffle)[rank::world][worker::workers]


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer of ``size`` items, filled before the first leaves; ``size`` <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        k = rng.randrange(size)
        out, buf[k] = buf[k], it
        yield out
    while buf:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


_Item = tuple[int, str, "dict[str, bytes] | str"]
"""(index in the split, input member address, the sample's members {address: bytes} or why it is missing)."""


RETRY_S = 120.0
"""How long a shard's stream may keep failing without giving a sample before the run stops with an error that
names it (a network or server down): retried meanwhile with a backoff of 0.5 s doubling to 10 s. An object
store's throttling (503 SlowDown) or a refused connection lasts seconds, not minutes."""
_BROKEN = (OSError, EOFError, tarfile.TarError, http.client.HTTPException)
"""A stream that broke: URLError and HTTPError (OSErrors), a cut connection (IncompleteRead), a damaged tar."""


class StreamUnavailable(RuntimeError):
    """A shard's stream failed for :data:`RETRY_S` without giving a sample: not a bad sample, the source is
    down; the run stops (it resumes from its last checkpoint)."""


_TAR_TRIES = 3
"""Reads of a shard that fail as a damaged tar, one after another with no sample between, before it is taken
as damaged: a cut connection also ends a tar early (ReadError), so the first few are read again."""


def _lasting(e: BaseException, tar_fails: int) -> bool:
    """Whether reading the shard again cannot help: a tar that failed :data:`_TAR_TRIES` times in a row at the
    same place, or an HTTP client error (404 Not Found, 403 Forbidden; not 408 Request Timeout or 429 Too Many
    Requests, which are the server asking for patience)."""
    import urllib.error

    if isinstance(e, tarfile.TarError):
        return tar_fails >= _TAR_TRIES
    return isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429)


def read_shard(url: str, wanted: dict[str, tuple[int, str]], opener: Callable[[str], Any]) -> Iterator[_Item]:
    """The wanted samples of the shard at ``url``, in the shard's order, read in one sequential pass. A stream
    that breaks off is opened again, with a growing pause, and read on past the samples already yielded, so the
    order is the same; one that keeps failing for :data:`RETRY_S` without a new sample raises
    :class:`StreamUnavailable`. A damaged shard (a tar that fails again where it failed) or a client error
    (404) is not retried further: its samples still missing follow, each with the reason (named and skipped
    like bad files)."""
    seen: set[str] = set()
    why = "not in the shard's stream"
    pause, since, tar_fails = 0.5, time.monotonic(), 0
    while True:
        had = len(seen)
        try:
            yield from _read_once(url, wanted, opener, seen)
            why = "not in the shard's stream"
            break
        except _BROKEN as e:
            why = f"the shard's stream broke off ({type(e).__name__}: {e})"
            if len(seen) > had:  # it gave samples: a new outage starts its own clock
                pause, since, tar_fails = 0.5, time.monotonic(), 0
            tar_fails = tar_fails + 1 if isinstance(e, tarfile.TarError) else 0
            if _lasting(e, tar_fails):
                log.warning("shard %s: %s", url, why)
                break
            waited = time.monotonic() - since
            if waited + pause > RETRY_S:
                raise StreamUnavailable(
                    f"shard {url}: no sample for {waited:.0f} s ({why}); the network or the server is down, "
                    f"{len(seen)} of its {len(wanted)} samples read; the run resumes from its last checkpoint"
                ) from e
            log.warning("shard %s: %s; reading it again past %d samples in %.1f s", url, why, len(seen), pause)
            time.sleep(pause)
            pause = min(2 * pause, 10.0)
    for key in sorted(set(wanted) - seen, key=lambda k: wanted[k][0]):
        index, member = wanted[key]
        yield index, address(url, member), why


class _Counted:
    """A binary stream that counts the bytes read through it."""

    def __init__(self, raw: Any):
        self.raw, self.n = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.n += len(data)
        return data

    def drain(self) -> int:
        """Read to the end (the tar's padding after its end blocks); the bytes read in all."""
        while self.read(_READ_BLOCK):
            pass
        return self.n


def _expected_size(url: str, raw: Any) -> int | None:
    """The shard's size: its index's, else the server's Content-Length, else unknown."""
    idx = known_index(url)
    if idx is not None and idx.size is not None:
        return idx.size
    length = getattr(raw, "headers", {}).get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _read_once(url: str, wanted: dict[str, tuple[int, str]], opener: Callable[[str], Any], seen: set[str]):
    """One sequential read of the shard: its wanted samples not in ``seen`` (added as they are yielded). A
    stream that ends short of the shard's size raises EOFError (a closed connection can end a tar cleanly at a
    member's boundary: urllib does not tell)."""
    with opener(url) as raw:
        counted = _Counted(raw)
        last = yield from _members(url, wanted, seen, counted)
        size, got = _expected_size(url, raw), counted.drain()
        if size is not None and got < size:
            raise EOFError(f"the stream ended after {got} of its {size} bytes")
    if last is not None:  # only now: a cut stream may have lost the end of the last sample
        seen.add(last[0])
        yield _item(url, wanted[last[0]], last[1])


def _members(
    url: str, wanted: dict[str, tuple[int, str]], seen: set[str], raw: _Counted
) -> Generator[_Item, None, tuple[str, dict[str, bytes]] | None]:
    """The wanted samples not in ``seen`` but the last, which is returned as (key, its members)."""
    group: dict[str, bytes] = {}
    current: str | None = None
    with tarfile.open(fileobj=cast(Any, raw), mode="r|", bufsize=_READ_BLOCK) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key = _key(m.name)
            if key != current:
                if current is not None and current in wanted and current not in seen:
                    seen.add(current)
                    yield _item(url, wanted[current], group)
                current, group = key, {}
            if key in wanted and key not in seen:
                f = tar.extractfile(m)
                group[address(url, m.name)] = f.read() if f is not None else b""
    return (current, group) if current is not None and current in wanted and current not in seen else None


def _item(url: str, want: tuple[int, str], group: dict[str, bytes]) -> _Item:
    index, member = want
    where = address(url, member)
    return index, where, group if where in group else "its input member is not in the shard's stream"


class ShardStream(IterableDataset):
    """An epoch of a streamed split for one process (rank ``shard_id`` of ``num_shards``): batches, each as
    ``collate`` makes it from decoded samples and :class:`~fasttrain.data.samples.Skip` items.

    Set before each iteration (a DataLoader starts its workers at ``iter()``, and they copy these): ``epoch``;
    ``ghosts``: per worker, how many of its first batches to read but not decode (resuming mid-epoch), yielded
    as ``{"ghost": True}`` so the DataLoader's round robin over the workers keeps its order."""

    def __init__(
        self,
        split: Split,
        dataset: Dataset,
        opener: Callable[[str], Any],
        *,
        batch_size: int,
        train: bool,
        seed: int,
        buffer: int,
        num_shards: int = 1,
        shard_id: int = 0,
        collate: Callable[[Sequence], Any],
    ):
        self.plan = StreamPlan.of(split)
        self.dataset, self.opener, self.collate = dataset, opener, collate
        self.batch_size, self.train, self.seed, self.buffer = batch_size, train, seed, buffer
        self.num_shards, self.shard_id = num_shards, shard_id
        self.epoch = 0
        self.ghosts: list[int] = []

    def samples_per_worker(self, epoch: int, workers: int, rank: int | None = None) -> list[int]:
        """Samples each worker of process ``rank`` (default: this one) reads in ``epoch``."""
        return self.samples_per_rank_and_worker(epoch, workers)[self.shard_id if rank is None else rank]

    def samples_per_rank_and_worker(self, epoch: int, workers: int) -> list[list[int]]:
        """Per process, the samples each of its workers reads in ``epoch`` (the shard order drawn once)."""
        order, w = self.plan.epoch_shards(self.seed, epoch, self.train), max(1, workers)
        ranks = [order[r :: self.num_shards] for r in range(self.num_shards)]
        return [[sum(self.plan.count(s) for s in mine[k::w]) for k in range(w)] for mine in ranks]

    def batches_per_worker(self, epoch: int, workers: int, rank: int | None = None) -> list[int]:
        """Batches each worker yields in one pass: full ones only for training, the partial last one too else."""
        return self.batches_of(self.samples_per_worker(epoch, workers, rank))

    def batches_of(self, samples: list[int]) -> list[int]:
        """Per worker holding ``samples``, the batches it yields (see :meth:`batches_per_worker`)."""
        b = self.batch_size
        return [c // b for c in samples] if self.train else [-(-c // b) for c in samples]

    def _shards(self, epoch: int, rank: int, worker: int, workers: int) -> list[str]:
        return self.plan.worker_shards(self.seed, epoch, self.train, rank, self.num_shards, worker, max(1, workers))

    def _items(self, shards: list[str]) -> Iterator[_Item]:
        for url in shards:
            yield from read_shard(url, self.plan.wanted[url], self.opener)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, b = self.epoch, self.batch_size
        items = self._items(self._shards(epoch, self.shard_id, worker, workers))
        if self.train:
            rng = random.Random(f"fasttrain-stream/{self.seed}/{epoch}/{self.shard_id}/{worker}")
            items = shuffled(items, self.buffer, rng)
        ghosts = self.ghosts[worker] if worker < len(self.ghosts) else 0
        batch: list[_Item] = []
        for it in items:
            batch.append(it)
            if len(batch) == b:
                yield self._batch(batch, epoch, ghost=ghosts > 0)
                ghosts, batch = ghosts - 1, []
        if batch and not self.train:
            yield self._batch(batch, epoch, ghost=ghosts > 0)

    def _batch(self, items: list[_Item], epoch: int, ghost: bool) -> Any:
        if ghost:
            return {"ghost": True}
        return self.collate([self._decode(it, epoch) for it in items])

    def _decode(self, item: _Item, epoch: int) -> Any:
        index, where, members = item
        if isinstance(members, str):
            return Skip(where, members)
        with holding(members):
            return self.dataset[(index, epoch)]


def ghost_batches(per_worker: Sequence[int], n: int) -> list[int]:
    """How many of each worker's first batches make up the first ``n`` batches a DataLoader yields: it takes one
    from each worker in turn, leaving out a worker once its batches are spent (``per_worker``: each one's count)."""
    taken = [0] * len(per_worker)
    left = n
    while left > 0:
        progressed = False
        for w, count in enumerate(per_worker):
            if left and taken[w] < count:
                taken[w] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return taken
