"""Image validation, one set of rules for every backend and for ``fasttrain check-data``, at two depths.

:func:`check_header` is cheap (a stat, a read of at most 64 KiB, one of 64 bytes): the entry is a regular file
(a FIFO named ``x.png`` is never opened for a blocking read), not empty, in a format the loaders read (magic
bytes), its header's width x height within ``data.max_image_pixels`` (Pillow's decompression-bomb limit by
default), a PNG's image data a zlib stream, a JPEG or PNG not cut short (a missing end marker is confirmed by a
full decode). It also says how the file must be decoded so that every backend sees the same pixels
(:attr:`ImageInfo.pil`). Every loader runs it on all its files once, at construction, with threads
(:func:`precheck`), and skips what fails; for a split from the dataset index (:mod:`fasttrain.data.index`,
which ran it once per dataset version) the answers come from the index, no file opened. A file the index left
unchecked (``data.header_checks = read``) is judged by the same rules when a loader reads its bytes
(:func:`read_checked`, :func:`check_bytes`) and skipped as the pre-check skips: not counted by
``data.max_bad_per_epoch``.

:func:`check_image` adds the full decode the torch loader does, and notes on odd files; ``check-data`` runs it and
reports, never modifying, moving or deleting a file.

Files that pass the pre-check and still fail to decode mid-run are recorded by each loader's :class:`BadFiles`:
skipped, logged, listed in ``loader.skipped``; more than ``data.max_bad_per_epoch`` of them in one epoch stop the
run with :class:`BadDataError`, which lists them.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from fasttrain.config import PILLOW_BOMB_PIXELS, default_workers
from fasttrain.data.decode import DECODE_ERRORS, convert_image, decode_image
from fasttrain.data.files import SEP, NotRegularFileError, is_shard_root, open_regular, split_address
from fasttrain.data.sources import note_progress, scan_images
from fasttrain.io import sniff_image_format

log = logging.getLogger(__name__)

__all__ = [
    "BadDataError",
    "BadFiles",
    "CheckReport",
    "FileVerdict",
    "ImageInfo",
    "Precheck",
    "check_data",
    "check_file",
    "check_file_stat",
    "check_files_stat",
    "check_header",
    "check_headers",
    "check_bytes",
    "check_stream",
    "load_checked",
    "read_checked",
    "UnusableImage",
    "check_image",
    "jpeg_scan_suspect",
    "pil_decode_error",
    "precheck",
    "sniff_image_format",
]

_FORMAT_EXT = {
    "JPEG": {".jpg", ".jpeg"},
    "PNG": {".png"},
    "BMP": {".bmp"},
    "WEBP": {".webp"},
    "TIFF": {".tif", ".tiff"},
    "PPM": {".ppm", ".pgm", ".pnm"},
}
_HEAD = 64 * 1024  # one read covers the headers of nearly every JPEG (EXIF, ICC) and PNG; longer ones seek on
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class BadDataError(ValueError):
    """The data cannot be trained on (no usable image, or too many that fail to decode); the message lists files."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    """jpeg, png, bmp, tiff, webp, pnm, jpeg2000."""
    width: int
    height: int
    pil: bool
    """True when only Pillow's decode and ``decode.convert_image`` give the pixels every backend agrees on:
    transparency (composited on white), 16-bit or sub-byte samples, palettes, CMYK / lossless / 12-bit JPEG, and
    every format besides JPEG and PNG. False for 8-bit grey or colour JPEG (baseline, progressive) and 8-bit
    grey or RGB PNG without transparency, which any decoder turns into the same pixels."""


FileVerdict = tuple[ImageInfo | None, str | None, int, tuple[int, int] | None]
"""(header, None) or (None, why unusable); the size in bytes (-1: not opened); (st_size, st_mtime_ns) or None."""


class _Bad(Exception):
    """A reason the file is unusable, raised inside the header parsers."""


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise _Bad(f"truncated {what}")
    return b


def _jpeg_header(f: BinaryIO) -> tuple[int, int, bool]:
    """(width, height, needs PIL) from the frame header (SOFn), walking the marker segments before it."""
    f.seek(2)
    while True:
        b = f.read(1)
        if not b:
            raise _Bad("JPEG without a frame header (SOF) before the end of the file")
        if b != b"\xff":
            raise _Bad("corrupt JPEG: marker segments out of step")
        m = f.read(1)
        while m == b"\xff":  # fill bytes
            m = f.read(1)
        if not m:
            raise _Bad("JPEG without a frame header (SOF) before the end of the file")
        marker = m[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            continue
        if marker in (0xD9, 0xDA):
            raise _Bad("corrupt JPEG: image data before any frame header (SOF)")
        (length,) = struct.unpack(">H", _read_exact(f, 2, "JPEG marker segment"))
        if length < 2:
            raise _Bad("corrupt JPEG: a marker segment of negative length")
        if marker in _SOF:
            precision, height, width, comps = struct.unpack(">BHHB", _read_exact(f, 6, "JPEG frame header"))
            if width == 0 or height == 0:
                raise _Bad(f"JPEG frame header says {width}x{height} pixels")
            plain = marker in (0xC0, 0xC1, 0xC2) and precision == 8 and comps in (1, 3)
            return width, height, not plain
        f.seek(length - 2, os.SEEK_CUR)


def _png_header(f: BinaryIO) -> tuple[int, int, bool]:
    """(width, height, needs PIL) from IHDR and the chunks before the first IDAT, whose zlib header is checked."""
    f.seek(8)
    length, kind = struct.unpack(">I4s", _read_exact(f, 8, "PNG header"))
    if kind != b"IHDR" or length != 13:
        raise _Bad("corrupt PNG: no IHDR chunk first")
    ihdr = _read_exact(f, 13, "PNG header")
    (crc,) = struct.unpack(">I", _read_exact(f, 4, "PNG header"))
    if zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF != crc:
        raise _Bad("corrupt PNG: IHDR checksum mismatch")
    width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
    if width == 0 or height == 0:
        raise _Bad(f"PNG header says {width}x{height} pixels")
    transparency = False
    while True:
        length, kind = struct.unpack(">I4s", _read_exact(f, 8, "PNG (no image data)"))
        if kind == b"IDAT":
            if length >= 2:
                cmf, flg = _read_exact(f, 2, "PNG image data")
                if cmf & 0x0F != 8 or cmf >> 4 > 7 or (cmf << 8 | flg) % 31 or flg & 0x20:
                    raise _Bad("corrupt PNG: the image data (IDAT) is not a zlib stream")
            break
        if kind == b"IEND":
            raise _Bad("corrupt PNG: no image data (IDAT)")
        transparency |= kind == b"tRNS"
        f.seek(length + 4, os.SEEK_CUR)
    plain = depth == 8 and color in (0, 2) and not transparency
    return width, height, not plain


def _pil_header(f: BinaryIO) -> tuple[int, int, bool]:
    f.seek(0)
    try:
        with Image.open(f) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise _Bad(f"decompression bomb ({e})") from None
    except DECODE_ERRORS as e:
        raise _Bad(f"cannot be read as an image ({type(e).__name__}: {e})") from None
    return width, height, True


def check_header(path: str | os.PathLike, max_pixels: int = PILLOW_BOMB_PIXELS) -> tuple[ImageInfo | None, str | None]:
    """(what the header says, None), or (None, why the file cannot be used). Cheap: see the module docstring.

    A JPEG or PNG whose last 64 bytes hold no end marker (a cut-off download) is decoded once with PIL to tell a
    truncated image from a valid one with trailing bytes."""
    info, why, _ = check_file(path, max_pixels)
    return info, why


def check_file(
    path: str | os.PathLike, max_pixels: int = PILLOW_BOMB_PIXELS
) -> tuple[ImageInfo | None, str | None, int]:
    """:func:`check_header` and the file's size in bytes (-1 when it could not be opened). A file shorter than
    64 KiB is judged from one read (one open, one read: the common small JPEG); a longer one, or one whose
    read fails, from the file itself, as :func:`check_stream` reads it."""
    info, why, size, _ = check_file_stat(path, max_pixels)
    return info, why, size


def check_file_stat(path: str | os.PathLike, max_pixels: int = PILLOW_BOMB_PIXELS) -> FileVerdict:
    """:func:`check_file`, and the ``(st_size, st_mtime_ns)`` of the file it opened, from an fstat taken before
    its first byte was read (None when it was judged without one). The dataset index fingerprints a checked file
    with it: a file changed after that stat is seen as changed at the next start.

    A plain JPEG or PNG (header within the first read, end marker present, within the pixel limit) is judged by
    :func:`_quick_header` from bytes already read; any other file, or any doubt, by :func:`_check_file_slow`,
    whose verdicts are the rules' (so both give the same verdict, the quick path only answers sooner)."""
    p = os.fspath(path)
    st = None
    if SEP not in p:
        try:
            fd = os.open(p, _OPEN_FLAGS)
        except OSError:
            return (*_check_file_slow(p, max_pixels), None)
        try:
            s = os.fstat(fd)
            if stat.S_ISREG(s.st_mode):
                st = (s.st_size, s.st_mtime_ns)
                head = os.read(fd, _HEAD)
                size = len(head)
                if size == s.st_size and size < _HEAD:  # the whole file
                    tail = head[-64:]
                elif size == _HEAD and s.st_size > _HEAD:
                    tail, size = os.pread(fd, 64, s.st_size - 64), s.st_size
                else:  # changed while read, or short read: judged below
                    head = b""
                got = _quick_header(head, tail, max_pixels) if head else None
                if got is not None:
                    return got, None, size, st
        except OSError:
            pass
        finally:
            os.close(fd)
    return (*_check_file_slow(p, max_pixels), st)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_PLAIN_JPEG = {(0xC0, 8, 1), (0xC0, 8, 3), (0xC1, 8, 1), (0xC1, 8, 3), (0xC2, 8, 1), (0xC2, 8, 3)}
