"""Opening files that should be images without ever blocking: only regular files (or links to them) are images.

A named pipe called ``x.png`` blocks a plain ``open()`` for ever (it waits for a writer); a device file streams
without end. Discovery, the validators and ``decode.load_image`` all go through :func:`open_regular`, which
opens without blocking and checks what it opened before reading a byte.

It is also the one place a member of a tar shard is read: a path ``<shard>.tar:<member>`` (a member address, see
:mod:`fasttrain.data.shards`) opens as the member's bytes, read at the offset the shard's index gives, so every
backend reads shards as it reads files.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "INDEX_SUFFIX",
    "MANIFEST",
    "SEP",
    "NotRegularFileError",
    "ShardIndex",
    "address",
    "holding",
    "index_tar",
    "is_remote_address",
    "is_shard_root",
    "known_index",
    "kind_of",
    "load_index",
    "not_regular_reason",
    "open_member",
    "open_regular",
    "parse_index",
    "set_remote_reader",
    "split_address",
]

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
    A member address of an existing shard opens as an in-memory file of the member's bytes.
    """
    if SEP in os.fspath(path):
        member = open_member(os.fspath(path))
        if member is not None:
            return member
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


# -- tar shard members --------------------------------------------------------------------------------------------
# A member address is ``<shard>.tar:<member>`` (see fasttrain.data.shards, which finds a shard dataset's samples).

SEP = ".tar:"
"""What joins a shard and a member name in a member address (the shard's ``.tar`` and a colon)."""
INDEX_SUFFIX = ".idx"
"""``<shard>.tar`` + this: the shard's index (JSON: each member's name, data offset and size; the targets)."""
INDEX_FORMAT = "fasttrain-shard-index"
MANIFEST = "shards.json"
"""The dataset-level manifest of a packed folder (sample kind, classes, splits with their shards and counts)."""
BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
"""A brace range in a shard pattern: ``train-{000000..000009}.tar``."""
URL = re.compile(r"^[a-z][a-z0-9+.-]+://", re.IGNORECASE)
"""A URL root: ``http(s)://`` (urllib), or an object store's (``s3://``, ``gs://``... through fsspec)."""


def address(shard: str | os.PathLike, member: str) -> str:
    """The address of ``member`` of ``shard`` (a ``.tar`` path)."""
    return f"{os.fspath(shard)}:{member}"


def split_address(path: str) -> tuple[str, str] | None:
    """(shard, member) of a member address; None for anything else (a plain file path)."""
    i = path.rfind(SEP)
    if i < 0:
        return None
    return path[: i + len(SEP) - 1], path[i + len(SEP) :]


PACKED_FORMATS = frozenset({"folder", "paired", "drawing", "manifest"})
"""The formats ``fasttrain pack`` packs: their shards are found under any of them (a pix2pix config keeps its
``data.format = paired`` and points data.root at the packed folder)."""


def is_shard_root(fmt: str, root: str | os.PathLike) -> bool:
    """Whether ``data.root`` names shards: ``data.format = shards``, or with a format fasttrain packs a ``.tar``
    file, a brace pattern, a URL (``http(s)://``, ``s3://``...), or a folder holding ``shards.json``; with the
    default ``folder`` format also ``.tar`` files and no sub-folder (a folder dataset with a stray archive stays a
    folder dataset)."""
    if fmt == "shards":
        return True
    if fmt not in PACKED_FORMATS:
        return False
    text = os.fspath(root)
    if URL.match(text) or BRACE.search(text) or text.endswith(".tar"):
        return True
    p = Path(text).expanduser()
    if (p / MANIFEST).is_file():  # what fasttrain pack wrote, from any format it packs
        return True
    if fmt != "folder":
        return False
    try:
        with os.scandir(p) as it:
            visible = [e for e in it if not e.name.startswith(".")]
    except OSError:
        return False
    return any(e.name.endswith(".tar") for e in visible) and not any(e.is_dir() for e in visible)


@dataclass
class ShardIndex:
    """Where each member's bytes lie in one shard."""

    members: dict[str, tuple[int, int]]
    """member name -> (data offset, size) in bytes."""
    targets: dict[str, Any] = field(default_factory=dict)
    """sample key -> its target as the index records it (class index or list of floats); may be empty."""
    size: int | None = None
    """The shard's size in bytes when the index was written (None: unknown)."""


_INDEXES: dict[str, ShardIndex] = {}
_FDS: dict[str, int] = {}
_LOCK = threading.Lock()
_MAX_FDS = 256
IN_HAND: dict[str, bytes] = {}
"""Member address -> its bytes, for members a streaming reader holds (:mod:`fasttrain.data.stream`: a sample's
members read off a remote shard's stream); :func:`open_member` serves these first, so the datasets decode a
streamed sample as they decode any member. Filled by :func:`holding`."""
_HOLDING = threading.local()


@contextlib.contextmanager
def holding(members: dict[str, bytes]) -> Iterator[None]:
    """Serve ``members`` (address -> bytes) from memory inside the block; a remote member that is not among them
    is then missing (FileNotFoundError), never downloaded: a streamed sample is decoded from its stream alone."""
    IN_HAND.update(members)
    _HOLDING.on = True
    try:
        yield
    finally:
        _HOLDING.on = False
        for a in members:
            IN_HAND.pop(a, None)


