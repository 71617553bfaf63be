"""Opening files that should be images without ever blocking: only regular files (or links to them) are images.

A named pipe called ``x.png`` blocks a plain ``open()`` for ever (it waits for a writer); a device file streams
without end. Discovery, the validators and ``transforms.load_image`` all go through :func:`open_regular`, which
opens without blocking and checks what it opened before reading a byte.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = ["NotRegularFileError", "kind_of", "not_regular_reason", "open_regular"]

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class NotRegularFileError(OSError):
    """The path exists (or is a link) but is no regular file: a FIFO, socket, device, folder, broken link."""


def kind_of(mode: int) -> str:
    """What a non-regular file is, for messages ("a named pipe (FIFO)")."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "a special file"


def not_regular_reason(path: str | os.PathLike) -> str | None:
    """None for a regular file or a link to one; else why it is not an image file. Never opens the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return "a broken symbolic link (its target does not exist)"
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None if stat.S_ISREG(st.st_mode) else f"not a regular file: {kind_of(st.st_mode)}"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``open(path, "rb")`` that raises :class:`NotRegularFileError` instead of blocking or reading a non-file.

    O_NONBLOCK makes opening a FIFO return at once (no writer needed); fstat then tells what was opened.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegularFileError(
                errno.ENOENT, "a broken symbolic link (its target does not exist)", str(path)
            ) from None
        raise
    except IsADirectoryError:
        raise NotRegularFileError(errno.EISDIR, "not a regular file: a directory", str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file: {kind_of(mode)}", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