_INFOS: dict[tuple[str, int, int, bool], ImageInfo] = {}
"""One ImageInfo per distinct header (a frozen dataclass: shared, not made 1.3 M times)."""


def image_info(kind: str, width: int, height: int, pil: bool) -> ImageInfo:
    """``ImageInfo(kind, width, height, pil)``, one object per distinct value (most datasets hold few sizes)."""
    key = (kind, width, height, pil)
    got = _INFOS.get(key)
    if got is None:
        if len(_INFOS) > 4096:  # many sizes (a photo collection): shared within a run of 4096
            _INFOS.clear()
        got = _INFOS[key] = ImageInfo(kind, width, height, pil)
    return got


def _quick_header(head: bytes, tail: bytes, max_pixels: int) -> ImageInfo | None:
    """The verdict on a good plain JPEG or PNG from its first bytes (its headers) and last 64 bytes, parsed as
    :func:`_jpeg_header` / :func:`_png_header` parse them; None for anything else or anything in doubt (another
    format, a header past ``head``, a missing end marker, too many pixels, anything odd): those are judged by the
    full check, which words the reasons."""
    try:
        if head[:3] == b"\xff\xd8\xff":
            kind, got = "jpeg", _quick_jpeg(head)
            end = b"\xff\xd9"
        elif head[:8] == b"\x89PNG\r\n\x1a\n":
            kind, got = "png", _quick_png(head)
            end = b"IEND"
        else:
            return None
    except (IndexError, struct.error):
        return None
    if got is None or got[0] * got[1] > max_pixels or end not in tail:
        return None
    return image_info(kind, *got)


