"""Simulated file-system failures below one folder: a full disk (ENOSPC) or a read-only folder (EROFS).

Tests run as root, which ignores permission bits, and cannot mount a small or read-only file system; so the
calls that create or write files (``open``, ``os.open`` / ``os.write``, ``os.mkdir``, ``os.link``,
``os.replace``) are wrapped and fail the way the kernel would, for paths under the chosen folder only.
Everything else passes through untouched.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path


def _under(path, prefix: str) -> bool:
    if isinstance(path, int):
        return False
    p = os.path.abspath(os.fspath(path))
    return p == prefix or p.startswith(prefix + os.sep)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _FullFile:
    """A real file whose writes stop, part-way, when the simulated disk is full (as a real short write would)."""

    def __init__(self, f, fs: FaultFS):
        self._f, self._fs = f, fs

    def write(self, data):
        room = self._fs.room()
        if len(data) > room:
            if room:
                self._f.write(data[:room])
                self._f.flush()
                self._fs.used += room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fs.used += len(data)
        return self._f.write(data)

    def fileno(self):  # writers that would bypass write() through the descriptor fall back to write()
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FaultFS:
    """``FaultFS(monkeypatch).read_only(folder)`` or ``.disk_full(folder, room=bytes)``."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch
        self.prefix = ""
        self.kind = ""
        self.capacity = 0
        self.used = 0
        self._fds: set[int] = set()

    def room(self) -> int:
        return max(0, self.capacity - self.used)

    def read_only(self, folder) -> FaultFS:
        return self._install(folder, "ro")

    def disk_full(self, folder, room: int = 0) -> FaultFS:
        """Writes under ``folder`` succeed for ``room`` more bytes in all, then fail with ENOSPC."""
        self.capacity = room
        return self._install(folder, "full")

    def _fail(self, path, code=None):
        code = code or (errno.EROFS if self.kind == "ro" else errno.ENOSPC)
        raise OSError(code, os.strerror(code), os.fspath(path))

    def _install(self, folder, kind: str) -> FaultFS:
        self.prefix = os.path.abspath(os.fspath(Path(folder)))
        self.kind = kind
        real_open, real_os_open, real_write = builtins.open, os.open, os.write
        real_mkdir, real_link, real_replace, real_rename = os.mkdir, os.link, os.replace, os.rename
        fs = self

        def fake_open(file, mode="r", *args, **kwargs):
            if _writes(mode) and _under(file, fs.prefix):
                if fs.kind == "ro":
                    fs._fail(file)
                return _FullFile(real_open(file, mode, *args, **kwargs), fs)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, fs.prefix):
                if fs.kind == "ro":
                    fs._fail(path)
                fd = real_os_open(path, flags, *args, **kwargs)
                fs._fds.add(fd)
                return fd
            return real_os_open(path, flags, *args, **kwargs)

        def fake_write(fd, data):
            if fd in fs._fds and len(data) > fs.room():
                fs._fail("<fd>")
            if fd in fs._fds:
                fs.used += len(data)
            return real_write(fd, data)

        def fake_mkdir(path, *args, **kwargs):
            if _under(path, fs.prefix) and (fs.kind == "ro" or not fs.room()):
                fs._fail(path)
            return real_mkdir(path, *args, **kwargs)

        def two_paths(real):
            def fake(src, dst, *args, **kwargs):
                if fs.kind == "ro" and _under(dst, fs.prefix):
                    fs._fail(dst)
                return real(src, dst, *args, **kwargs)

            return fake

        self.mp.setattr(builtins, "open", fake_open)
        self.mp.setattr(io, "open", fake_open)
        self.mp.setattr(os, "open", fake_os_open)
        self.mp.setattr(os, "write", fake_write)
        self.mp.setattr(os, "mkdir", fake_mkdir)
        self.mp.setattr(os, "link", two_paths(real_link))
        self.mp.setattr(os, "replace", two_paths(real_replace))
        self.mp.setattr(os, "rename", two_paths(real_rename))
        return self
