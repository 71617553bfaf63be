"""A run folder's housekeeping: one process at a time (a lock), no temp files left behind, and the metrics file
read back safely on resume. Self-contained, so the engine only calls these.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from fasttrain.io import WriteError, atomic_write_text, os_reason, read_jsonl, remove_temp_files

__all__ = ["RunError", "RunLockedError", "RunLock", "clean_temp_files", "trim_metrics", "write_run_config",
           "LOCK_NAME"]

LOCK_NAME = ".lock"
"""The lock file in a run folder (held with ``flock`` while a process trains there)."""


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do (printed as one line by the CLI)."""


class RunLockedError(RunError):
    """Another process is training in this run folder."""


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for as long as a process trains there. The kernel drops it
    when the process ends in any way (``kill -9`` included), so a stale lock file never blocks a resume."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError(f"cannot write in run folder {self.path.parent}: {os_reason(e)}", e.errno,
                             path=self.path, reason=os_reason(e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder()
            raise RunLockedError(f"run folder {self.path.parent} is in use by another fasttrain process"
                                 f"{f' (pid {holder})' if holder else ''}; wait for it to end or stop it, "
                                 f"then resume") from None
        try:  # who holds it, for the message above; best effort (the lock itself is what counts)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()[:20]
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def clean_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files of interrupted atomic writes (checkpoints, metrics, samples) in a run folder; call
    it only under the run's lock."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        removed += remove_temp_files(folder)
    return removed


def trim_metrics(path: str | os.PathLike, epochs_done: int) -> list[dict[str, Any]]:
    """On resume: drop records of epochs after the checkpoint (they will be run again) and a torn last line;
    returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return []
    keep = [r for r in read_jsonl(path) if r.get("epoch", 0) <= epochs_done]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if text != path.read_text(encoding="utf-8", errors="replace"):
        atomic_write_text(path, text)
    return keep


def write_run_config(run_dir: str | os.PathLike, text: str) -> None:
    """``config.toml``: what the run trains with. Written when the run starts, rewritten (atomically) on a
    resume whose ``--set`` changed it (more epochs), left alone otherwise."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        atomic_write_text(path, text)