def _quick_jpeg(b: bytes) -> tuple[int, int, bool] | None:
    """:func:`_jpeg_header` on bytes in memory; None where it would raise (or would read past ``b``)."""
    i = 2
    while True:
        if b[i] != 0xFF:
            return None
        i += 1
        while b[i] == 0xFF:  # fill bytes
            i += 1
        marker = b[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue
        if marker in (0xD9, 0xDA):
            return None
        length = b[i] << 8 | b[i + 1]
        if length < 2:
            return None
        if marker in _SOF:
            precision, height, width, comps = struct.unpack_from(">BHHB", b, i + 2)
            if width == 0 or height == 0:
                return None
            return width, height, (marker, precision, comps) not in _PLAIN_JPEG
        i += length


def _quick_png(b: bytes) -> tuple[int, int, bool] | None:
    """:func:`_png_header` on bytes in memory; None where it would raise (or would read past ``b``)."""
    if b[8:16] != b"\x00\x00\x00\rIHDR" or len(b) < 33:
        return None
    if zlib.crc32(b[12:29]) != struct.unpack_from(">I", b, 29)[0]:
        return None
    width, height, depth, color = struct.unpack_from(">IIBB", b, 16)
    if width == 0 or height == 0:
        return None
    transparency, i = False, 33
    while True:
        length, kind = struct.unpack_from(">I4s", b, i)
        i += 8
        if kind == b"IDAT":
            if length >= 2:
                if i + 2 > len(b):
                    return None
                cmf, flg = b[i], b[i + 1]
                if cmf & 0x0F != 8 or cmf >> 4 > 7 or (cmf << 8 | flg) % 31 or flg & 0x20:
                    return None
            break
        if kind == b"IEND":
            return None
        transparency |= kind == b"tRNS"
        i += length + 4
    return width, height, not (depth == 8 and color in (0, 2) and not transparency)


def _check_file_slow(path: str, max_pixels: int) -> tuple[ImageInfo | None, str | None, int]:
    """:func:`check_file` by the rules themselves (:func:`check_stream` on the first read or the file)."""
    size = -1
    try:
        with open_regular(path) as f:
            try:
                head: bytes | None = f.read(_HEAD)
            except OSError:
                head = None  # judged below from the file, which words the error as it always has
            if head is not None and len(head) < _HEAD:
                info, why = check_stream(io.BytesIO(head), max_pixels)
                return info, why, len(head)
            size = f.seek(0, os.SEEK_END)  # not fstat: a shard member opens as a BytesIO, which has no fileno
            f.seek(0)
            info, why = check_stream(f, max_pixels)
            return info, why, size
    except NotRegularFileError as e:
        return None, e.strerror, size
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})", size


