"""File writing with two guarantees: a reader never sees a half-written file, and a user's file is never
overwritten.

- :func:`atomic_replace` (files fasttrain owns: checkpoints, run files, caches): temp file in the same folder,
  fsync, ``os.replace``.
- :func:`write_new` (files written where the user said: reports, tuned configs, predictions): temp file, then
  ``os.link`` to the name or, where that exists, ``stem-2.ext``, ``stem-3.ext``... ``os.link`` fails on an
  existing name, so even a concurrent writer cannot be overwritten.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_replace", "atomic_write_text", "write_new", "write_new_text"]


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    """``write(temp_path)``, then rename the temp file over ``path`` (durably: file and folder fsynced)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _fsync(tmp)
        _user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_replace(path, lambda p: p.write_text(text, encoding="utf-8"))


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
    finally:
        tmp.unlink(missing_ok=True)


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    return write_new(path, lambda p: p.write_text(text, encoding="utf-8"))
