"""File writing with two guarantees: a reader never sees a half-written file, and a user's file is never
overwritten; and when a write fails (disk full, read-only, no permission) one :class:`WriteError` that names
the file and the reason.

- :func:`atomic_replace` (files fasttrain owns: checkpoints, run files, caches): temp file in the same folder,
  fsync, ``os.replace``. A failed write leaves the previous file as it was.
- :func:`write_new` (files written where the user said: reports, tuned configs, predictions): temp file, then
  ``os.link`` to the name or, where that exists, ``stem-2.ext``, ``stem-3.ext``... ``os.link`` fails on an
  existing name, so even a concurrent writer cannot be overwritten.
- :func:`check_writable`: a command that writes at its end asks at its start, so a long run does not fail at
  the last step.
- :func:`append_jsonl` / :func:`read_jsonl`: one JSON record per line; a torn last line (disk full mid-append)
  is dropped with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "WriteError",
    "sniff_image_format",
    "atomic_replace",
    "atomic_write_text",
    "write_new",
    "write_new_text",
    "check_writable",
    "os_reason",
    "remove_temp_files",
    "is_temp_file",
    "append_jsonl",
    "read_jsonl",
]


class WriteError(OSError):
    """A file or folder could not be written; ``str()`` is one line: what, why, and what is left intact."""

    def __init__(self, message: str, err: int | None = None, *, path: Path | None = None, reason: str = ""):
        super().__init__(message)
        self.message = message
        self.errno = err
        self.path = path
        """What could not be written."""
        self.reason = reason or message
        """Why, in a few words (the OS's ``No space left on device``)."""

    def __str__(self) -> str:
        return self.message


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or its cause / context (torch.save wraps the file's OSError in a
    RuntimeError)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def os_reason(exc: BaseException) -> str:
    """``No space left on device``, ``Read-only file system``, ...: the short reason of an OS error."""
    err = _os_error(exc)
    if isinstance(err, WriteError):
        return err.reason
    if err is not None and err.strerror:
        return err.strerror
    if err is not None and err.errno:
        return os.strerror(err.errno)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _write_error(path: Path, exc: BaseException, intact: bool) -> WriteError:
    err = _os_error(exc)
    if isinstance(err, WriteError):
        return err
    reason = os_reason(exc)
    tail = f"; the previous {path.name} is intact" if intact else ""
    return WriteError(
        f"cannot write {path}: {reason}{tail}", err.errno if err is not None else None, path=path, reason=reason
    )


def _is_write_failure(exc: BaseException) -> bool:
    return _os_error(exc) is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit))


def _temp_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}", e.errno, path=path, reason=os_reason(e)) from None
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        if not directory:
            raise
    finally:
        os.close(fd)


def _user_mode(path: Path) -> None:
    """mkstemp makes 0600; files for the user get the usual mode."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_replace(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(temp_path)``, then rename the temp file over ``path`` (durably: file and folder fsynced).
    An OS error on the way (disk full, read-only) becomes a :class:`WriteError`; ``path`` is then unchanged."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _fsync(tmp)
        _user_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(e):
            raise _write_error(path, e, intact=path.exists()) from e
        raise
    _fsync(path.parent, directory=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_replace(path, lambda p: _write_text(p, text))


def write_new(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(temp_path)``, then give it ``path`` or the first free ``stem-N.ext``; returns the name used."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _user_mode(tmp)
        for i in range(1, 1000):
            target = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"{path}: no free file name")
    except BaseException as e:
        if _is_write_failure(e) and not isinstance(e, FileExistsError):
            raise _write_error(path, e, intact=False) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    return write_new(path, lambda p: _write_text(p, text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Raise :class:`WriteError` naming ``what`` (a flag or setting) unless a file can be created in ``folder``
    (or, where it does not exist yet, in its nearest existing parent, where it would be created). Writes and
    removes a hidden probe file: permission bits alone do not tell (root, read-only mounts, full disks)."""
    folder = Path(folder).expanduser()
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise WriteError(f"{what}: cannot write to {folder}: {probe_dir} is not a folder", errno.ENOTDIR)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fasttrain-probe.", dir=probe_dir)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise WriteError(
            f"{what}: cannot write to {folder}: {os_reason(e)}", e.errno, path=folder, reason=os_reason(e)
        ) from None
    return folder


_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is the temp file of an :func:`atomic_replace` / :func:`write_new` call
    (``.last.pt.ab12cd34.tmp``): a write under way or interrupted, not a file yet."""
    return bool(_TEMP.match(name))


def remove_temp_files(folder: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Remove the temp files that interrupted :func:`atomic_replace` / :func:`write_new` calls left in
    ``folder`` (``.last.pt.ab12cd34.tmp``: killed mid-write). Only for folders fasttrain owns, while no other
    process writes there (a run folder under its lock). ``suffixes``: only those of files named so (what
    fasttrain writes there: a user's own ``.draft.abcdefgh.tmp`` is left alone). Returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and (not suffixes or m["name"].endswith(suffixes)) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a line; :class:`WriteError` when it cannot be written (a torn line may remain:
    :func:`read_jsonl` drops it)."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}", e.errno, path=path, reason=os_reason(e)) from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file fasttrain appended to. A torn last line (a write cut short by a full
    disk or a kill) is dropped with a warning naming the file; a broken line before the last one is an error
    naming the file and line (that is not how appends fail)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning(
                    "%s: dropped its last line %d, a record cut short (disk full or killed mid-write): %s",
                    path,
                    n,
                    str(e).splitlines()[0],
                )
                break
            raise ValueError(
                f"{path}:{n}: not a JSON record ({str(e).splitlines()[0]}); remove or fix that line"
            ) from None
        out.append(rec)
    return out


def sniff_image_format(head: bytes) -> str | None:
    """The image format announced by a file's first bytes (16 are enough), or None when it is no image we read."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xffO\xffQ"):
        return "jpeg2000"
    return None
