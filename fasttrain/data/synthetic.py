"""Generated data: demo datasets written as real image files, so every loader path runs on them.

Generators write into a temporary sibling folder and rename it into place at the end, so a half-written
dataset never looks complete, and they refuse to touch a folder that already exists.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SHAPES",
    "make_shapes_dataset",
    "demo_dataset",
    "default_cache_dir",
    "atomic_dir",
    "DRAWING_PALETTE",
    "drawing_session",
    "make_drawing_dataset",
    "PAIRED_COLORS",
    "paired_images",
    "make_paired_dataset",
    "imagenet_like_image",
    "make_imagenet_like",
]

SHAPES = ("circle", "square", "triangle", "cross")


def _need(cond: bool, name: str, value: object, rule: str) -> None:
    """Generator arguments are checked up front: a negative count would write empty folders."""
    if not cond:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _check_size(size: int | tuple[int, int], name: str = "size") -> None:
    sides = (size,) if isinstance(size, int) else tuple(size)
    _need(
        len(sides) in (1, 2) and all(isinstance(s, int) and s >= 8 for s in sides),
        name,
        size,
        "at least 8 pixels per side",
    )


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("FASTTRAIN_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fasttrain")
    )


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
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 -> the usual folder mode: the data is the user's to share
        try:
            os.replace(tmp, final)
        except OSError as e:  # another process wrote ``final`` meanwhile (two ranks making the demo data)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{final} was written by another process meanwhile") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple | int) -> None:
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


def make_shapes_dataset(
    root: str | os.PathLike,
    *,
    train_per_class: int = 300,
    val_per_class: int = 60,
    size: int = 48,
    shapes: tuple[str, ...] = SHAPES,
    seed: int = 0,
    fmt: str = "png",
) -> Path:
    """Write an ImageFolder tree ``root/{train,val}/<shape>/*.<fmt>`` of coloured shapes; returns ``root``."""
    _need(train_per_class >= 1, "train_per_class", train_per_class, ">= 1")
    _need(val_per_class >= 0, "val_per_class", val_per_class, ">= 0")
    _need(len(shapes) >= 2 and all(s in SHAPES for s in shapes), "shapes", shapes, f"two or more of {SHAPES}")
    _check_size(size)
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
        except OSError as e:  # a read-only or full home folder
            from fasttrain.io import WriteError, os_reason

            raise WriteError(
                f"cannot write the demo dataset to {root}: {os_reason(e)}; set FASTTRAIN_CACHE to a "
                f"writable folder, or data.root to a dataset",
                e.errno,
                path=root,
                reason=os_reason(e),
            ) from None
    return root


# -- drawing sessions (format "drawing") ---------------------------------------------------------------------
DRAWING_PALETTE = ("#ffdd00", "#ff8800", "#ff4444", "#228822", "#662299", "#112266")
"""Stroke colours in drawing order: each stroke takes the colour after the previous stroke's. Their gray levels
(206, 156, 124, 94, 68, 37) stay apart, so the workload's grayscale canvases still tell them apart."""


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def drawing_session(
    steps: int, size: int | tuple[int, int], rng: random.Random
) -> list[tuple[Image.Image, dict[str, Any] | None]]:
    """Canvases 0..steps and the strokes 1..steps of one session: ``[(canvas_k, stroke_k+1), ...]``.

    What makes it learnable: each stroke starts where the previous one ended, marked on the canvas by a
    black-ringed dot filled with the previous stroke's colour, and takes the palette colour after that one.
    The last entry's stroke is None (the final canvas has no next stroke).
    """
    w, h = _size2(size)
    margin = max(2, min(w, h) // 10)
    line = max(1, min(w, h) // 40)
    dot = max(3, min(w, h) // 16)  # the colour cue must survive grayscale and downscaling
    x, y = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    color_idx = rng.randrange(len(DRAWING_PALETTE))
    strokes: list[tuple[list[tuple[float, float]], str]] = []
    for _ in range(steps):
        points = [(x, y)]
        for _seg in range(rng.randint(1, 3)):
            step = rng.uniform(0.12, 0.3) * min(w, h)
            angle = rng.uniform(0, 2 * math.pi)
            x = min(max(x + step * math.cos(angle), margin), w - margin)
            y = min(max(y + step * math.sin(angle), margin), h - margin)
            points.append((x, y))
        strokes.append((points, DRAWING_PALETTE[color_idx]))
        color_idx = (color_idx + 1) % len(DRAWING_PALETTE)
    out = []
    for k in range(steps + 1):
        im = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        for points, color in strokes[:k]:
            draw.line(points, fill=_rgb(color), width=line, joint="curve")
        if k < steps:
            (cx, cy), color = strokes[k][0][0], strokes[k][1]
            prev = DRAWING_PALETTE[(DRAWING_PALETTE.index(color) - 1) % len(DRAWING_PALETTE)]
        else:
            (cx, cy), prev = strokes[-1][0][-1], strokes[-1][1]
        draw.ellipse(
            [cx - dot, cy - dot, cx + dot, cy + dot], fill=_rgb(prev), outline=(0, 0, 0), width=max(1, dot // 3)
        )
        stroke = None
        if k < steps:
            points, color = strokes[k]
            stroke = {
                "x": round(points[0][0], 1),
                "y": round(points[0][1], 1),
                "color": color,
                "points": [[round(px, 1), round(py, 1)] for px, py in points],
            }
        out.append((im, stroke))
    return out


def make_drawing_dataset(
    root: str | os.PathLike,
    sessions: int = 60,
    steps: int = 8,
    size: int | tuple[int, int] = 128,
    *,
    val_sessions: int = 0,
    seed: int = 0,
) -> Path:
    """Write drawing sessions ``root/session_NNNN/step_NNNN.{png,json}``; returns ``root``.

    Canvas ``step_k.png`` (k = 0..steps) shows strokes 1..k; ``step_k.json`` (k = 1..steps) holds stroke k's
    first point and colour. With ``val_sessions`` > 0 the sessions go to ``train/`` and ``val/`` (that many).
    """
    _need(sessions >= 1, "sessions", sessions, ">= 1")
    _need(val_sessions >= 0, "val_sessions", val_sessions, ">= 0")
    _need(steps >= 1, "steps", steps, ">= 1")
    _check_size(size)
    root = Path(root)
    rng = random.Random(seed)
    with atomic_dir(root) as tmp:
        for i in range(sessions + val_sessions):
            parent = tmp if not val_sessions else tmp / ("val" if i >= sessions else "train")
            d = parent / f"session_{i:04d}"
            d.mkdir(parents=True)
            for k, (canvas, stroke) in enumerate(drawing_session(steps, size, rng)):
                canvas.save(d / f"step_{k:04d}.png")
                if stroke is not None:
                    (d / f"step_{k + 1:04d}.json").write_text(json.dumps(stroke), encoding="utf-8")
    return root


# -- paired images (format "paired") -------------------------------------------------------------------------
PAIRED_COLORS = {"circle": (220, 60, 60), "square": (60, 90, 220), "triangle": (40, 160, 70)}
"""Fill colour of each shape in the target images: the mapping a pix2pix model learns from the outlines."""


def paired_images(size: int, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """(outlines, filled): black outlines of 1-3 shapes on white, and the same shapes filled by kind on grey."""
    target = Image.new("RGB", (size, size), (235, 235, 235))
    mask = Image.new("L", (size, size), 0)
    draw_t, draw_m = ImageDraw.Draw(target), ImageDraw.Draw(mask)
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(list(PAIRED_COLORS))
        r = rng.uniform(size * 0.1, size * 0.25)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        _draw_shape(draw_t, shape, cx, cy, r, PAIRED_COLORS[shape])
        _draw_shape(draw_m, shape, cx, cy, r, 255)
    edges = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 0 if v > 64 else 255)
    return edges.convert("RGB"), target


def make_paired_dataset(
    root: str | os.PathLike,
    n: int = 200,
    size: int = 64,
    layout: str = "folders",
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write ``n`` outline -> filled-shape pairs, ``val_fraction`` of them under ``val/``, the rest ``train/``.

    layout ``folders``: ``<split>/A/NNNNN.png`` (input) and ``<split>/B/NNNNN.png`` (target);
    ``side_by_side``: ``<split>/NNNNN.png``, 2 * size wide, input left, target right (pix2pix's AB images).
    """
    if layout not in ("folders", "side_by_side"):
        raise ValueError(f"layout must be folders or side_by_side, got {layout!r}")
    _need(n >= 1, "n", n, ">= 1")
    _need(0 <= val_fraction < 1, "val_fraction", val_fraction, "in [0, 1)")
    _check_size(size)
    root = Path(root)
    rng = random.Random(seed)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 and val_fraction > 0 else 0
    with atomic_dir(root) as tmp:
        for i in range(n):
            split = tmp / ("val" if i >= n - n_val else "train")
            a, b = paired_images(size, rng)
            if layout == "folders":
                for sub, im in (("A", a), ("B", b)):
                    (split / sub).mkdir(parents=True, exist_ok=True)
                    im.save(split / sub / f"{i:05d}.png")
            else:
                split.mkdir(parents=True, exist_ok=True)
                ab = Image.new("RGB", (2 * size, size))
                ab.paste(a, (0, 0))
                ab.paste(b, (size, 0))
                ab.save(split / f"{i:05d}.png")
    return root


# -- ImageNet-like JPEGs (benchmarks) ------------------------------------------------------------------------
def imagenet_like_image(
    size: tuple[int, int], class_index: int, classes: int, rng: np.random.Generator, quality: int = 90
) -> bytes:
    """A photo-sized JPEG with photo-like entropy: a smooth random field tinted by class, a shape, fine grain."""
    w, h = size
    field = rng.random((max(2, h // 24), max(2, w // 24), 3), dtype=np.float32)
    im = Image.fromarray((field * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    hue = Image.new(
        "RGB",
        (w, h),
        tuple(
            int(v)
            for v in np.array([math.sin(2 * math.pi * (class_index / classes + k / 3)) * 0.5 + 0.5 for k in range(3)])
            * 255
        ),
    )
    im = Image.blend(im, hue, 0.35)
    draw = ImageDraw.Draw(im)
    r = rng.uniform(0.15, 0.3) * min(w, h)
    _draw_shape(
        draw,
        SHAPES[class_index % len(SHAPES)],
        rng.uniform(r, w - r),
        rng.uniform(r, h - r),
        r,
        tuple(int(v) for v in rng.integers(0, 256, 3)),
    )
    arr = np.asarray(im, dtype=np.int16) + rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_imagenet_like(
    root: str | os.PathLike,
    n: int = 1000,
    classes: int = 10,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    *,
    val: int = 0,
    seed: int = 0,
) -> Path:
    """Write ``n`` training JPEGs (and ``val`` validation ones) in ImageFolder layout, spread over ``classes``.

    ``root/{train,val}/class_NNN/NNNNNN.jpg``, ImageNet-sized (500 x 375, quality 90 by default, ~50 KB each),
    for loader and end-to-end benchmarks: decode cost is what matters, not what the images show.
    """
    _need(n >= 1, "n", n, ">= 1")
    _need(val >= 0, "val", val, ">= 0")
    _need(classes >= 1, "classes", classes, ">= 1")
    _need(1 <= quality <= 100, "quality", quality, "in 1..100")
    size = (int(size[0]), int(size[1]))  # a list from JSON or TOML too
    _check_size(size)
    root = Path(root)
    rng = np.random.default_rng(seed)
    with atomic_dir(root) as tmp:
        for split, count in (("train", n), ("val", val)):
            for c in range(classes if count else 0):
                (tmp / split / f"class_{c:03d}").mkdir(parents=True)
            for i in range(count):
                c = i % classes
                data = imagenet_like_image(size, c, classes, rng, quality)
                (tmp / split / f"class_{c:03d}" / f"{i:06d}.jpg").write_bytes(data)
    return root
