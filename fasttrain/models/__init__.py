"""Model registry: torchvision classification models by name, plus fasttrain's small nets.

``build_model(name, in_channels=..., num_outputs=..., image_size=..., width=..., dropout=...)`` returns an
``nn.Module`` on the CPU. Small nets are looked up in ``_SMALL`` ("module:function" so nothing is imported
until used); every other name is tried as a torchvision model (``torchvision.models.get_model``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

__all__ = ["build_model", "available_models", "is_conv_model"]

_SMALL: dict[str, str] = {
    "smallcnn": "fasttrain.models.small:smallcnn",
    "mlp": "fasttrain.models.small:mlp",
    "convnet": "fasttrain.models.small:convnet",
    "unet": "fasttrain.models.gan:unet",
    "patchgan": "fasttrain.models.gan:patchgan",
}
_NOT_CONV = {"mlp"}


def available_models() -> list[str]:
    from torchvision import models as tvm

    return sorted(_SMALL) + sorted(tvm.list_models(module=tvm))


def is_conv_model(name: str) -> bool:
    return name not in _NOT_CONV and not name.startswith(("vit_", "swin_", "maxvit"))


def build_model(name: str, *, in_channels: int, num_outputs: int, image_size: int, width: int = 32,
                dropout: float = 0.0, **kwargs: Any) -> nn.Module:
    if name in _SMALL:
        mod, fn = _SMALL[name].split(":")
        builder = getattr(importlib.import_module(mod), fn)
        return builder(in_channels=in_channels, num_outputs=num_outputs, image_size=image_size, width=width,
                       dropout=dropout, **kwargs)
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"model.name: unknown model {name!r}; known: {', '.join(sorted(_SMALL))} and torchvision "
                         f"classification models (resnet18, resnet50, ...)")
    model = tvm.get_model(name, weights=None, num_classes=num_outputs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, name)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first Conv2d for one with ``in_channels`` inputs (grayscale into a torchvision net)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None)
                setattr(parent, child_name, new)
                return
    raise ValueError(f"model.name: {name} has no Conv2d to adapt to {in_channels} input channels")
