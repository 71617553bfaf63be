"""A run folder's housekeeping: one process at a time (a lock), no temp files left behind, and the metrics file
read back safely on resume. Self-contained, so the engine only calls these.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from fasttrain.io import WriteError, atomic_write_text, is_temp_file, os_reason, remove_temp_files

log = logging.getLogger(__name__)

__all__ = [
    "git_commit",
    "RunError",
    "RunLockedError",
    "RunLock",
    "clean_temp_files",
    "write_run_config",
    "new_run_dir",
    "elastic_run_dir",
    "remember_elastic_run",
    "forget_elastic_run",
    "holds_checkpoints",
    "resume_target",
    "LOCK_NAME",
    "JOB_NAME",
]

LOCK_NAME = ".lock"
"""The lock file in a run folder (held with ``flock`` while a process trains there)."""

JOB_NAME = ".torchrun-job"
"""The file in a run folder that names the torchrun job training there (its token): found again after the job's
marker went (see :func:`elastic_run_dir`)."""


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do (printed as one line by the CLI)."""


class RunLockedError(RunError):
    """Another process is training in this run folder."""


_HELD: set[int] = set()
"""Descriptors of the run locks this process holds: closed in every forked child (see :class:`RunLock`)."""
_AT_FORK = False


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


def _exists(pid: int) -> bool:
    """Whether a process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :][:1] != "Z"
    except (OSError, ValueError):
        return True


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for as long as a process trains there. The kernel drops it
    when the process ends in any way (``kill -9`` included), so a stale lock file never blocks a resume.

    A flock belongs to the open file, which forked children (DataLoader workers) share: they close their copy
    at fork, so workers orphaned by ``kill -9`` never keep a run locked. The file records the owner's pid; a lock
    still held when no process has that pid (a child kept it some other way) is stale and taken over: a fresh
    lock file replaces it, under a short lock on the run folder itself so that two resumes cannot both take
    over. (A reused pid keeps the lock held: refusing wrongly is safer than two runs in one folder.)"""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        global _AT_FORK
        if not _AT_FORK:
            os.register_at_fork(after_in_child=_close_held_in_child)
            _AT_FORK = True
        try:
            guard = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            guard = None
        try:
            if guard is not None:
                try:
                    fcntl.flock(guard, fcntl.LOCK_EX)  # held for the few calls below only
                except OSError:
                    pass
            fd = self._open(self.path, os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder()
                if holder is None or _exists(holder):
                    os.close(fd)
                    raise RunLockedError(
                        f"run folder {self.path.parent} is in use by another fasttrain process"
                        f"{f' (pid {holder})' if holder else ''}; wait for it to end or stop it, "
                        f"then resume"
                    ) from None
                os.close(fd)
                fd = self._take_over(holder)
            try:  # who holds it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
        finally:
            if guard is not None:
                os.close(guard)
        self._fd = fd
        _HELD.add(fd)
        return self

    def _open(self, path: Path, flags: int) -> int:
        try:
            return os.open(path, os.O_RDWR | flags, 0o644)
        except OSError as e:
            raise WriteError(
                f"cannot write in run folder {self.path.parent}: {os_reason(e)}",
                e.errno,
                path=self.path,
                reason=os_reason(e),
            ) from None

    def _take_over(self, dead: int) -> int:
        """A new lock file, locked, renamed over the stale one (whose holders keep a lock on a file nobody opens)."""
        tmp = self.path.with_name(f"{LOCK_NAME}.new-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = self._open(tmp, os.O_CREAT | os.O_EXCL)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, self.path)
        log.warning(
            "run folder %s: the lock of process %d, which has ended, was still held by processes it left behind "
            "(e.g. data loader workers); taken over",
            self.path.parent,
            dead,
        )
        return fd

    def _holder(self) -> int | None:
        """The pid recorded in the lock file; None when it cannot be read."""
        try:
            return int(self.path.read_text(encoding="utf-8", errors="replace").split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
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
        removed += remove_temp_files(folder, RUN_FILE_SUFFIXES)
    return removed


RUN_FILE_SUFFIXES = (".pt", ".toml", ".json", ".jsonl", ".png", ".csv", ".log", ".txt")
"""What fasttrain writes atomically into a run folder: the temp files of those alone are its own."""


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


def elastic_run_dir(
    runs_dir: str | os.PathLike, run_id: str, job: str | None = None, *, search: bool = True
) -> Path | None:
    """The run folder an earlier start of this torchrun job (same rendezvous id) created, if any: a job that
    torchrun restarts after a lost worker continues there instead of starting a second folder. ``job``: the
    job's token (:func:`fasttrain.distributed.job_token`); a marker another job left under the same rendezvous
    id (a later job reusing it) names another token and is not this job's.

    With ``job``, a folder whose :data:`JOB_NAME` file names the token is this job's too, marker or not: rank 0
    takes the marker away once the run is finished, but its process can still end with an error after that (an
    abort at the interpreter's exit), and its node's agent then restarts the job, which must find the finished
    run (and resume it, with nothing left to train) instead of training a second one in a new folder.
    ``search=False``: not that way (a job's first attempt: no folder can hold its new token, and the search
    reads a file in every folder of ``runs_dir``)."""
    marker = _elastic_marker(runs_dir, run_id)
    try:
        name, _, token = marker.read_text(encoding="utf-8").strip().partition("\n")
    except OSError:
        name = token = ""
    if job is not None and token.strip() != job:
        return _run_of_job(marker.parent, job) if job and search else None
    folder = marker.parent / name
    return folder if name and "/" not in name and folder.is_dir() else None


def _run_of_job(runs_dir: Path, job: str) -> Path | None:
    """The folder in ``runs_dir`` whose :data:`JOB_NAME` file names the torchrun job ``job`` (its token); the
    newest such file's where there are several (a restart that left a folder behind, its checkpoints broken, and
    trained in a new one: the new one is the run)."""
    try:
        folders = [p for p in runs_dir.iterdir() if p.is_dir()]
    except OSError:
        return None
    found = []
    for folder in folders:
        try:
            path = folder / JOB_NAME
            if path.read_text(encoding="utf-8").strip() == job:
                found.append((path.stat().st_mtime_ns, folder.name, folder))
        except OSError:
            continue
    return max(found)[2] if found else None


def remember_elastic_run(runs_dir: str | os.PathLike, run_id: str, run_dir: Path, job: str = "") -> None:
    """Note which folder this torchrun job trains in (read by :func:`elastic_run_dir` after a restart): the
    marker in ``runs_dir``, and the job's token in the run folder (it stays when the marker goes)."""
    if job:
        atomic_write_text(run_dir / JOB_NAME, f"{job}\n")
    atomic_write_text(_elastic_marker(runs_dir, run_id), f"{run_dir.name}\n{job}\n")


def forget_elastic_run(runs_dir: str | os.PathLike, run_id: str, run_dir: Path) -> None:
    """The job ended: its marker goes (only when it still names ``run_dir``: a later job's is left alone)."""
    marker = _elastic_marker(runs_dir, run_id)
    try:
        if marker.read_text(encoding="utf-8").partition("\n")[0].strip() == run_dir.name:
            marker.unlink()
    except OSError:
        pass


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder a run wrote into: it holds config.toml, checkpoints/, train.log or
    metrics.jsonl (a run killed before its config.toml, in a time budget's measurement, has its train.log)."""
    p = Path(path)
    return p.is_dir() and any(
        (p / name).exists() for name in ("config.toml", "checkpoints", "train.log", "metrics.jsonl")
    )


def holds_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder has any checkpoint file under checkpoints/ (a start that died before its first
    checkpoint has none: its restart trains in the same folder instead of leaving it empty behind). The temp file
    of a checkpoint write that the death interrupted is no checkpoint (the restart removes it)."""
    try:
        return any(p.is_file() and not is_temp_file(p.name) for p in (Path(run_dir) / "checkpoints").iterdir())
    except OSError:
        return False


def resume_target(resume: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint to resume from): a run folder resumes from its last.pt; a checkpoint file of a
    run (``RUN/checkpoints/best.pt``, when last.pt is damaged or missing) from that file."""
    if resume.is_file() and resume.parent.name == "checkpoints" and (resume.parent.parent / "config.toml").is_file():
        return resume.parent.parent, resume
    if not resume.is_dir():
        run = resume.parent if (resume.parent / "checkpoints").is_dir() else None
        raise FileNotFoundError(
            f"--resume: {resume} is not a run folder (nor a checkpoint in one's checkpoints/)"
            + (f"; its run folder: --resume {run}" if run is not None else "")
        )
    if not is_run_folder(resume):  # before the run's lock is taken: nothing is written into a dataset's folder
        raise FileNotFoundError(
            f"--resume: {resume} is not a run folder (it holds no config.toml, checkpoints/ or train.log); a "
            f"folder of images trains with: fasttrain train CONFIG --set data.root={resume}"
        )
    return resume, resume / "checkpoints" / "last.pt"


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout fasttrain runs from (with ``+dirty`` for uncommitted changes); None when it
    was installed from a wheel or git is unavailable. Read-only: ``git status`` would otherwise refresh the
    index and take the user's ``.git/index.lock`` for a moment (a commit of theirs at that moment fails)."""
    import subprocess

    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head
