"""CPU decode and transforms of the torch backend, shared by prediction and the parity tests.

Images leave here as uint8 C x H x W tensors; normalization happens on the device (``base.normalize_on_device``).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fasttrain.config import DataConfig
from fasttrain.data.files import open_regular

__all__ = [
    "DECODE_ERRORS",
    "load_image",
    "convert_image",
    "eval_transform",
    "train_transform",
    "to_uint8_tensor",
    "resize_square",
]

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


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(im)  # uint8, C x H x W


def resize_square(im: Image.Image, size: int) -> torch.Tensor:
    """The whole image (aspect not kept, nothing cropped) -> uint8 C x size x size, bilinear, by Pillow.
    For targets tied to positions in the image (regression points, pix2pix pairs), where a crop would move them."""
    im = TF.resize(im, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return to_uint8_tensor(im)


def eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``cfg.eval_resize`` (bilinear, antialiased), centre-crop ``cfg.eval_crop``
    (``data.eval_size``, else ``data.image_size``)."""
    resize, crop = cfg.eval_resize, cfg.eval_crop

    def apply(im: Image.Image) -> torch.Tensor:
        # Geometry on the PIL image (Pillow's resize is faster than torch's on the CPU), uint8 tensor last.
        im = TF.resize(im, [resize], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return to_uint8_tensor(TF.center_crop(im, [crop, crop]))

    return apply


def train_transform(cfg: DataConfig, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Random-resized-crop (scale crop_scale_min..1, ratio 3/4..4/3) to ``size`` (default ``image_size``; the
    epoch's size under progressive resizing) or resize + centre crop (the shorter side to size / 0.875, or to
    ``resize_size`` at the configured size), then optional flip, then timm's RandAugment (``data.rand_augment``)."""
    size = size or cfg.image_size
    ops: list = []
    if cfg.random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), antialias=True))
    else:
        resize = cfg.resize_size if cfg.resize_size and size == cfg.image_size else int(round(size / 0.875))
        ops += [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.rand_augment:  # after crop and flip, on the PIL image, as timm's create_transform orders them
        from fasttrain.timm_support import rand_augment

        ops.append(rand_augment(cfg.rand_augment, cfg.norm_mean_std()[0], size))
    pipeline = v2.Compose(ops)

    def apply(im: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(pipeline(im))

    return apply
