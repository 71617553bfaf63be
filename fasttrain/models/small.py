"""Small nets for small images: what hand-written scripts define, without computing flattened sizes by hand."""

from __future__ import annotations

from torch import nn

__all__ = ["smallcnn"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def smallcnn(*, in_channels: int, num_outputs: int, image_size: int, width: int = 32, dropout: float = 0.0,
             **_: object) -> nn.Module:
    """Three conv-BN-ReLU stages with max-pooling, global average pool, linear head. Any input size >= 8."""
    w = width
    return nn.Sequential(
        _conv_bn(in_channels, w), nn.MaxPool2d(2),
        _conv_bn(w, 2 * w), nn.MaxPool2d(2),
        _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_outputs),
    )
