"""Small nets for small images: what hand-written scripts define, without computing flattened sizes by hand."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["smallcnn", "mlp", "ConvNet", "convnet"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def smallcnn(
    *, in_channels: int, num_outputs: int, image_size: int, width: int = 32, dropout: float = 0.0, **_: object
) -> nn.Module:
    """Three conv-BN-ReLU stages with max-pooling, global average pool, linear head. Any input size >= 8."""
    w = width
    return nn.Sequential(
        _conv_bn(in_channels, w),
        nn.MaxPool2d(2),
        _conv_bn(w, 2 * w),
        nn.MaxPool2d(2),
        _conv_bn(2 * w, 4 * w),
        _conv_bn(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * w, num_outputs),
    )


def mlp(
    *,
    in_channels: int,
    num_outputs: int,
    image_size: int,
    width: int = 32,
    dropout: float = 0.0,
    depth: int = 2,
    **_: object,
) -> nn.Module:
    """Flatten -> ``depth`` hidden layers of 4 * width units (ReLU) -> outputs; for tiny images (8x8 digits)."""
    hidden = 4 * width
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_channels * image_size * image_size
    for _layer in range(depth):
        layers += [nn.Linear(fan_in, hidden), nn.ReLU(inplace=True)]
        fan_in = hidden
    layers += [nn.Dropout(dropout), nn.Linear(fan_in, num_outputs)]
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Conv -> max-pool -> ReLU blocks, flatten, one hidden linear layer, outputs (the hand-written-script net).

    The flattened size is found by a shape probe (one dummy forward of the conv stack at construction) rather
    than ``nn.LazyLinear``: every parameter then exists with its final shape before the optimizer, the
    checkpoint loader, ``torch.compile`` or ``channels_last`` see the module, and the parameter count is right
    from the start. A lazy layer would be uninitialized until the first batch and needs a dry run before any of
    those. Unlike smallcnn (global average pool), the flatten keeps *where* things are, which coordinate
    regression (drawing) needs.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        image_size: int,
        width: int = 32,
        dropout: float = 0.0,
        min_blocks: int = 3,
        max_blocks: int = 6,
        hidden: int = 0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for i in range(max_blocks):
            # At least min_blocks (while the map can still halve), then more until it is 8 x 8 or smaller,
            # which bounds the first linear layer whatever the image size.
            if size < 2 or (i >= min_blocks and size <= 8):
                break
            cout = width * 2**i
            layers += [nn.Conv2d(cin, cout, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            cin, size = cout, size // 2
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        hidden = hidden or 16 * width
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def convnet(
    *, in_channels: int, num_outputs: int, image_size: int, width: int = 32, dropout: float = 0.0, **_: object
) -> nn.Module:
    """Conv(5x5) -> max-pool -> ReLU blocks (width, 2w, 4w, ... channels), flatten, 16w hidden units, outputs.

    Three blocks (fewer for inputs under 8 px), more for large inputs until the map is at most 8 x 8:
    50 px -> 6 x 6 after three blocks, 128 px -> 8 x 8 after four.
    """
    return ConvNet(in_channels, num_outputs, image_size, width=width, dropout=dropout)
