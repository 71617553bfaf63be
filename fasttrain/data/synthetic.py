"""Generated data: demo datasets written as real image files, so every loader path runs on them.

Generators write into a temporary sibling folder and rename it into place at the end, so a half-written
dataset never looks complete, and they refuse to touch a folder that already exists.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_shapes_dataset", "demo_dataset", "default_cache_dir", "atomic_dir"]

SHAPES = ("circle", "square", "triangle", "cross")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTTRAIN_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                               / "fasttrain"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` on success, remove it on failure."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; fasttrain does not overwrite it (choose another folder)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        t = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_image(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One coloured shape of random colour, size and position on a noisy random background."""
    bg = tuple(rng.randrange(0, 256) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(3):  # clutter: small blobs that are not the class
        x, y, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, size / 16)
        draw.ellipse([x - s, y - s, x + s, y + s], fill=tuple(rng.randrange(0, 256) for _ in range(3)))
    while True:  # a colour that stands out from the background
        color = tuple(rng.randrange(0, 256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(color, bg)) > 180:
            break
    r = rng.uniform(size * 0.18, size * 0.34)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    _draw_shape(draw, shape, cx, cy, r, color)
    return im


def make_shapes_dataset(root: str | os.PathLike, *, train_per_class: int = 300, val_per_class: int = 60,
                        size: int = 48, shapes: tuple[str, ...] = SHAPES, seed: int = 0,
                        fmt: str = "png") -> Path:
    """Write an ImageFolder tree ``root/{train,val}/<shape>/*.<fmt>`` of coloured shapes; returns ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    with atomic_dir(root) as tmp:
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for shape in shapes:
                d = tmp / split / shape
                d.mkdir(parents=True)
                for i in range(n):
                    shape_image(shape, size, rng).save(d / f"{shape}_{i:05d}.{fmt}")
    return root


def demo_dataset(cache_dir: str | os.PathLike | None = None) -> Path:
    """The quickstart's dataset, written on first use into the cache folder and reused afterwards."""
    root = Path(cache_dir or default_cache_dir()) / "demo" / "shapes-v1"
    if not root.is_dir():
        try:
            make_shapes_dataset(root)
        except FileExistsError:  # another process finished writing it first
            pass
    return root
