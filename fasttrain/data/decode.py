"""Image decode by Pillow, the rules every backend follows: any mode to RGB or L, alpha on white, 16-bit scaled.

Torch- and torchvision-free, so that the data checks, the formats and the tasks' single-image paths can decode
without importing torchvision (whose import pulls ``torch._dynamo``: seconds of start-up a CPU job repays only
when it trains). The transforms that crop, resize and make tensors are in :mod:`fasttrain.data.transforms`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from fasttrain.data.files import open_regular

__all__ = ["DECODE_ERRORS", "load_image", "decode_image", "convert_image"]

# What a broken or unsupported image file raises while decoding (PIL raises SyntaxError on some corrupt PNGs,
# DecompressionBombError on absurd sizes): every loader skips and reports these instead of stopping.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str, channels: int, max_pixels: int | None = None) -> Image.Image:
    """Open and convert any mode (RGBA, LA, P, CMYK, I;16, L, 1) to RGB or L; alpha is composited on white.

    Only regular files are opened (a FIFO named ``x.png`` raises :class:`~fasttrain.data.files.NotRegularFileError`
    instead of blocking). ``max_pixels``: images whose header announces more pixels raise
    ``Image.DecompressionBombError`` before anything is decoded (``data.max_image_pixels``; None: Pillow's own
    limit only). Raises the errors of :data:`DECODE_ERRORS`, naming nothing; callers add the file name.
    """
    with open_regular(path) as f:
        data = io.BytesIO(f.read())  # one read; the image then owns its pixels (no copy to outlive the file)
    return decode_image(data, channels, max_pixels)


def decode_image(data: io.BytesIO, channels: int, max_pixels: int | None = None) -> Image.Image:
    """:func:`load_image` on a file's bytes already read."""
    im = _open_image(data)
    if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
        raise Image.DecompressionBombError(
            f"{im.size[0]}x{im.size[1]} pixels exceed data.max_image_pixels ({max_pixels:,})"
        )
    im.load()
    return convert_image(im, channels, owned=True)


def _open_image(f) -> Image.Image:
    """Image.open on an open file; its "cannot identify image file <_io.BytesIO object at ...>" (the file object,
    not a name) becomes what is wrong, for the caller to put beside the file's name."""
    try:
        return Image.open(f)
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError("not an image file Pillow can identify") from None


def convert_image(im: Image.Image, channels: int, *, owned: bool = False) -> Image.Image:
    """A decoded image in any mode -> RGB (``channels`` 3) or L (1), by the rules every backend follows: alpha
    (RGBA, LA, PA, palette transparency) composited on white, 16-bit scaled to 8 bits. ``owned``: ``im`` is
    the caller's to keep (not tied to a file about to close), so an image already in the target mode is
    returned as it is instead of copied."""
    target = "RGB" if channels == 3 else "L"
    if im.mode == target:
        return im if owned else im.copy()
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Compositing on white matches what a viewer shows; converting straight drops alpha to black.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit: scale to 8 bits instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        full = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")
    return im.convert(target)
