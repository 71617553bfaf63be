"""CPU transforms of the torch backend (torchvision's, on decoded PIL images), shared by prediction and the parity
tests; the decode itself is :mod:`fasttrain.data.decode`, which imports no torchvision.

Images leave here as uint8 C x H x W tensors; normalization happens on the device (``base.normalize_on_device``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fasttrain.config import DataConfig

__all__ = [
    "eval_transform",
    "train_transform",
    "to_uint8_tensor",
    "resize_square",
]


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
    ``resize_size`` at the configured size; then a random shift of up to ``translate`` pixels, the border reflected),
    then optional flip, then timm's RandAugment (``data.rand_augment``)."""
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
