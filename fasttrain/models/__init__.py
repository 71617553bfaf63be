"""Model registry: torchvision classification models by name, plus fasttrain's small nets.

``build_model(name, in_channels=..., num_outputs=..., image_size=..., width=..., dropout=..., drop_path_rate=...)``
returns an
``nn.Module`` on the CPU. Small nets are looked up in ``_SMALL`` ("module:function" so nothing is imported
until used); ``timm/<name>`` is a timm model (timm is optional); every other name is tried as a torchvision
model (``torchvision.models.get_model``). ``pretrained`` loads the torchvision / timm default weights (downloaded
into their caches on first use) and gives the head ``num_outputs`` fresh outputs where the count differs.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

import torch
from torch import nn

__all__ = ["build_model", "check_model", "is_conv_model", "CUSTOM"]

_SMALL: dict[str, str] = {
    "smallcnn": "fasttrain.models.small:smallcnn",
    "mlp": "fasttrain.models.small:mlp",
    "convnet": "fasttrain.models.small:convnet",
    "speednet": "fasttrain.models.small:speednet",
    "unet": "fasttrain.models.gan:unet",
    "patchgan": "fasttrain.models.gan:patchgan",
}
_NOT_CONV = {"mlp"}
_TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit", "deit", "beit", "eva", "mixer", "cait", "xcit", "levit")
TIMM_PREFIX = "timm/"


def is_conv_model(name: str) -> bool:
    """Whether channels_last pays off: convolutional nets yes, transformers and MLPs no."""
    base = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    return base not in _NOT_CONV and not base.startswith(_TRANSFORMER_PREFIXES)


CUSTOM = "custom"
"""model.name of a run whose model came from Python (``train(cfg, model=...)``)."""


def check_model(name: str, *, given: bool = False, dropout: float = 0.0) -> None:
    """Raise a ValueError naming ``model.name`` when no model of that name can be built here (cheap: builds
    nothing), so a run refuses it before it creates its folder. ``given``: a model was passed from Python.
    ``dropout``: model.dropout, which torchvision's models are built without (refused rather than ignored)."""
    if name == CUSTOM:
        if not given:
            raise ValueError(
                "model.name: custom means this run's model was passed from Python; pass the same "
                "model again (train(..., model=...), predict(..., model=...))"
            )
        if dropout:
            raise ValueError("model.dropout: a model passed from Python is used as given (set it to 0)")
        return
    if name in _SMALL:
        return
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise ValueError(f"model.name: {name} needs timm, which is not installed (pip install timm)") from None
        base = name[len(TIMM_PREFIX) :]
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"model.name: timm has no model {base!r} (timm.list_models() lists them){hint}")
        return
    from torchvision import models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name, [*_SMALL, *known], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"model.name: unknown model {name!r}; known: {', '.join(sorted(_SMALL))}, torchvision "
            f"classification models (resnet18, resnet50, ...) and timm/<name> with timm installed{hint}"
        )
    if dropout:  # torchvision's builders differ (resnets take none): a setting that would do nothing
        raise ValueError(
            f"model.dropout: applies to fasttrain's small nets and timm/ models; torchvision's {name} is built "
            f"without it (set it to 0, or use timm/{name})"
        )


BLURPOOL_FAMILIES = ("resnet", "resnext", "wide_resnet")
"""torchvision model names model.blurpool applies to (FFCV's recipes use it on ResNet-50 and -18)."""


