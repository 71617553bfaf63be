"""torch.distributed set-up from torchrun's environment: ranks, the process group, rank-0 helpers.

fasttrain never launches processes itself: ``torchrun`` (``torch.distributed.run``) starts one process per GPU
and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` and, for
restarts, ``TORCHELASTIC_RUN_ID`` and ``TORCHELASTIC_RESTART_COUNT``. Without them everything is one process
and nothing here does anything. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fasttrain.rundir import RunError

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads dist_info() before importing torch
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "dist_info",
    "init",
    "join",
    "decide",
    "generation",
    "job_token",
    "agree_generation",
    "record_failure",
    "timed_out",
    "tell_peers",
    "gather",
    "store_gather",
    "post_failure",
    "PeerFailed",
    "failure_report",
    "shutdown",
    "per_rank_batch",
    "all_reduce_sums",
    "broadcast_object",
    "all_gather_object",
    "barrier",
    "StopVote",
    "current",
    "wrap_state",
    "sync_batchnorm",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    """Global rank: the shard of the data this process reads."""
    local_rank: int = 0
    """Rank on this node: the GPU this process uses."""
    world_size: int = 1
    local_world_size: int = 1
    run_id: str = ""
    """torchrun's rendezvous id: the same for every restart of one job (empty outside torchrun)."""
    restart: int = 0
    """How many times torchrun restarted the worker group (0 on the first start)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} must be >= 0")
    return value


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """The process's place in the job, from torchrun's variables (pure: pass ``env`` to test it)."""
    env = os.environ if env is None else env
    world = _int(env, "WORLD_SIZE", 1)
    info = DistInfo(
        rank=_int(env, "RANK", 0),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=max(world, 1),
        local_world_size=max(_int(env, "LOCAL_WORLD_SIZE", world), 1),
        run_id=env.get("TORCHELASTIC_RUN_ID", ""),
        restart=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
    )
    if info.rank >= info.world_size:
        raise ValueError(f"environment: RANK={info.rank} is not below WORLD_SIZE={info.world_size}")
    if info.local_rank >= info.local_world_size:
        raise ValueError(
            f"environment: LOCAL_RANK={info.local_rank} is not below LOCAL_WORLD_SIZE={info.local_world_size}"
        )
    return info


_CURRENT = DistInfo()


def current() -> DistInfo:
    """This process's DistInfo once :func:`init` ran (one process otherwise)."""
    return _CURRENT