_REMOTE: list[Callable[[str], str]] = []
"""How a remote shard becomes a local file, for readers that need its members by offset (the GPU cache, DALI,
the pre-check): set by :mod:`fasttrain.data.shards`, which downloads it whole into the cache once."""


def is_remote_address(path: str) -> bool:
    """Whether ``path`` is a member address of a shard given by URL (a streamed shard)."""
    return SEP in path and bool(URL.match(path))


def set_remote_reader(fetch: Callable[[str], str]) -> None:
    """``fetch(url) -> local path`` of a remote shard (see :data:`_REMOTE`)."""
    _REMOTE[:] = [fetch]


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker) keeps the parent's shard descriptors: they are its own copies of
    open descriptors of the same files, and ``pread`` moves no shared file position, so parent and children read
    through them at once without clashing (dropping them leaked up to 256 per worker, which then opened them all
    again). Only the lock is new: a thread of the parent may have held it at the fork, and none is left to free it."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def index_tar(shard: str | os.PathLike) -> ShardIndex:
    """Index a tar by reading its headers (a shard written without ``.idx``, as WebDataset's tools write them).
    Only regular members are listed. ValueError names the shard when it is no tar."""
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = (m.offset_data, m.size)
    except tarfile.TarError as e:
        raise ValueError(f"{os.fspath(shard)} is not a readable tar file ({e})") from None
    return ShardIndex(members, size=os.path.getsize(shard))


def parse_index(text: str | bytes, where: str) -> ShardIndex:
    """A shard index from its JSON; ValueError naming ``where`` when it is damaged."""
    try:
        raw = json.loads(text)
        if raw.get("format") != INDEX_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {INDEX_FORMAT!r}")
        members = {str(n): (int(o), int(s)) for n, o, s in raw["members"]}
        return ShardIndex(members, dict(raw.get("targets") or {}), raw.get("size"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"shard index {where} is damaged ({type(e).__name__}: {e})") from None


def load_index(shard: str, index: ShardIndex | None = None) -> ShardIndex:
    """The index of a local shard (kept per process): ``index`` when given (a downloaded shard's), else its
    ``.idx`` file, else its tar headers. ValueError names a damaged index or a file that is no tar."""
    if index is not None:
        _INDEXES[shard] = index
    idx = _INDEXES.get(shard)
    if idx is not None:
        return idx
    side = shard + INDEX_SUFFIX
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as f:
            idx = parse_index(f.read(), side)
    else:
        idx = index_tar(shard)
    _INDEXES[shard] = idx
    return idx


def known_index(shard: str) -> ShardIndex | None:
    """The index this process holds for ``shard`` (a path or a URL), without reading anything; None if none."""
    return _INDEXES.get(shard)


def _shard_fd(shard: str) -> tuple[int, bool]:
    """An open descriptor of ``shard`` and whether the caller must close it. Descriptors are kept per process
    (``pread`` moves no shared position, so threads share them); a forked child keeps its parent's (see
    :func:`_after_fork_in_child`)."""
    with _LOCK:
        fd = _FDS.get(shard)
        if fd is not None:
            return fd, False
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    with _LOCK:
        if len(_FDS) < _MAX_FDS and shard not in _FDS:
            _FDS[shard] = fd
            return fd, False
    return fd, True


def _local_copy(url: str, path: str) -> str:
    """The local copy of the remote shard ``url`` (downloaded on first use); OSError naming ``path``."""
    if getattr(_HOLDING, "on", False):
        raise FileNotFoundError(errno.ENOENT, "not among the sample's members in the shard's stream", path)
    if not _REMOTE:
        raise OSError(errno.ENOENT, f"shard {url} is remote and no reader for it is set", path)
    try:
        return _REMOTE[0](url)
    except (ValueError, OSError) as e:  # ConfigError (unreachable, wrong size) or OSError: the member is lost
        raise OSError(errno.EIO, f"cannot download shard {url} ({e})", path) from None


def open_member(path: str) -> io.BytesIO | None:
    """The bytes of the member at ``path`` (a member address) as a seekable in-memory file, read with one
    ``pread`` at the offset the shard's index gives; None when ``path`` names no existing shard (it is then a
    plain file path). A member the index lacks, a damaged index, or a shard cut short raise an OSError naming
    the address."""
    parts = split_address(path)
    if parts is None:
        return None
    held = IN_HAND.get(path)
    if held is not None:
        return io.BytesIO(held)
    shard, member = parts
    if URL.match(shard):
        shard = _local_copy(shard, path)
    elif shard not in _INDEXES and not os.path.isfile(shard):
        return None
    try:
        where = load_index(shard).members.get(member)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e), path) from None
    if where is None:
        raise FileNotFoundError(errno.ENOENT, f"no member {member!r} in shard {shard}", path)
    offset, size = where
    fd, close = _shard_fd(shard)
    try:
        data = os.pread(fd, size, offset)
    finally:
        if close:
            os.close(fd)
    if len(data) != size:
        raise OSError(errno.EIO, f"shard {shard} is cut short: member {member!r} runs past its end", path)
    return io.BytesIO(data)