def check_headers(
    paths: Sequence[str], max_pixels: int = PILLOW_BOMB_PIXELS, threads: int = 1
) -> list[tuple[ImageInfo | None, str | None, int]]:
    """:func:`check_file` on every path, in order, on ``threads`` threads (see :func:`check_files_stat`)."""
    return [(info, why, size) for info, why, size, _ in check_files_stat(paths, max_pixels, threads)]


def check_files_stat(paths: Sequence[str], max_pixels: int = PILLOW_BOMB_PIXELS, threads: int = 1) -> list[FileVerdict]:
    """:func:`check_file_stat` on every path, in order, on up to ``threads`` threads that each take a run of paths
    (one task per file cost more than the check of a small cached JPEG). Threads pay only where the checks wait on
    the disk (a cold disk, a network file system): the first files are checked on this thread, and when that made
    (almost) no blocking wait (the files are in the page cache) the rest are too: threads would then only trade
    the interpreter's lock (measured on 2 cores, 200,000 cached JPEGs: 4 threads took 1.2-1.8x the CPU time of
    one for the same wall time)."""

    def check(path: str) -> FileVerdict:
        note_progress()  # the other ranks' wait for rank 0's index goes on while the checks do
        return check_file_stat(path, max_pixels)

    if len(paths) <= 64 or threads <= 1:
        return [check(p) for p in paths]
    done: list[FileVerdict] = []
    waits = _waits() if len(paths) >= 4 * _PROBE else None
    if waits is not None:
        done = [check(p) for p in paths[:_PROBE]]
        if (_waits() or 0) - waits < _PROBE // 20:
            return done + [check(p) for p in paths[_PROBE:]]
        paths = paths[_PROBE:]
    step = max(16, min(512, len(paths) // (threads * 8)))
    runs = [paths[i : i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return done + [r for part in pool.map(lambda run: [check(p) for p in run], runs) for r in part]


_PROBE = 1000
"""Files checked on the calling thread before choosing threads or not."""


def _waits() -> int | None:
    """This thread's voluntary context switches so far (Linux: its waits on the disk); None where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    except (ImportError, AttributeError, OSError):
        return None


def check_stream(f: BinaryIO, max_pixels: int = PILLOW_BOMB_PIXELS) -> tuple[ImageInfo | None, str | None]:
    """:func:`check_header` on an open, seekable binary file (a file, or the bytes of one already read)."""
    kind = None
    try:
        head = f.read(16)
        if not head:
            return None, "empty file"
        kind = sniff_image_format(head)
        if kind is None:
            return None, f"not a JPEG/PNG/BMP/TIFF/WebP/PNM/JPEG 2000 file (starts with {head[:8].hex(' ')})"
        parse = {"jpeg": _jpeg_header, "png": _png_header}.get(kind, _pil_header)
        width, height, pil = parse(f)
        if width * height > max_pixels:
            return None, (
                f"{width}x{height} = {width * height:,} pixels, more than data.max_image_pixels "
                f"({max_pixels:,}): a decompression-bomb guard; raise it if the image is genuine"
            )
        if kind in ("jpeg", "png"):
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64))
            if (b"\xff\xd9" if kind == "jpeg" else b"IEND") not in f.read():
                f.seek(0)
                with Image.open(f) as im:
                    im.load()
    except _Bad as e:
        return None, str(e)
    except NotRegularFileError as e:
        return None, e.strerror
    except OSError as e:
        if kind is None:
            return None, f"cannot be read ({e.strerror or e})"
        return None, f"truncated or corrupt {kind} ({type(e).__name__}: {e})"
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"truncated or corrupt {kind} ({type(e).__name__}: {e})"
    return ImageInfo(kind, width, height, pil), None


# Inside a JPEG's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), 0xFF (fill) or RST0-7; between the
# scans of a progressive file stand tables (DHT, DQT, DRI, DAC, DNL), comments, APPn and the next SOS; EOI ends it.
_SCAN_FF = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_BETWEEN_SCANS = frozenset({0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})


def jpeg_scan_suspect(data: bytes) -> bool:
    """Whether a JPEG's scan data holds a marker that cannot stand there (one pass of a C regex over the bytes).

    Such a file is "corrupt mid-stream": libjpeg stops the scan early, and what follows decides the verdict;
    Pillow refuses it (the torch loader and the cache skip it) while DALI's decoders fill the rest in and
    decode it with only an unattributed "Corrupt JPEG data" line on stderr. Only these files can get different
    verdicts, so only they need :func:`pil_decode_error` before DALI is given them."""
    at = data.find(b"\xff\xda")
    if at < 0:
        return True
    while (m := _SCAN_FF.search(data, at + 2)) is not None:
        marker = data[m.start() + 1]
        if marker == 0xD9:  # EOI: what follows is trailing bytes, which every decoder ignores
            return False
        if marker not in _BETWEEN_SCANS or m.start() + 4 > len(data):
            return True
        (length,) = struct.unpack(">H", data[m.start() + 2 : m.start() + 4])
        at = m.start() + 2 + length - 2  # past the segment (a table may hold 0xFF bytes), then its scan if SOS
    return True  # no end marker


def pil_decode_error(data: bytes) -> str | None:
    """Why Pillow's full decode refuses these encoded bytes (the reason :func:`check_image` gives), or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except DECODE_ERRORS as e:
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


class UnusableImage(ValueError):
    """What :func:`load_checked` raises: the message is the validator's reason, as the pre-check gives it."""


def check_bytes(data: bytes, max_pixels: int = PILLOW_BOMB_PIXELS) -> tuple[ImageInfo | None, str | None]:
    """:func:`check_header`'s verdict on a whole file's bytes already read: :func:`_quick_header` on its first
    64 KiB and last 64 bytes, as :func:`check_file_stat` judges a file, and on any doubt :func:`check_stream`."""
    info = _quick_header(data[:_HEAD], data[-64:], max_pixels) if data else None
    if info is not None:
        return info, None
    return check_stream(io.BytesIO(data), max_pixels)


def read_checked(path: str, max_pixels: int = PILLOW_BOMB_PIXELS) -> tuple[bytes, ImageInfo]:
    """A file's bytes, read once, and its header judged from them by the pre-check's rules (a file the index left
    unchecked, read by a loader). Raises :class:`UnusableImage` with the reason :func:`check_header` gives."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except NotRegularFileError as e:
        raise UnusableImage(e.strerror) from None
    except OSError as e:
        raise UnusableImage(f"cannot be read ({e.strerror or e})") from None
    info, why = check_bytes(data, max_pixels)
    if info is None:
        raise UnusableImage(why or "unreadable")
    return data, info


def load_checked(path: str, channels: int, max_pixels: int = PILLOW_BOMB_PIXELS) -> Image.Image:
    """The pre-check and the decode from **one read** of the file (the GPU cache's build: each file opened once,
    not once for its header and again for its pixels). Raises :class:`UnusableImage` with the reason
    :func:`check_header` gives, or the decode's own error."""
    data, _ = read_checked(path, max_pixels)
    return decode_image(io.BytesIO(data), channels, max_pixels)


# ---------------------------------------------------------------------------------------------------------
# What the loaders share: the pre-check at construction, and the record of files that fail later.


@dataclass
class Precheck:
    keep: list[int]
    """Indices of the paths that passed."""
    infos: list[ImageInfo | None]
    """Per kept path, what its header says (None: not checked yet, only where :func:`precheck` was asked to
    keep unchecked files)."""
    bad: list[tuple[str, str]]
    """(path, reason) of those that did not, each logged."""


_REMEMBERED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fasttrain_precheck", default=None)


@contextlib.contextmanager
def remembered_prechecks() -> Iterator[dict]:
    """Within the block, :func:`precheck` answers each file list once, whoever asks (autotune builds a loader per
    setting it tries; reading every header again costs minutes on 1.28 M files). Yields the answers by key."""
    token = _REMEMBERED.set({})
    try:
        memo = _REMEMBERED.get()
        assert memo is not None
        yield memo
    finally:
        _REMEMBERED.reset(token)


def precheck(
    paths: Sequence[str], *, max_pixels: int, threads: int, split: str = "train", unchecked: bool = False
) -> Precheck:
    """:func:`check_header` on every path (threads: it is I/O bound); raises :class:`BadDataError` when none passes.
    Paths from the dataset index (:class:`~fasttrain.data.index.IndexedPaths`) are answered from its verdicts,
    no file opened. Inside :func:`remembered_prechecks` a file list checked before is answered from memory.
    ``unchecked``: files the index holds unchecked (``data.header_checks = read``) are kept with no header (the
    loader checks each as it reads it); otherwise every file is checked here."""
    indexed = getattr(paths, "indexed_precheck", None)
    answer = indexed(max_pixels, unchecked) if indexed is not None else None
    if answer is not None:
        out = Precheck(*answer)
        for path, why in out.bad:
            log.warning("skipping %s: %s", path, why)
        if not out.keep:
            raise BadDataError(_none_usable(split, len(paths), out.bad))
        return out
    memo = _REMEMBERED.get()
    if memo is None:  # no tuple of every path unless it is remembered
        return _precheck(paths, max_pixels=max_pixels, threads=threads, split=split)
    key = (tuple(paths), max_pixels, split)
    if key not in memo:
        memo[key] = _precheck(paths, max_pixels=max_pixels, threads=threads, split=split)
    return memo[key]


def _precheck(paths: Sequence[str], *, max_pixels: int, threads: int, split: str) -> Precheck:
    results = check_headers(paths, max_pixels, threads)
    out = Precheck([], [], [])
    for i, (path, (info, why, _)) in enumerate(zip(paths, results)):
        if info is not None:
            out.keep.append(i)
            out.infos.append(info)
        else:
            out.bad.append((path, why or "unreadable"))
            log.warning("skipping %s: %s", path, why)
    if not out.keep:
        raise BadDataError(_none_usable(split, len(paths), out.bad))
    return out


def _none_usable(split: str, total: int, bad: list[tuple[str, str]]) -> str:
    shown = "".join(f"\n  {p}: {why}" for p, why in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (
        f"no usable image in the {split} split ({total} files):{shown}{more}\n"
        f"`fasttrain check-data DATA` reports every file; fix or replace them, or point data.root elsewhere"
    )


class BadFiles:
    """A loader's record of files found unusable after the pre-check, and the per-epoch limit.

    ``skipped`` is the loader's own list (appended in place). :meth:`add` logs a file once, and raises
    :class:`BadDataError` listing this epoch's failures when there are more than ``limit`` of them."""

    def __init__(self, skipped: list[tuple[str, str]], limit: int, unit: str = "epoch"):
        self.skipped, self.limit, self.unit = skipped, limit, unit
        self._known = {p for p, _ in skipped}
        self._epoch: object = None
        self._this_epoch: list[tuple[str, str]] = []

    def __contains__(self, path: str) -> bool:
        return path in self._known

    def start_epoch(self, epoch: object) -> None:
        """Count from zero for a new epoch (the same epoch again, resumed or restarted, keeps its count)."""
        if epoch != self._epoch:
            self._epoch, self._this_epoch = epoch, []

    def add(self, path: str, reason: str, counted: bool = True) -> None:
        """Record a file that failed; ``counted=False`` for one the pre-check's rules refused (skipped like a
        pre-check failure: only failures to decode count against the limit)."""
        if path in self._known:
            return
        self._known.add(path)
        self.skipped.append((path, reason))
        log.warning("skipping %s: %s", path, reason)
        if not counted:
            return
        self._this_epoch.append((path, reason))
        if len(self._this_epoch) > self.limit:
            listed = "".join(f"\n  {p}: {why}" for p, why in self._this_epoch)
            raise BadDataError(
                f"{len(self._this_epoch)} files failed to decode in one {self.unit}, more than "
                f"data.max_bad_per_epoch = {self.limit}; stopping rather than training on damaged data:{listed}\n"
                f"fix or remove them (`fasttrain check-data DATA --skip-list FILE` lists every bad file), "
                f"or raise data.max_bad_per_epoch"
            )

    def none_decoded(self, split: str) -> BadDataError:
        """The error for an epoch in which not one sample decoded (the pre-check's error when every file was
        refused by its rules, as when they were checked on their own)."""
        if self.skipped and not self._this_epoch:
            return BadDataError(_none_usable(split, len(self.skipped), self.skipped))
        failed = self._this_epoch or self.skipped
        listed = "".join(f"\n  {p}: {why}" for p, why in failed[:10])
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        return BadDataError(
            f"not one image of the {split} split could be decoded:{listed}{more}\n"
            f"`fasttrain check-data DATA` reports every file; fix or replace them"
        )


# ---------------------------------------------------------------------------------------------------------
# check-data


@dataclass
class CheckReport:
    root: Path
    total: int
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(file, why it cannot be used), non-regular entries (FIFOs, broken links) included."""
    odd: list[tuple[str, str]] = field(default_factory=list)
    """(file, what is unusual; usable after conversion)."""
    empty: list[str] = field(default_factory=list)
    """Folders holding no image at all (an empty class folder trains on nothing)."""
    skip_list: Path | None = None
    layout: str = ""
    """Why training would refuse the folder as class folders (``data.format = folder``), or "". A note, not a
    verdict: the folder may be another format's (a manifest, drawing steps, pairs) or images to predict."""
    layout_notes: list[str] = field(default_factory=list)
    """What training warns of in the layout it would take (images beside the class folders, folders differing
    only in case, a validation split under another name)."""
    other_format: str = ""
    """The format the folder also reads as (paired: A/ and B/ folders; manifest: a labels.csv), or ""."""
    left_out: list[tuple[str, str]] = field(default_factory=list)
    """(file or record, why) that training under :attr:`other_format` leaves out: a pair without its partner,
    a manifest row without an image or a number."""

    def to_text(self) -> str:
        lines = [
            f"{self.root}: {self.total} images, {len(self.bad)} unreadable, {len(self.odd)} odd"
            + (f", {len(self.empty)} empty folders" if self.empty else "")
        ]
        lines += [f"  BAD  {f}: {why}" for f, why in self.bad]
        lines += [f"  EMPTY  {d}{os.sep}: no image in this folder" for d in self.empty]
        lines += _odd_lines(self.odd)
        if self.layout:
            lines.append(f"  LAYOUT  as class folders (data.format = folder), training refuses it: {self.layout}")
        lines += [f"  LAYOUT  {note}" for note in self.layout_notes]
        if self.other_format:
            lines.append(
                f"  LAYOUT  as data.format = {self.other_format}, training leaves out {len(self.left_out)} "
                f"record{'' if len(self.left_out) == 1 else 's'}{':' if self.left_out else ''}"
            )
            lines += [f"  LEFT OUT  {f}: {why}" for f, why in self.left_out[:50]]
            if len(self.left_out) > 50:
                lines.append(f"  ... and {len(self.left_out) - 50} more")
        if self.skip_list:
            lines.append(f"skip list written to {self.skip_list}")
        return "\n".join(lines)


def _odd_lines(odd: list[tuple[str, str]], per_kind: int = 5) -> list[str]:
    """The odd files by kind of note, the rarer kinds first (a misnamed PNG is not lost under a hundred
    grayscale files), ``per_kind`` of each named and the rest counted."""
    kinds: dict[str, list[tuple[str, str]]] = {}
    for f, why in odd:
        kinds.setdefault(re.sub(r"\d+x\d+", "WxH", why), []).append((f, why))
    lines = []
    for kind, files in sorted(kinds.items(), key=lambda kv: (len(kv[1]), kv[0])):
        lines += [f"  odd  {f}: {why}" for f, why in files[:per_kind]]
        if len(files) > per_kind:
            lines.append(f"  ... and {len(files) - per_kind} more odd files: {kind}")
    return lines


def check_image(
    path: str | os.PathLike, channels: int = 3, max_pixels: int = PILLOW_BOMB_PIXELS
) -> tuple[str | None, str | None]:
    """(reason it is bad or None, note on what is odd or None): :func:`check_header`, then the full decode and
    conversion of the torch loader."""
    info, why = check_header(path, max_pixels)
    if info is None:
        return why, None
    path = Path(path)
    try:
        with open_regular(path) as f, Image.open(f) as im:
            im.load()  # the full decode: corrupt image data fails here, not at open
            fmt, mode, size = im.format, im.mode, im.size
            transparent = mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            convert_image(im, channels)
    except DECODE_ERRORS as e:
        return f"cannot be decoded ({type(e).__name__}: {e})", None
    notes = []
    want = "RGB" if channels == 3 else "L"
    if mode != want:
        notes.append(
            f"mode {mode}, converted to {want}" + (" (transparency composited on white)" if transparent else "")
        )
    if min(size) < 8:
        notes.append(f"tiny ({size[0]}x{size[1]})")
    if fmt in _FORMAT_EXT and path.suffix.lower() not in _FORMAT_EXT[fmt]:
        notes.append(f"{fmt} data in a {path.suffix} file")
    return None, "; ".join(notes) or None


def check_data(
    root: str | os.PathLike,
    *,
    channels: int = 3,
    workers: int = 0,
    skip_list: str | os.PathLike | None = None,
    max_pixels: int = PILLOW_BOMB_PIXELS,
) -> CheckReport:
    """Every image under the folder ``root`` decoded once (:func:`check_image`); for tar shards (a packed folder,
    one ``.tar``, a brace pattern, a URL: what ``data.root`` takes) every image member, see :func:`_check_shards`.
    ``skip_list``: a new file to write the bad paths (or member addresses) into."""
    if skip_list is not None and Path(skip_list).exists():  # fail before decoding a large tree, not after
        raise FileExistsError(f"check-data --skip-list: {skip_list} already exists; it is not overwritten")
    if is_shard_root("folder", root):
        report = _check_shards(root, channels, workers, max_pixels)
    else:
        report = _check_folder(Path(root), channels, workers, max_pixels)
    report.bad.sort()
    if skip_list is not None:
        out = Path(skip_list)
        with open(out, "x", encoding="utf-8") as fh:  # "x": an existing file is never overwritten
            fh.writelines(f"{f}\n" for f, _ in report.bad)
        report.skip_list = out
    return report


def _checked(report: CheckReport, paths: Sequence[str], channels: int, workers: int, max_pixels: int) -> None:
    """:func:`check_image` on every path (threads), each verdict into ``report``."""
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = list(pool.map(lambda f: check_image(f, channels, max_pixels), paths))
    for f, (bad, odd) in zip(paths, results):
        if bad:
            report.bad.append((f, bad))
        elif odd:
            report.odd.append((f, odd))


def _check_folder(root: Path, channels: int, workers: int, max_pixels: int) -> CheckReport:
    if not root.is_dir():
        raise FileNotFoundError(f"check-data: {root} is not a folder")
    scan = scan_images(root)
    report = CheckReport(root, len(scan.files) + len(scan.others), empty=[str(d) for d in scan.empty_dirs])
    report.bad.extend(scan.others)
    _checked(report, [str(f) for f in scan.files], channels, workers, max_pixels)
    report.layout, report.layout_notes = _folder_layout(root)
    report.other_format, report.left_out = _other_format(root)
    return report


def _other_format(root: Path) -> tuple[str, list[tuple[str, str]]]:
    """The format besides class folders that ``root`` looks like (A/ and B/ folders: paired; a labels.csv:
    manifest), and what training in that format leaves out; ("", []) for none."""
    from fasttrain.config import ConfigError, DataConfig
    from fasttrain.data.sources import find_source

    fmt = ""
    if any((base / "A").is_dir() and (base / "B").is_dir() for base in (root, root / "train")):
        fmt = "paired"
    elif (root / DataConfig().manifest).is_file():
        fmt = "manifest"
    if not fmt:
        return "", []
    try:
        with _quiet("fasttrain.data"):
            src = find_source(DataConfig(root=str(root), format=fmt, val_fraction=0.0))
    except ConfigError as e:
        return fmt, [(str(root), str(e))]
    return fmt, list(src.skipped)


@contextlib.contextmanager
def _quiet(logger: str, notes: logging.Handler | None = None) -> Iterator[None]:
    """Discovery run for the report, whose lines say what it finds (EMPTY, BAD, LAYOUT): ``logger``'s warnings
    are not logged meanwhile; with ``notes`` they go to it alone."""
    quiet = logging.getLogger(logger)
    level, propagate = quiet.level, quiet.propagate
    if notes is not None:
        quiet.addHandler(notes)
        quiet.propagate = False
    quiet.setLevel(logging.ERROR if notes is None else logging.WARNING)
    try:
        yield
    finally:
        if notes is not None:
            quiet.removeHandler(notes)
        quiet.setLevel(level)
        quiet.propagate = propagate


class _Notes(logging.Handler):
    """The layout warnings discovery gives while check-data reads a folder as training would."""

    SAID = ("in no class folder", "differ only in case", "looks like a validation split")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(s in text for s in self.SAID):
            self.notes.append(text)


def _folder_layout(root: Path) -> tuple[str, list[str]]:
    """What training says of ``root`` as class folders (the default format): why it refuses them ("" when it
    takes them), and what it warns of."""
    from fasttrain.config import ConfigError, DataConfig
    from fasttrain.data.sources import find_source

    notes = _Notes()
    try:
        with _quiet("fasttrain.data.sources", notes):
            src = find_source(DataConfig(root=str(root), val_fraction=0.0))
    except ConfigError as e:
        return str(e), notes.notes
    names = src.class_names or []
    if len(names) < 2:
        return f"one class folder ({', '.join(names)}): a classifier needs at least 2 classes", notes.notes
    return "", notes.notes


def _check_shards(root: str | os.PathLike, channels: int, workers: int, max_pixels: int) -> CheckReport:
    """Tar shards: every image member training would read (each split's inputs, pairs' target images), checked
    as a file is and named by its address ``<shard>.tar:<member>``; a sample discovery cannot use (no label, no
    or two input images) is bad too, named ``<shard>.tar:<key>``. A shard that cannot be read at all is an error
    naming it, as training's."""
    from fasttrain.config import DataConfig
    from fasttrain.data.sources import find_source

    src = find_source(DataConfig(root=os.fspath(root), val_fraction=0.0), root)  # no hold-out: every sample
    members: dict[str, None] = {}
    for split in (src.train, src.val, src.test):
        if split is None:
            continue
        members.update(dict.fromkeys(split.paths))
        members.update(dict.fromkeys(t for t in split.targets if isinstance(t, str) and split_address(t)))
    report = CheckReport(Path(root), len(members) + len(src.skipped), bad=list(src.skipped))
    _checked(report, list(members), channels, workers, max_pixels)
    return report