def init(device_type: str, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (no-op for one process). On CUDA the process takes GPU ``LOCAL_RANK``
    first (NCCL binds to the current device), so ``runtime.device = auto`` resolves to it. ``timeout_s``
    (``dist.timeout_s``): how long a rank waits on the others, to join and in every collective."""
    global _CURRENT
    info = dist_info()
    if not info.enabled:
        _CURRENT = info
        return info
    import torch.distributed as dist

    if dist.is_initialized():
        _CURRENT = info
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        import torch

        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"environment: LOCAL_RANK={info.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPUs (torchrun --nproc-per-node too large?)"
            )
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    # torchrun's store outlives a restart of the worker group: the ranks of a new attempt would read the dead
    # attempt's addresses under the default keys and fail to connect. Each attempt gets its own key prefix, the
    # attempt's number agreed through the store (each node's agent counts its own restarts: they differ).
    store = join(timeout_s)
    gather("ready", None, timeout_s)  # a rank that failed before joining is named, not waited for
    pg_store = dist.PrefixStore(f"fasttrain/attempt-{_JOINED.generation}", store)
    _import_world_defaults()
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, store=pg_store, rank=info.rank, world_size=info.world_size, timeout=timeout, **kwargs
    )
    _CURRENT = info
    _JOINED.timeout_s = timeout_s
    log.info(
        "rank %d of %d (local %d) joined the %s process group", info.rank, info.world_size, info.local_rank, backend
    )
    return info


_WORLD_DEFAULTS = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
)
"""torch modules whose functions take ``group=dist.group.WORLD`` as a default argument, evaluated when the
module is imported. Imported after ``init_process_group`` (DistributedDataParallel's constructor imports
torch._dynamo, which imports the first), they keep the default process group for good: ``destroy_process_group``
then leaves gloo's threads running into the interpreter's end, and a gloo thread that drops a collective's
last tensors then needs the GIL of a finalizing interpreter, which ends the thread inside a C++ destructor:
``terminate called without an active exception``, SIGABRT (tests/gloo_exit_worker.py shows it)."""


def _import_world_defaults() -> None:
    """Import :data:`_WORLD_DEFAULTS` while there is no process group (their defaults are then ``None``)."""
    import importlib

    for name in _WORLD_DEFAULTS:
        try:
            importlib.import_module(name)
        except ImportError:  # a torch without it: nothing to capture the group either
            pass


@dataclass
class _Joined:
    store: Any = None
    generation: int = 0
    """This attempt's number, the same on every rank: 1 for the job's first start, then one more per restart."""
    timeout_s: float = 0.0
    """The process group's timeout (dist.timeout_s), once it exists."""
    job: str = ""
    """A token of this torchrun job (its store), the same on every rank and every restart of the job, another
    for a later job that reuses the rendezvous id."""


_JOINED = _Joined()
_DECIDED: dict[str, int] = {}

_GEN, _JOB = "fasttrain/generation", "fasttrain/job"


def join(timeout_s: float = 1800.0) -> Any:
    """torchrun's store, and this attempt's :func:`generation` and :func:`job_token` (agreed by every rank),
    before the process group exists: what rank 0 decides then (:func:`decide`) goes through it."""
    global _JOINED
    if _JOINED.store is not None:
        return _JOINED.store
    import torch.distributed as dist

    info = dist_info()
    timeout = datetime.timedelta(seconds=min(timeout_s, 10**9))  # decide(..., math.inf) may be the first to join
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    gen = agree_generation(store, info.rank, info.world_size, timeout_s)
    if info.rank == 0 and not store.check([_JOB]):  # the first attempt (or one whose rank 0 died before this)
        store.set(_JOB, uuid.uuid4().hex)
    _JOINED = _Joined(store, gen, job=_store_get(store, _JOB, timeout_s).decode())
    return store


def generation() -> int:
    """This attempt's number (1: the job's first start); 0 outside torchrun or before :func:`join`."""
    return _JOINED.generation


def job_token() -> str:
    """This torchrun job's token (see :class:`_Joined`); empty outside torchrun or before :func:`join`."""
    return _JOINED.job


def _store_get(store: Any, key: str, timeout_s: float, prefix: str = "", world_size: int = 0, beats: str = "") -> bytes:
    """``store[key]``, waiting for it at most ``timeout_s`` (an error naming dist.timeout_s). With ``prefix``
    (an attempt's): a rank that stopped with an error (:func:`tell_peers`) ends the wait with :class:`PeerFailed`
    naming it, as in :func:`store_gather`. With ``beats`` (a counter rank 0 raises while it works, see
    :func:`_beating`): the wait lasts as long as it needs, and ``timeout_s`` counts from the last beat."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while not store.check([key]):
        if prefix and int(store.add(f"{prefix}/failed", 0)) and not store.check([key]):
            raise PeerFailed(_failure_text(store, prefix, world_size))
        if beats:
            beat = int(store.add(beats, 0))
            if beat != last:
                last, deadline = beat, time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            said = "gave no sign of life for" if beats else "did not answer within"
            raise TimeoutError(
                f"rank {dist_info().rank}: rank 0 of the job {said} {timeout_s:g} s (dist.timeout_s): it ended, or "
                f"is stuck{'' if beats else ' before it joined'}; see its node's output"
            )
        time.sleep(0.02 if not beats else 0.1)
    return bytes(store.get(key))


@contextlib.contextmanager
def _beating(store: Any, key: str, period_s: float, progress: Callable[[], int] | None = None) -> Iterator[None]:
    """While the block runs, a thread raises the counter ``key`` every ``period_s`` (on a clone of the store: the
    way to use one from two threads): ranks waiting for a long decision (a dataset index built over minutes)
    know rank 0 is still alive, and end their wait dist.timeout_s after the beats stop (a rank 0 that died
    without a word, whose node's agent may have given up without ending the others). ``progress`` given: a beat
    is skipped when its count has not moved since the last one (rank 0 alive but stuck)."""
    done = threading.Event()
    clone = getattr(store, "clone", None)  # torch >= 2.8 has it; before, the one client serialises the calls
    beats = clone() if clone is not None else store
    seen = [progress() if progress is not None else 0]

    def beat() -> None:
        while not done.wait(period_s):
            if progress is not None:
                now = progress()
                if now == seen[0]:
                    continue
                seen[0] = now
            try:
                beats.add(key, 1)
            except Exception:  # noqa: BLE001 - a passing store error: the next beat tries again (one failure used
                pass  # to end the beats, and the others gave up dist.timeout_s later while rank 0 still worked)

    beats.add(key, 1)
    thread = threading.Thread(target=beat, name="fasttrain-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def agree_generation(store: Any, rank: int, world_size: int, timeout_s: float) -> int:
    """The attempt's number, the same on every rank, from a store that keeps the keys of earlier attempts.

    Rank 0 takes the next number; every other rank posts a fresh nonce and waits for rank 0 to answer that
    nonce with the number (an answer to an older nonce is a dead attempt's, ignored); rank 0 answers whatever
    nonce it finds until the rank confirms the new number, which no earlier attempt used. Nothing here depends
    on torchrun's restart counter, which each node's agent keeps for itself."""
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        gen = int(store.add(_GEN, 1))
        waiting = set(range(1, world_size))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"fasttrain/confirm/{r}"]) and _tail(store.get(f"fasttrain/confirm/{r}")) == gen:
                    waiting.discard(r)
                elif store.check([f"fasttrain/hello/{r}"]):
                    nonce = bytes(store.get(f"fasttrain/hello/{r}")).decode()
                    store.set(f"fasttrain/ack/{r}", f"{nonce}|{gen}")
            if waiting:
                _wait_or_fail(deadline, timeout_s, f"ranks {sorted(waiting)} did not join")
        return gen
    nonce = uuid.uuid4().hex
    store.set(f"fasttrain/hello/{rank}", nonce)
    while True:
        if store.check([f"fasttrain/ack/{rank}"]):
            got, _, gen_text = bytes(store.get(f"fasttrain/ack/{rank}")).decode().partition("|")
            if got == nonce:
                store.set(f"fasttrain/confirm/{rank}", f"{nonce}|{gen_text}")
                return int(gen_text)
        _wait_or_fail(deadline, timeout_s, "rank 0 did not answer")


def _tail(value: Any) -> int:
    try:
        return int(bytes(value).decode().rpartition("|")[2])
    except ValueError:
        return -1


def _wait_or_fail(deadline: float, timeout_s: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(
            f"rank {dist_info().rank}: {what} within {timeout_s:g} s (dist.timeout_s): a process of the job ended "
            f"or is stuck before it joined; see its node's output"
        )
    time.sleep(0.02)


class PeerFailed(RunError):
    """Another rank of the job stopped with an error before this one could go on; the message names it."""


def _where(env: Mapping[str, str] | None = None) -> str:
    import socket

    env = os.environ if env is None else env
    return f"rank {env.get('RANK', '0')} (node {env.get('GROUP_RANK', '0')}, host {socket.gethostname()})"


def tell_peers(text: str) -> None:
    """This rank stops with ``text``: said through the store, so that ranks waiting in :func:`gather` (or to
    join the process group) stop at once with it instead of waiting dist.timeout_s. Never raises."""
    if _JOINED.store is None:
        return
    try:
        post_failure(_JOINED.store, f"fasttrain/attempt-{_JOINED.generation}", dist_info().rank, text)
    except Exception:  # noqa: BLE001 - the store may be gone with the job: the error itself is what matters
        pass


def post_failure(store: Any, prefix: str, rank: int, text: str, where: str = "") -> None:
    store.set(f"{prefix}/failed/{rank}", f"{where or _where()} stopped: {text}")
    store.add(f"{prefix}/failed", 1)


def gather(name: str, obj: Any, timeout_s: float = 1800.0) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, through torchrun's store: usable before the process
    group exists and whatever its backend, and a rank that stopped with an error (:func:`tell_peers`) ends the
    wait on every rank at once with :class:`PeerFailed` naming it. ``[obj]`` outside torchrun."""
    info = dist_info()
    if not info.enabled:
        return [obj]
    store = join(timeout_s)
    _DECIDED[name] = _DECIDED.get(name, 0) + 1
    prefix = f"fasttrain/attempt-{_JOINED.generation}"
    return store_gather(store, prefix, f"{name}/{_DECIDED[name]}", info.rank, info.world_size, obj, timeout_s)


def store_gather(store: Any, prefix: str, name: str, rank: int, world_size: int, obj: Any, timeout_s: float) -> list:
    """:func:`gather` on a given store: each rank's value under ``prefix/gather/name/<rank>``, an arrival count,
    and ``prefix/failed`` watched while waiting."""
    key = f"{prefix}/gather/{name}"
    store.set(f"{key}/{rank}", pickle.dumps(obj))
    store.add(f"{key}/count", 1)
    deadline = time.monotonic() + timeout_s
    while int(store.add(f"{key}/count", 0)) < world_size:
        if int(store.add(f"{prefix}/failed", 0)):
            raise PeerFailed(_failure_text(store, prefix, world_size))
        _wait_or_fail(deadline, timeout_s, f"not every rank reached {name.rpartition('/')[0] or name!r}")
    return [pickle.loads(bytes(store.get(f"{key}/{r}"))) for r in range(world_size)]


def _failure_text(store: Any, prefix: str, world_size: int) -> str:
    said = [
        bytes(store.get(f"{prefix}/failed/{r}")).decode()
        for r in range(world_size)
        if store.check([f"{prefix}/failed/{r}"])
    ]
    return "; ".join(said) + f"; {_where()} stops with it" if said else "another rank stopped"


def _error_box(e: BaseException) -> bytes:
    """Rank 0's error for the others: its type and text (and where rank 0 runs), or a :class:`RunError` with the
    type's name and the text where the type cannot be pickled (the others would otherwise wait dist.timeout_s for
    an answer)."""
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - an exception whose str() fails still has a type
        text = ""
    # said where it was found: the others' nodes may hold what rank 0's lacks (its data.root, its run folder)
    text = f"{text} (found by {_where()}, which decides for every rank)"
    try:
        return pickle.dumps(("error", (type(e), text)))
    except Exception:  # noqa: BLE001 - a local or otherwise unpicklable exception type
        return pickle.dumps(("error", (RunError, f"{type(e).__name__}: {text}")))


def decide(
    name: str,
    fn: Callable[[], Any],
    timeout_s: float = 1800.0,
    *,
    long: bool = False,
    progress: Callable[[], int] | None = None,
) -> Any:
    """``fn()`` run by rank 0 alone, its result (a picklable value) on every rank, before the process group
    exists (through torchrun's store, once per attempt). An error raised by ``fn`` is raised on every rank, the
    same type with the same message (one clear message everywhere, instead of ranks that wait).

    ``long``: ``fn`` may take longer than ``timeout_s`` (indexing a dataset): rank 0 beats while it runs, and
    the others wait as long as the beats go on, ``timeout_s`` from the last one. ``progress``: a count that
    ``fn``'s work raises as it goes (folders listed, files checked); rank 0 beats only while it moves, so a rank 0
    frozen in one blocking call (a hung network mount), whose beat thread would go on, ends the wait too."""
    info = dist_info()
    if not info.enabled:
        return fn()
    store = join(timeout_s)
    _DECIDED[name] = _DECIDED.get(name, 0) + 1  # every rank makes the same calls: the n-th has the same key
    prefix = f"fasttrain/attempt-{_JOINED.generation}"
    key = f"{prefix}/decide/{name}/{_DECIDED[name]}"
    beats = f"{key}/beats" if long else ""
    if info.rank == 0:
        try:
            with _beating(store, beats, min(timeout_s / 4, 10.0), progress) if long else contextlib.nullcontext():
                box: tuple[str, Any] = ("ok", fn())
        except Exception as e:
            store.set(key, _error_box(e))
            raise
        try:
            answer = pickle.dumps(box)
        except Exception as e:  # said to every rank (they would wait for it), then raised here
            store.set(key, _error_box(e))
            raise
        store.set(key, answer)
        return box[1]
    kind, value = pickle.loads(_store_get(store, key, timeout_s, prefix, info.world_size, beats))
    if kind == "error":
        typ, text = value
        try:
            err = typ(text)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            err = RunError(text)
        raise err
    return value


def shutdown() -> None:
    """Leave the process group, and end it: its last reference goes here, and with it (gloo) its threads,
    which must not outlive the interpreter (see :data:`_WORLD_DEFAULTS`). A DistributedDataParallel holds the
    group: the run's objects that hold one in a reference cycle (its TrainState, on rank 0) are collected
    first, not left to a later collection."""
    global _CURRENT, _JOINED
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
    _CURRENT = DistInfo()
    _JOINED = _Joined()  # a later process group in this process agrees on a new attempt number (fresh keys)


def per_rank_batch(global_batch: int, world_size: int, name: str = "train.batch_size") -> int:
    """``global_batch / world_size``: the global batch stays the one the config names, whatever the GPU count."""
    if global_batch % world_size:
        raise ValueError(
            f"{name}: {global_batch} is not divisible by the {world_size} processes (WORLD_SIZE); "
            f"choose a multiple of {world_size}"
        )
    return global_batch // world_size


def all_reduce_sums(values: dict[str, torch.Tensor], *, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks (one collective for all of them); the identity for one process.

    ``device`` given: the ranks first agree on the keys (one small object all-gather) and a rank without some,
    or without any (an evaluation shard with no samples), adds zeros on ``device``; every rank then takes part
    in the same all-reduce. Without ``device`` every rank must hold the same keys (training windows do)."""
    info = current()
    if not info.enabled:
        return values
    import torch
    import torch.distributed as dist

    if device is not None:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, sorted(values))
        every = sorted({k for keys in gathered for k in keys})
        values = {k: values[k] if k in values else torch.zeros((), device=device) for k in every}
    if not values:
        return values
    keys = list(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return dict(zip(keys, flat.unbind()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a run folder's name, autotune's answer)."""
    if not current().enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    info = current()
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        import torch.distributed as dist

        dist.barrier()


class StopVote:
    """Whether the run stops at this optimizer step on a stop signal (:class:`fasttrain.stop.StopRequest`), the
    same answer in every process of a job: each saves the same step and leaves, where one that stopped alone
    would leave the others waiting in their next collective. (The signal reaches the processes at different
    steps, or only some of them: a signal to one node's torchrun agent, or to one process.)

    One process: the request itself, at every step. Several: every ``every`` optimizer steps each process puts
    in its signal's number (0 for none) and the largest is taken, one all-reduce of one number, whose result is
    read at the next vote: no step waits for the device (with NCCL the host runs ahead of it), and a stop comes
    ``every`` to ``2 x every`` steps after its signal, which must fit in the 30 s torchrun's agent gives its
    workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) before it kills them. :meth:`now` votes and reads at once (an epoch's
    end, where the processes wait for each other anyway). :attr:`signum` is the signal agreed to (a process may
    stop on another's); the request keeps only its own, so a signal that reaches it later is still its first
    (not the second signal that stops at once, with no save)."""

    def __init__(self, request: Any, device: torch.device, every: int = 4):
        self.request, self.every = request, every
        self.enabled = current().enabled
        self.signum: int | None = None
        """The signal the run stops on, once :meth:`at_step` or :meth:`now` said so."""
        self.device = device
        self._voted = False
        self._ballot: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # read on the host without waiting for the device
        self._counted: torch.cuda.Event | None = None

    def at_step(self, step: int) -> bool:
        """Called by every process after each optimizer step ``step``: stop here?"""
        if not self.enabled:
            return self._one(self.request.signum)
        if step % self.every:
            return False
        if self._voted and self._result():
            return True
        self._vote()
        return False

    def now(self) -> bool:
        """Stop here? Every process votes and waits for the count."""
        if not self.enabled:
            return self._one(self.request.signum)
        self._vote()
        return self._result()

    def _one(self, signum: int | None) -> bool:
        self.signum = signum or None
        return self.signum is not None

    def _vote(self) -> None:
        import torch
        import torch.distributed as dist

        if self._ballot is None:  # made at the first vote: a run without one allocates nothing
            cuda = self.device.type == "cuda"
            self._ballot = torch.zeros(1, device=self.device)
            self._seen = torch.zeros(1, pin_memory=cuda)
            self._counted = torch.cuda.Event() if cuda else None
        assert self._seen is not None
        self._ballot.fill_(float(self.request.signum or 0))  # a kernel with its argument: no host-to-device copy
        dist.all_reduce(self._ballot, op=dist.ReduceOp.MAX)
        self._seen.copy_(self._ballot, non_blocking=True)
        if self._counted is not None:
            self._counted.record()
        self._voted = True

    def _result(self) -> bool:
        if self._counted is not None:
            self._counted.synchronize()  # recorded a vote ago: done long since, unless the host ran that far ahead
        self._voted = False
        assert self._seen is not None
        return self._one(int(self._seen.item()))


def wrap_state(state: Any, runtime: Any, *, sync_bn: bool = False) -> None:
    """Under torchrun: each trained module of ``state`` wrapped in DistributedDataParallel (bucketed all-reduce
    overlapping the backward pass), compiled whole; ``state.local`` keeps the unwrapped modules for evaluation.
    One process: nothing changes. ``sync_bn`` (``model.sync_bn``): SyncBatchNorm, CUDA only."""
    if not current().enabled:
        return
    from torch.nn.parallel import DistributedDataParallel

    from fasttrain.config import ConfigError

    for name, module in state.modules.items():
        if sync_bn:
            if not runtime.is_cuda:
                raise ConfigError("model.sync_bn: SyncBatchNorm needs CUDA devices (NCCL); turn it off on CPU")
            module = sync_batchnorm(module)  # keeps the parameter objects
            state.modules[name] = module
        ddp = DistributedDataParallel(
            module, device_ids=[runtime.device.index] if runtime.is_cuda else None, gradient_as_bucket_view=True
        )
        state.ddp[name] = ddp
        state.callables[name] = runtime.compiled(ddp)
        state.local[name] = runtime.for_eval(module, runtime.compiled(module))


def sync_batchnorm(module: Any) -> Any:
    """``module`` with its BatchNorm layers made SyncBatchNorm (``model.sync_bn``), parameters and statistics
    kept, in place as torch's converter does. torch's converter turns any BatchNorm subclass into a plain
    SyncBatchNorm, whose forward never calls what the subclass added: timm's BatchNormAct2d (its activation and
    drop-out, run inside its own forward) lost them, and an EfficientNet trained without activations. So: a
    layer already synchronised (SyncBatchNorm, timm's SyncBatchNormAct) stays as it is; timm's BatchNormAct2d
    becomes SyncBatchNormAct (timm's converter); a BatchNorm whose forward is BatchNorm's becomes SyncBatchNorm;
    any other BatchNorm layer (a forward of its own) is refused, naming it, before anything is converted."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from fasttrain.config import ConfigError

    timm_act: Any = None
    if any(type(m).__module__.split(".")[0] == "timm" for m in module.modules()):
        from timm.layers import BatchNormAct2d, convert_sync_batchnorm

        timm_act = BatchNormAct2d

    def kind(m: Any) -> str:
        if isinstance(m, torch.nn.SyncBatchNorm):
            return "synced"
        if timm_act is not None and type(m) is timm_act:  # exactly it: a subclass may add to its forward too
            return "timm"
        if isinstance(m, _BatchNorm):
            return "plain" if type(m).forward is _BatchNorm.forward else "odd"
        return "other"

    odd = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules() if kind(m) == "odd"})
    if odd:
        raise ConfigError(
            f"model.sync_bn: {', '.join(odd)} is a BatchNorm layer with a forward of its own, which "
            f"SyncBatchNorm would replace (dropping what it adds); turn model.sync_bn off for this model"
        )

    def convert(m: Any) -> Any:
        what = kind(m)
        if what == "synced":
            return m
        if what == "timm":
            return convert_sync_batchnorm(m)
        if what == "plain":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        for name, child in m.named_children():
            new = convert(child)
            if new is not child:
                m.add_module(name, new)
        return m

    return convert(module)


_SECONDARY = ("closed by peer", "reset by peer", "Connection refused", "connectFullMesh", "Broken pipe")
"""A rank's error that follows another rank's end (its peer's connection went away): not the cause."""


def timed_out(e: BaseException) -> str | None:
    """A collective that ran out of dist.timeout_s, as one line naming the setting; None for other errors."""
    text = str(e)
    if not _JOINED.timeout_s or not ("Timed out" in text or "timed out" in text or "Timeout" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return (
        f"{_where()}: waited dist.timeout_s = {_JOINED.timeout_s:g} s for the other ranks (one frozen, or lost "
        f"without its process ending?) and gave up ({first})"
    )


def record_failure(
    message: str, run_dir: Any = None, env: Mapping[str, str] | None = None, *, secondary: bool = False
) -> None:
    """Under torchrun: this worker's last error line (and its run folder, when it has one) in the error file
    torchrun reads back (``TORCHELASTIC_ERROR_FILE``), so that ``fasttrain train --nproc`` can say which rank
    failed and why. The time is kept to the microsecond (``fasttrain_time``: torchrun's own ``timestamp`` is
    whole seconds, and a rank that stops with another's error records it within milliseconds); ``secondary``:
    this rank stops with another's error (:class:`PeerFailed`, the nodes' disagreement), never the cause to
    report. Does nothing elsewhere; never raises."""
    env = os.environ if env is None else env
    path = env.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    data = {
        "message": message,
        "timestamp": int(now),
        "fasttrain_time": now,
        "fasttrain_secondary": secondary,
        "fasttrain_run_dir": str(run_dir or ""),
    }
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass


@dataclass(frozen=True)
class WorkerFailure:
    rank: int
    exitcode: int
    message: str
    """The worker's last error line (recorded by :func:`record_failure`), or torchrun's account of it."""
    timestamp: float = 0.0
    run_dir: str = ""
    secondary: bool = False
    """It stopped with another rank's error (recorded so by :func:`record_failure`): not the cause."""


def failure_report(failures: list[WorkerFailure], nproc: int, checkpoint: Callable[[str], bool]) -> str:
    """What ``fasttrain train --nproc N`` says when a worker failed: which rank, why (its last error line), the
    other ranks that ended with it, and how to go on: the resume command when the run folder has a checkpoint
    (``checkpoint(run_dir)``), else that the run must start again. Pure."""
    if not failures:
        return "fasttrain: error: a worker failed without saying why (see the output above)"
    # The cause first: not a rank whose peer's connection went away, nor one the agent stopped (SIGTERM: 15)
    # after another failed.
    first = min(
        failures,
        key=lambda f: (
            f.secondary or any(s in f.message for s in _SECONDARY),
            f.exitcode == -15,
            f.timestamp,
            f.rank,
        ),
    )
    why = _why(first)
    lines = [f"fasttrain: error: rank {first.rank} failed ({_exit(first.exitcode)}): {why}"]
    others = sorted(f.rank for f in failures if f is not first)
    if others:
        lines.append(f"  (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} ended with it)")
    run_dir = first.run_dir or next((f.run_dir for f in failures if f.run_dir), "")
    if run_dir and checkpoint(run_dir):
        lines.append(
            f"continue the run from its last checkpoint with\n  fasttrain train --resume {run_dir} --nproc {nproc}"
        )
    elif run_dir:
        lines.append(f"{run_dir} has no checkpoint yet: start the run again")
    else:
        lines.append("no run folder was written: start the run again once that is fixed")
    return "\n".join(lines)


def _exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _why(f: WorkerFailure) -> str:
    text = f.message.strip()
    if not text or text.startswith("To enable traceback") or text.startswith("Signal "):
        if f.exitcode == -6:  # torchrun turns on NCCL's async error handling: its watchdog aborts, nothing raises
            return (
                "the process was aborted: with NCCL, its watchdog aborts a process whose collective waited "
                "longer than dist.timeout_s (a rank that hung, or stopped without the others) or that saw a "
                "peer fail; look for the first error above"
            )
        return "no error recorded (see the output above)" if f.exitcode >= 0 else "the process was killed"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()).removeprefix("fasttrain: error: ")
