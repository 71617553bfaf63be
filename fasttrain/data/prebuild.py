"""The dataset index built in a forked process while the command imports torch (issue 21's cold start).

Before its first step ``fasttrain train`` imports torch (about 1.6 s on a 2-core machine) and ``torch._dynamo``
(about 1.3 s: every torch optimizer imports it when it is built), and reads or builds the dataset index (a walk
and a stat per file: about 2 s at 200,000 files cold, 1 s warm). Both hold the GIL nearly all the time, so a
thread cannot overlap them (measured: the two together took longer on two threads than one after the other). A
process can. :func:`start`, called by the command line before anything has imported numpy or torch (the process
has one thread, so a fork is safe), forks a child that does exactly what
:func:`~fasttrain.data.index.load_or_build` would do here, and the command goes on importing. :func:`take`, where
the index is needed, returns the child's result when it was asked with the same settings; otherwise it stops the
child and returns None, and the caller builds the index itself (:func:`~fasttrain.prepare.prepare` hands it to
:func:`~fasttrain.data.index.indexed_source`, which calls it where it would build).

The child never outlives its use: it ends with its parent (``PR_SET_PDEATHSIG``: a parent killed outright), an
interrupted :func:`take` stops it, and one never taken is stopped when the command exits. No fork where it could
go wrong: SIGCHLD not at its default (a launcher that ignores it: the system would reap the child and its pid
could be reused), no descriptor or process left (the run builds the index itself).

One process only: under torchrun, rank 0's listing moves the progress the other ranks' wait watches
(:func:`~fasttrain.data.sources.note_progress`), which a child's would not. Linux only (a fork, and the thread
count in /proc). The child's errors: a setting refused (:class:`~fasttrain.config.ConfigError`) or data the index
cannot hold (``IndexUnsupported``) come back as they were raised; any other failure is left to the parent, which
builds the index itself and raises the error where it happens, with its traceback.

This module imports neither numpy nor torch: it is imported before the fork.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttrain.config import DataConfig
from fasttrain.data.files import is_shard_root
from fasttrain.registry import INDEXED_FORMATS

log = logging.getLogger(__name__)

__all__ = ["pending", "start", "take"]


@dataclass
class _Child:
    pid: int
    fd: int
    data: DataConfig
    root: Path


_child: _Child | None = None


def pending() -> bool:
    """Whether a child is building (or has built) an index that :func:`take` has not yet taken."""
    return _child is not None


def start(data: DataConfig) -> bool:
    """Fork a child that reads or builds ``data``'s index (``data.root``, absolute, as
    :func:`~fasttrain.prepare.resolve_data_root` makes it). False, and nothing started, where it cannot help or
    would not be safe: another child pending, not Linux, under torchrun, more than one thread in this process, a
    root that is not a local folder of a format the index holds (empty: the demo data, written on first use; tar
    shards; a URL)."""
    global _child
    root = Path(data.root)
    if _child is not None or not _eligible(data, root):
        return False
    for stream in (sys.stdout, sys.stderr):  # what this process buffered is written once, by this process
        try:
            if stream is not None:  # None: a command started with that descriptor closed
                stream.flush()
        except (OSError, ValueError):
            pass
    parent = os.getpid()
    try:
        read_end, write_end = os.pipe()
    except OSError as e:  # out of descriptors: the run builds the index itself
        log.debug("dataset index: no early build (%s)", e)
        return False
    try:
        pid = os.fork()
    except OSError as e:  # out of processes or memory (a cgroup's limit)
        os.close(read_end)
        os.close(write_end)
        log.debug("dataset index: no early build (%s)", e)
        return False
    if pid == 0:  # the child: build, send the result, leave without this process's exit handlers
        code = 1
        try:
            os.close(read_end)
            _end_with(parent)
            code = _build_and_send(data, root, write_end)
        finally:
            # Ctrl-C or SIGTERM now would raise past the exit, into the command's own handlers
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            os._exit(code)
    os.close(write_end)
    _child = _Child(pid, read_end, data, root)
    atexit.register(_stop_pending)
    log.debug("dataset index: built or read in process %d while this one imports torch", pid)
    return True


def take(data: DataConfig, root: str | os.PathLike) -> Any:
    """The child's :class:`~fasttrain.data.index.IndexResult` for ``data`` at ``root``, waiting for it; None
    when no child is pending, it was started for other settings (it is stopped), or it failed otherwise than
    by a refused setting or an unindexable source (those are raised here, as the child raised them)."""
    global _child
    child, _child = _child, None
    if child is None:
        return None
    if data != child.data or Path(root).expanduser() != child.root:
        log.debug("dataset index: the early build was for other settings; building here")
        _stop(child)
        return None
    try:  # interrupted here (Ctrl-C, a signal's exception): the child is stopped, not left walking the data
        with os.fdopen(child.fd, "rb") as f:
            child.fd = -1  # the file owns it now
            payload = f.read()
        code = _reap(child.pid)
    except BaseException:
        _stop(child)
        raise
    if code != 0 or not payload:
        log.debug("dataset index: the early build ended with exit code %s; building here", code)
        return None
    try:
        kind, value = pickle.loads(payload)
    except Exception:  # noqa: BLE001 - an exception that does not unpickle: the parent raises its own
        return None
    if kind == "error":
        raise value
    log.debug("dataset index: taken from process %d", child.pid)
    return value


def _eligible(data: DataConfig, root: Path) -> bool:
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("WORLD_SIZE", "1") != "1":
        return False
    if data.format not in INDEXED_FORMATS or not root.is_absolute() or not root.is_dir():
        return False
    if is_shard_root(data.format, root):
        return False
    # SIGCHLD ignored (inherited from a launcher that ignores it): the system reaps the child itself, its exit
    # code is lost and its pid may be reused; a handler of its own may reap it too.
    if signal.getsignal(signal.SIGCHLD) != signal.SIG_DFL:
        return False
    return _one_thread()


def _one_thread() -> bool:
    """This process has one thread, as the OS counts them (a BLAS pool started by importing numpy counts too;
    Python's ``threading`` sees only its own): a fork copies no lock another thread holds."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _end_with(parent: int) -> None:
    """In the child: end (SIGTERM) when the parent does, whatever ends it (SIGKILL, the OOM killer, a crash
    before its exit handlers run): a child left alone would walk the whole dataset for nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl: the closed pipe ends it when it sends its result
        pass
    if os.getppid() != parent:  # the parent ended before the prctl
        os._exit(1)


_PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal the calling process gets when its parent ends."""


def _build_and_send(data: DataConfig, root: Path, fd: int) -> int:
    """In the child: the index as :func:`~fasttrain.data.index.load_or_build` gives it (or its refusal), pickled
    into ``fd``. Exit status 0 when sent; 1 when there is nothing the parent should take (it builds itself)."""
    # SIGTERM (the parent stopping it) unwinds: an index being written leaves no temp file behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from fasttrain.config import ConfigError
    from fasttrain.data.index import IndexUnsupported, load_or_build

    try:
        result: tuple[str, Any] = ("ok", load_or_build(data, root))
    except (ConfigError, IndexUnsupported) as e:
        result = ("error", e)
    except BaseException:  # noqa: BLE001 - the parent builds the index itself and meets this error there
        return 1
    try:
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except BaseException:  # noqa: BLE001 - unpicklable, or the parent is gone (a closed pipe)
        return 1
    return 0


def _reap(pid: int) -> int | None:
    """The child's exit code (negative: the signal that ended it); None when it is not this process's to wait
    for any more."""
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return None


def _stop(child: _Child) -> None:
    """SIGTERM (the child unwinds: no temp file left), then reaped. Its pid is still ours until reaped."""
    try:
        os.kill(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if child.fd >= 0:
        os.close(child.fd)
        child.fd = -1
    _reap(child.pid)


def _stop_pending() -> None:
    global _child
    child, _child = _child, None
    if child is not None:
        _stop(child)
