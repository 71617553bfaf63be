"""Small nets for small images: what hand-written scripts define, without computing flattened sizes by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["smallcnn", "mlp", "ConvNet", "convnet", "SpeedNet", "speednet"]


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


# -- speednet: airbench94's network ------------------------------------------------------------------------------


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias; the first in_channels filters start as identities (airbench's dirac init)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding="same", bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[: min(cin, cout)])


class _BatchNorm(nn.BatchNorm2d):
    """airbench's BN: running statistics with momentum 0.4 (its 0.6 in PyTorch's convention), eps 1e-12, the
    scale frozen at 1 and only the shift learnt."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False


class _ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            _Conv(cin, cout),
            nn.MaxPool2d(2),
            _BatchNorm(cout),
            nn.GELU(),
            _Conv(cout, cout),
            _BatchNorm(cout),
            nn.GELU(),
        )


class SpeedNet(nn.Module):
    """airbench94's CIFAR-10 network (Keller Jordan, 2024): a 2x2 whitening conv (fixed: initialised from the
    training data by :meth:`init_from_data`; its bias learnt, with weight decay, in the first
    ``whiten_bias_epochs`` epochs only, as airbench's), three conv groups (conv, max-pool, BN, GELU, conv,
    BN, GELU) of ``width``, ``4 width``, ``4 width`` channels (airbench: 64, 256, 256), a global max-pool and a
    bias-free linear head scaled by 1/9. Any input size divisible by 8."""

    def __init__(self, in_channels: int, num_outputs: int, width: int = 64, whiten_bias_epochs: int = 3):
        super().__init__()
        whiten = 2 * in_channels * 2 * 2  # the whitening basis and its negation: GELU keeps both signs
        self.whiten = nn.Conv2d(in_channels, whiten, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        bias = self.whiten.bias
        assert bias is not None  # bias=True
        nn.init.zeros_(bias)
        # Marks that fasttrain.optim reads (plain attributes: the model needs nothing from the trainer).
        setattr(bias, "fasttrain_train_epochs", whiten_bias_epochs)  # noqa: B010
        setattr(bias, "fasttrain_weight_decay", True)  # noqa: B010
        self.body = nn.Sequential(
            nn.GELU(), _ConvGroup(whiten, width), _ConvGroup(width, 4 * width), _ConvGroup(4 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, num_outputs, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.whiten(x))
        # airbench's final MaxPool2d(3) over a 3x3 map (32 px), for any size. A max-pool, not torch.amax: amax's
        # backward finds the maximum again by equality with its saved output, and torch.compile under bf16
        # recomputes the GELU before it in float32 (its bf16 rounding elided) while the saved maximum was rounded,
        # so no element matched: 0 / 0 = NaN gradients from the first step. A max-pool's backward reads the index
        # it saved.
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the 2x2 patches of ``images`` (normalized training images): the eigenvectors of
        the patch covariance scaled by 1 / sqrt(eigenvalue + eps), and their negations (airbench's)."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        cov = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, h, w)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))


def speednet(*, in_channels: int, num_outputs: int, image_size: int, width: int = 64, **_: object) -> nn.Module:
    if image_size % 8:
        raise ValueError(
            f"data.image_size: speednet pools three times by 2 and needs a multiple of 8, got {image_size}"
        )
    return SpeedNet(in_channels, num_outputs, width)
