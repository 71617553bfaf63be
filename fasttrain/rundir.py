"""A run folder's housekeeping: one process at a time (a lock), no temp files left behind, and the metrics file
read back safely on resume. Self-contained, so the engine only calls these.
"""

from __future__ import annotations

import errno
import fcntl
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from fasttrain.io import WriteError, atomic_write_text, os_reason, remove_temp_files

__all__ = [
    "RunError",
    "RunLockedError",
    "RunLock",
    "clean_temp_files",
    "write_run_config",
    "new_run_dir",
    "elastic_run_dir",
    "remember_elastic_run",
    "LOCK_NAME",
]

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
            raise WriteError(
                f"cannot write in run folder {self.path.parent}: {os_reason(e)}",
                e.errno,
                path=self.path,
                reason=os_reason(e),
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder()
            raise RunLockedError(
                f"run folder {self.path.parent} is in use by another fasttrain process"
                f"{f' (pid {holder})' if holder else ''}; wait for it to end or stop it, "
                f"then resume"
            ) from None
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


def write_run_config(run_dir: str | os.PathLike, text: str) -> None:
    """``config.toml``: what the run trains with. Written when the run starts, rewritten (atomically) on a
    resume whose ``--set`` changed it (more epochs), left alone otherwise."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        atomic_write_text(path, text)


def new_run_dir(runs_dir: str | os.PathLike, name: str) -> Path:
    """A fresh folder ``runs_dir/name`` created here (so two runs cannot share it); an existing one is never
    reused: ``name-2``, ``name-3``... instead."""
    base = Path(runs_dir).expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            d = base / (name if i == 0 else f"{name}-{i + 1}")
            try:
                d.mkdir()
                return d
            except FileExistsError:
                continue
    except OSError as e:
        raise WriteError(
            f"train.runs_dir: cannot create a run folder in {base}: {os_reason(e)}",
            e.errno,
            path=base,
            reason=os_reason(e),
        ) from None
    raise FileExistsError(f"train.runs_dir: could not find a free run folder name for {name!r} in {base}")


def run_name(config_name: str, run_name: str = "", prefix: str = "") -> str:
    """``train.run_name``, or ``<prefix><config name>-<date>-<time>``."""
    return (run_name if not prefix else "") or f"{prefix}{config_name}-{datetime.now():%Y%m%d-%H%M%S}"


def _elastic_marker(runs_dir: str | os.PathLike, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:100]
    return Path(runs_dir).expanduser() / f".torchrun-{safe}"


def elastic_run_dir(runs_dir: str | os.PathLike, run_id: str) -> Path | None:
    """The run folder an earlier start of this torchrun job (same rendezvous id) created, if any: a job that
    torchrun restarts after a lost worker continues there instead of starting a second folder."""
    marker = _elastic_marker(runs_dir, run_id)
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    folder = marker.parent / name
    return folder if name and folder.is_dir() else None


def remember_elastic_run(runs_dir: str | os.PathLike, run_id: str, run_dir: Path) -> None:
    """Note which folder this torchrun job trains in (read by :func:`elastic_run_dir` after a restart)."""
    atomic_write_text(_elastic_marker(runs_dir, run_id), run_dir.name + "\n")
