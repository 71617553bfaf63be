"""CPU transforms of the torch backend (on decoded PIL images), shared by prediction and the parity tests; the
decode itself is :mod:`fasttrain.data.decode`.

The deterministic ones (evaluation, the GPU cache's decode, resize_square) are Pillow's resize and crop, as
torchvision's functions call them, without importing torchvision: its import pulls ``torch._dynamo`` (1.0-1.3 s on
a 2-core CPU), which prediction never needs otherwise (training imports it anyway, with its first optimizer).
The training transform's random crops and flips are torchvision's, imported where one is built.

Images leave here as uint8 C x H x W tensors; normalization happens on the device (``base.normalize_on_device``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from fasttrain.config import DataConfig

__all__ = [
    "eval_transform",
    "train_transform",
    "to_uint8_tensor",
    "resize_square",
]


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """uint8 C x H x W, a copy (torchvision's ``pil_to_tensor``: channels-last strides, permuted)."""
    a = torch.from_numpy(np.array(im, copy=True))
    return a.view(im.size[1], im.size[0], len(im.getbands())).permute(2, 0, 1)


def resize_square(im: Image.Image, size: int) -> torch.Tensor:
    """The whole image (aspect not kept, nothing cropped) -> uint8 C x size x size, bilinear, by Pillow.
    For targets tied to positions in the image (regression points, pix2pix pairs), where a crop would move them."""
    if im.size != (size, size):
        im = im.resize((size, size), resample=Image.Resampling.BILINEAR)
    return to_uint8_tensor(im)


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """The shorter side to ``size``, the longer in proportion (rounded down), bilinear (Pillow's resize is
    antialiased): torchvision's ``resize(im, [size])`` on a PIL image."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return im if new == (w, h) else im.resize(new, resample=Image.Resampling.BILINEAR)


def center_crop(im: Image.Image, crop: int) -> Image.Image:
    """The centre ``crop`` x ``crop`` square, the offset rounded as torchvision's ``center_crop`` rounds it; a side
    shorter than ``crop`` is padded with zeros around the image (left / top getting the smaller half), as it pads."""
    w, h = im.size
    left = -((crop - w) // 2) if crop > w else int(round((w - crop) / 2.0))
    top = -((crop - h) // 2) if crop > h else int(round((h - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``cfg.eval_resize`` (bilinear, antialiased), centre-crop ``cfg.eval_crop``
    (``data.eval_size``, else ``data.image_size``)."""
    resize, crop = cfg.eval_resize, cfg.eval_crop

    def apply(im: Image.Image) -> torch.Tensor:
        # Geometry on the PIL image (Pillow's resize is faster than torch's on the CPU), uint8 tensor last.
        return to_uint8_tensor(center_crop(resize_shorter(im, resize), crop))

    return apply


def train_transform(cfg: DataConfig, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Random-resized-crop (scale crop_scale_min..1, ratio 3/4..4/3) to ``size`` (default ``image_size``; the
    epoch's size under progressive resizing) or resize + centre crop (the shorter side to size / 0.875, or to
    ``resize_size`` at the configured size; then a random shift of up to ``translate`` pixels, the border reflected),
    then optional flip, then timm's RandAugment (``data.rand_augment``)."""
    from torchvision.transforms import v2

    size = size or cfg.image_size
    ops: list = []
    if cfg.random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), antialias=True))
    else:
        resize = cfg.resize_size if cfg.resize_size and size == cfg.image_size else int(round(size / 0.875))
        ops += [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
        if cfg.translate:  # the classic small-image shift: reflect-pad, then cut the size back out at random
            ops.append(v2.RandomCrop(size, padding=cfg.translate, padding_mode="reflect"))
    if cfg.hflip and not cfg.flip_alternate:  # alternating flips are the dataset's (they need the epoch)
        ops.append(v2.RandomHorizontalFlip())
    if cfg.rand_augment:  # after crop and flip, on the PIL image, as timm's create_transform orders them
        from fasttrain.timm_support import rand_augment

        ops.append(rand_augment(cfg.rand_augment, cfg.norm_mean_std()[0], size))
    pipeline = v2.Compose(ops)

    def apply(im: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(pipeline(im))

    return apply
