"""File validation: which images cannot be decoded, and which are odd (converted modes, tiny, misnamed).

``fasttrain check-data DATA`` reads every image once (threads: Pillow releases the GIL while decoding) and
reports; it never modifies, moves or deletes a file. The loaders skip bad files on their own at run time;
this report tells the user which ones before a long run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fasttrain.config import default_workers
from fasttrain.data.sources import list_images
from fasttrain.data.transforms import DECODE_ERRORS

__all__ = ["CheckReport", "check_image", "check_data"]

_FORMAT_EXT = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}, "BMP": {".bmp"}, "WEBP": {".webp"},
               "TIFF": {".tif", ".tiff"}, "PPM": {".ppm", ".pgm", ".pnm"}}


@dataclass
class CheckReport:
    root: Path
    total: int
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(file, why it cannot be used)."""
    odd: list[tuple[str, str]] = field(default_factory=list)
    """(file, what is unusual; usable after conversion)."""
    skip_list: Path | None = None

    def to_text(self) -> str:
        lines = [f"{self.root}: {self.total} images, {len(self.bad)} unreadable, {len(self.odd)} odd"]
        lines += [f"  BAD  {f}: {why}" for f, why in self.bad]
        lines += [f"  odd  {f}: {why}" for f, why in self.odd[:50]]
        if len(self.odd) > 50:
            lines.append(f"  ... and {len(self.odd) - 50} more odd files")
        if self.skip_list:
            lines.append(f"skip list written to {self.skip_list}")
        return "\n".join(lines)


def check_image(path: str | os.PathLike, channels: int = 3) -> tuple[str | None, str | None]:
    """(reason it is bad or None, note on what is odd or None). Decodes the whole file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file", None
        with Image.open(path) as im:
            im.load()  # the full decode: truncated files fail here, not at open
            fmt, mode, size = im.format, im.mode, im.size
    except DECODE_ERRORS as e:
        return f"cannot be decoded ({type(e).__name__}: {e})", None
    notes = []
    want = "RGB" if channels == 3 else "L"
    if mode != want:
        notes.append(f"mode {mode}, converted to {want}")
    if min(size) < 8:
        notes.append(f"tiny ({size[0]}x{size[1]})")
    if fmt in _FORMAT_EXT and path.suffix.lower() not in _FORMAT_EXT[fmt]:
        notes.append(f"{fmt} data in a {path.suffix} file")
    return None, "; ".join(notes) or None


def check_data(root: str | os.PathLike, *, channels: int = 3, workers: int = 0,
               skip_list: str | os.PathLike | None = None) -> CheckReport:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"check-data: {root} is not a folder")
    if skip_list is not None and Path(skip_list).exists():  # fail before decoding a large tree, not after
        raise FileExistsError(f"check-data --skip-list: {skip_list} already exists; it is not overwritten")
    files = list_images(root)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        results = list(pool.map(lambda f: check_image(f, channels), files))
    report = CheckReport(root, len(files))
    for f, (bad, odd) in zip(files, results):
        if bad:
            report.bad.append((str(f), bad))
        elif odd:
            report.odd.append((str(f), odd))
    if skip_list is not None:
        out = Path(skip_list)
        with open(out, "x", encoding="utf-8") as fh:  # "x": an existing file is never overwritten
            fh.writelines(f"{f}\n" for f, _ in report.bad)
        report.skip_list = out
    return report