def build_model(
    name: str,
    *,
    in_channels: int,
    num_outputs: int,
    image_size: int,
    width: int = 32,
    dropout: float = 0.0,
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    blurpool: bool = False,
    **kwargs: Any,
) -> nn.Module:
    if blurpool and not name.startswith(BLURPOOL_FAMILIES):
        raise ValueError(
            f"model.blurpool: anti-aliased downsampling is offered for torchvision's ResNets "
            f"({', '.join(f'{f}*' for f in BLURPOOL_FAMILIES)}), not {name}"
        )
    if name in _SMALL and drop_path_rate > 0:
        raise ValueError(
            f"model.drop_path_rate: {name} is one of fasttrain's small nets, which have no residual blocks"
        )
    if name in _SMALL:
        if pretrained:
            raise ValueError(
                f"model.pretrained: {name} is one of fasttrain's small nets, which have no pretrained "
                f"weights (use model.init_from = a file of your own)"
            )
        mod, fn = _SMALL[name].split(":")
        builder = getattr(importlib.import_module(mod), fn)
        return builder(
            in_channels=in_channels,
            num_outputs=num_outputs,
            image_size=image_size,
            width=width,
            dropout=dropout,
            **kwargs,
        )
    check_model(name, dropout=dropout)
    source = None
    if pretrained:
        from fasttrain.models.init import check_pretrained_reachable

        source = check_pretrained_reachable(name)  # offline: one line now, not a minute of retries first
    depth = {"stochastic_depth_prob": drop_path_rate} if drop_path_rate > 0 else {}
    try:
        if name.startswith(TIMM_PREFIX):
            return _timm_model(name[len(TIMM_PREFIX) :], in_channels, num_outputs, dropout, pretrained, drop_path_rate)
        from torchvision import models as tvm

        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        # pretrained: into torch's hub cache on first use
        model = tvm.get_model(name, weights=weights, **({} if pretrained else {"num_classes": num_outputs}), **depth)
    except _download_errors() as e:
        if source is None:
            raise
        from fasttrain.models.init import pretrained_error

        raise pretrained_error(name, source, f"{type(e).__name__}: {e}") from None
    except TypeError as e:
        if not depth:
            raise
        raise ValueError(
            f"model.drop_path_rate: torchvision's {name} takes no stochastic_depth_prob ({e}); use a model "
            f"that has it (efficientnet_*, convnext_*, timm/<name>) or set it to 0"
        ) from None
    if depth:
        from torchvision.ops import StochasticDepth

        if not any(isinstance(m, StochasticDepth) for m in model.modules()):  # mobilenet takes it and ignores it
            raise ValueError(
                f"model.drop_path_rate: torchvision's {name} has no stochastic depth; use a model that has it "
                f"(efficientnet_*, convnext_*, timm/<name>) or set it to 0"
            )
    if weights is not None:
        from fasttrain.models.init import replace_head

        if num_outputs != len(weights.meta["categories"]):
            replace_head(model, num_outputs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, name, keep_weights=pretrained)
    if blurpool:
        from fasttrain.models.blurpool import apply_blurpool

        apply_blurpool(model)
    return model


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: OSError (urllib, requests), and huggingface_hub's HTTP errors."""
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        return (OSError,)
    return (OSError, HfHubHTTPError)


def _timm_model(
    name: str, in_channels: int, num_outputs: int, dropout: float, pretrained: bool, drop_path_rate: float = 0.0
) -> nn.Module:
    import timm

    depth = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
    try:
        # timm resizes the head and adapts the stem's input channels itself, pretrained or not.
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_outputs, in_chans=in_channels, drop_rate=dropout, **depth
        )
    except TypeError as e:
        if not depth:
            raise
        raise ValueError(f"model.drop_path_rate: timm's {name} takes no drop_path_rate ({e}); set it to 0") from None


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str, *, keep_weights: bool = False) -> None:
    """Swap the first Conv2d for one with ``in_channels`` inputs (grayscale into a torchvision net). With
    ``keep_weights`` a grayscale stem starts from the RGB filters summed over colour (a gray pixel is R = G = B)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    child.stride,  # type: ignore[arg-type]
                    child.padding,  # type: ignore[arg-type]
                    child.dilation,  # type: ignore[arg-type]
                    child.groups,
                    child.bias is not None,
                )
                if keep_weights and in_channels == 1:
                    with torch.no_grad():
                        new.weight.copy_(child.weight.sum(dim=1, keepdim=True))
                        if child.bias is not None and new.bias is not None:
                            new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise ValueError(f"model.name: {name} has no Conv2d to adapt to {in_channels} input channels")
