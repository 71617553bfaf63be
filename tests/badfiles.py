"""A corpus of bad (and awkward but valid) image files, written by hand so every case is exact and small.

Each ``write_*`` function writes one file (or FIFO, folder, link) at ``path`` and returns it. :func:`write_corpus`
puts one of each in a folder and returns ``(good, bad)``: the files every backend must train on, and the
entries every backend must skip, naming them.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["png_chunk", "jpeg_bytes", "write_corpus", "BAD", "GOOD"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _photo(seed: int, h: int = 40, w: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def jpeg_bytes(seed: int = 0, **save) -> bytes:
    buf = io.BytesIO()
    _photo(seed).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


# -- bad ------------------------------------------------------------------------------------------------------


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_truncated_jpeg(path: Path) -> Path:
    data = jpeg_bytes(1)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    _photo(2).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:300])
    return path


def write_png_idat_not_zlib(path: Path) -> Path:
    """Valid signature, IHDR, CRCs and IEND; the IDAT payload is not a zlib stream (the issue's case)."""
    path.write_bytes(_png(16, 16, b"this is not a zlib stream at all" * 4))
    return path


def write_png_corrupt_deflate(path: Path) -> Path:
    """A zlib header that parses (so a header check passes) followed by a deflate stream that does not:
    the decoder itself must fail on it."""
    rows = b"".join(b"\x00" + bytes(range(48)) for _ in range(16))
    good = zlib.compress(rows)
    bad = good[:2] + bytes(b ^ 0xA5 for b in good[2:])  # keep CMF/FLG, garble the stream and checksum
    path.write_bytes(_png(16, 16, bad))
    return path


def write_jpeg_huge_header(path: Path, side: int = 60000) -> Path:
    """A small real JPEG whose frame header (SOF0) claims ``side`` x ``side`` pixels."""
    data = bytearray(jpeg_bytes(3))
    at = data.find(b"\xff\xc0")
    assert at > 0, "baseline JPEG expected"
    data[at + 5 : at + 9] = struct.pack(">HH", side, side)  # length(2) precision(1) then height, width
    path.write_bytes(bytes(data))
    return path


def write_png_bomb(path: Path, side: int = 30000) -> Path:
    """A valid ``side`` x ``side`` 1-bit grayscale PNG of zeros: ~110 KB on disk, 900 M pixels decoded.

    The zero rows are streamed through one compressor, so nothing of the decoded size is ever allocated."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(comp.compress(row * (side % 1000)))
    chunks.append(comp.flush())
    path.write_bytes(_png(side, side, b"".join(chunks), bit_depth=1, color_type=0))
    return path


def write_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def write_directory(path: Path) -> Path:
    path.mkdir()
    return path


def write_text(path: Path) -> Path:
    path.write_text("this is a text file, not an image\n")
    return path


def write_dangling_symlink(path: Path) -> Path:
    path.symlink_to(path.parent / "does-not-exist.jpg")
    return path


def write_link_loop(path: Path) -> Path:
    """``path`` -> ``<stem>-partner<suffix>`` -> ``path``: a file symlink loop named like an image (stat: ELOOP)."""
    partner = path.with_name(f"{path.stem}-partner{path.suffix}")
    path.symlink_to(partner.name)
    partner.symlink_to(path.name)
    return path


def write_folder_loop(path: Path) -> Path:
    """A folder link to its own parent (``ln -s .. path``): walking it naively never ends."""
    path.symlink_to("..")
    return path


def write_corrupt_mid_stream_jpeg(path: Path) -> Path:
    """A JPEG whose header and end marker are intact but whose entropy-coded data is garbled halfway: the
    header pre-check passes it; Pillow refuses it when decoding."""
    data = bytearray(jpeg_bytes(7))
    sos = data.find(b"\xff\xda")
    mid = (sos + len(data)) // 2
    data[mid : mid + 24] = b"\xff\x99" * 12  # markers that cannot stand inside scan data
    path.write_bytes(bytes(data))
    return path


# -- awkward but valid ---------------------------------------------------------------------------------------


def write_transparent_png(path: Path) -> Path:
    """RGBA: a transparent left half stored as (0, 0, 0, 0), an opaque coloured right half, a half-transparent
    band. Composited on white, the left half is white; dropping alpha would make it black."""
    a = np.zeros((40, 56, 4), np.uint8)
    a[:, 28:, :3] = (200, 40, 90)
    a[:, 28:, 3] = 255
    a[10:20, :, :3] = (20, 120, 220)
    a[10:20, :, 3] = 128
    Image.fromarray(a, "RGBA").save(path)
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    _photo(4).convert("CMYK").save(path, format="JPEG", quality=92)
    return path


def write_png16(path: Path) -> Path:
    """16-bit grayscale: a ramp over the whole 0..65535 range."""
    ramp = np.linspace(0, 65535, 56, dtype=np.uint32)[None, :].repeat(40, 0)
    Image.fromarray(ramp.astype(np.uint16)).save(path)
    return path


def write_jpeg(path: Path, seed: int = 5) -> Path:
    path.write_bytes(jpeg_bytes(seed))
    return path


def write_png(path: Path, seed: int = 6) -> Path:
    _photo(seed).save(path, format="PNG")
    return path


BAD = {
    "empty.jpg": write_empty,
    "truncated.jpg": write_truncated_jpeg,
    "truncated.png": write_truncated_png,
    "idat-not-zlib.png": write_png_idat_not_zlib,
    "corrupt-deflate.png": write_png_corrupt_deflate,
    "huge-header.jpg": write_jpeg_huge_header,
    "bomb.png": write_png_bomb,
    "fifo.png": write_fifo,
    "folder.jpg": write_directory,
    "text.jpg": write_text,
    "dangling.jpg": write_dangling_symlink,
}
"""Entries no backend can use: name -> writer."""

GOOD = {
    "photo.jpg": write_jpeg,
    "photo.png": write_png,
    "transparent.png": write_transparent_png,
    "cmyk.jpg": write_cmyk_jpeg,
    "deep16.png": write_png16,
}
"""Valid files of unusual kinds every backend decodes with the same rules: name -> writer."""


def write_corpus(folder: Path, *, bad=BAD, good=GOOD, bomb_cache: Path | None = None) -> tuple[list[str], list[str]]:
    """One of each entry in ``folder``: ``(good paths, bad paths)``, each sorted. ``bomb_cache``: an already
    written bomb PNG to link instead of compressing 110 MB of zeros again."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, write in {**bad, **good}.items():
        p = folder / name
        if write is write_png_bomb and bomb_cache is not None:
            os.link(bomb_cache, p)
        else:
            write(p)
        out[name] = str(p)
    return sorted(out[n] for n in good), sorted(out[n] for n in bad)
