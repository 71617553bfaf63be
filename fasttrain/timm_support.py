"""timm's optimizers and augmentations through timm's own factories (timm is optional).

- optimizers: ``optim.name`` = lamb, lion or ``timm/<any timm optimizer>``, and ``optim.layer_decay``, built by
  ``timm.optim.create_optimizer_v2`` (its parameter groups: no weight decay on 1-d parameters and the model's
  ``no_weight_decay()``; layer-wise groups with an ``lr_scale``, applied here to each group's rate so that
  fasttrain's schedules, which scale every group's starting rate, keep it);
- ``data.rand_augment``: ``timm.data.rand_augment_transform`` on the PIL image (torch loader), its ``random``
  and numpy draws seeded per sample like the rest of the augmentation;
- ``task.random_erasing``: ``timm.data.RandomErasing`` on the normalized batch on the device (as timm's
  PrefetchLoader applies it);
- ``model.drop_path_rate`` is passed to ``timm.create_model`` / torchvision's ``stochastic_depth_prob`` by
  :mod:`fasttrain.models`.

A setting that needs timm where it is not installed is an error naming the setting.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["require_timm", "timm_optimizer", "rand_augment", "random_erasing"]


def require_timm(key: str, value: Any) -> Any:
    """The timm module, or a ValueError naming the setting that needs it."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"{key} = {value!r} needs timm, which is not installed (pip install timm)") from None
    return timm


def timm_optimizer(
    modules: list[nn.Module], cfg: Any, lr: float, param_groups: Callable[[list[nn.Module], float], list[dict]]
) -> torch.optim.Optimizer:
    """``cfg`` (OptimConfig)'s optimizer from ``timm.optim.create_optimizer_v2``. sgd / adamw / adam map to timm's
    names of the same optimizers (used with optim.layer_decay). Several networks' parameters are grouped by
    ``param_groups`` (fasttrain.optim's, passed in: this module sits below it)."""
    key = "optim.layer_decay" if cfg.layer_decay > 0 and cfg.name in ("sgd", "adamw", "adam") else "optim.name"
    require_timm(key, cfg.layer_decay if key == "optim.layer_decay" else cfg.name)
    from timm.optim import create_optimizer_v2, list_optimizers

    name = cfg.name.removeprefix("timm/")
    opt = {"sgd": "sgd" if cfg.nesterov else "momentum", "adam": "adamw"}.get(name, name)
    known = list_optimizers()
    if opt not in known:
        close = difflib.get_close_matches(opt, known, n=3)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ValueError(f"optim.name: timm has no optimizer {opt!r} (timm.optim.list_optimizers() lists them){hint}")
    weight_decay = 0.0 if cfg.name == "adam" else cfg.weight_decay
    if len(modules) == 1:
        target: Any = modules[0]
    elif cfg.layer_decay > 0:
        raise ValueError(
            "optim.layer_decay: layer-wise decay ranks the layers of one network; this task trains several"
        )
    else:
        target = param_groups(modules, weight_decay)
    optimizer = create_optimizer_v2(
        target,
        opt=opt,
        lr=lr,
        weight_decay=weight_decay,
        momentum=cfg.momentum,
        layer_decay=cfg.layer_decay or None,
        # optim.betas are two Adam-style betas; a timm/<name> optimizer keeps timm's own (Adan has three)
        **({"betas": tuple(cfg.betas)} if opt in ("adamw", "lamb", "lion") else {}),
    )
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # timm's own schedulers apply lr_scale; ours scale "lr"
    # the head's group (the full rate) first: logged "lr" values are the peak's, as for the other optimizers
    optimizer.param_groups.sort(key=lambda g: -g.get("lr_scale", 1.0))
    return optimizer


def rand_augment(config: str, mean: list[float], image_size: int) -> Callable[[Any], Any]:
    """timm's RandAugment (``rand-m9-mstd0.5-inc1``...) for PIL images; its ``random`` and numpy draws come from
    torch's CPU generator (which the loader seeds per sample), inside forks that restore both streams."""
    require_timm("data.rand_augment", config)
    from timm.data import rand_augment_transform

    # timm's create_transform: translations up to 45 % of the side, the fill colour the dataset's mean
    fill = tuple(min(255, round(255 * m)) for m in mean)
    try:
        ra = rand_augment_transform(config, {"translate_const": int(image_size * 0.45), "img_mean": fill})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"data.rand_augment: {config!r} is not a timm RandAugment string (e.g. rand-m9-mstd0.5-inc1): "
            f"{e or type(e).__name__}"
        ) from None

    def apply(im: Any) -> Any:
        seed = int(torch.randint(0, 2**31 - 1, ()))
        py, npy = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            return ra(im)
        finally:
            random.setstate(py)
            np.random.set_state(npy)

    return apply


def random_erasing(probability: float, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's RandomErasing over a normalized device batch (per-pixel normal noise, as timm's train script)."""
    require_timm("task.random_erasing", probability)
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode="pixel", device=device)
