"""Optimizers and learning-rate schedules, built from the config.

Schedules are pure functions of the optimizer step (``lr_factor``) wrapped in ``LambdaLR``, so they are
tested without training and resume exactly from a checkpointed step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fasttrain.config import OptimConfig, ScheduleConfig
from fasttrain.timm_support import timm_optimizer, uses_timm_optimizer

__all__ = ["make_optimizer", "lr_factor", "make_scheduler"]


def _param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalization parameters (1-d tensors), as the reference recipes do."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    module: nn.Module | list[nn.Module], cfg: OptimConfig, *, fused_kwargs: dict | None = None, lr: float | None = None
) -> torch.optim.Optimizer:
    modules = module if isinstance(module, list) else [module]
    lr = cfg.lr if lr is None else lr
    if uses_timm_optimizer(cfg.name, cfg.layer_decay):  # lamb, lion, timm/<name>, layer-wise decay
        return timm_optimizer(modules, cfg, lr)
    groups = _param_groups(modules, cfg.weight_decay if cfg.name != "adam" else 0.0)
    kw = dict(fused_kwargs or {})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **kw)
    b1, b2 = cfg.betas
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), **kw)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total_steps = max(1, total_steps)
    if cfg.name == "onecycle":
        # Cosine rise from lr/25 over pct_start of the run, then cosine decay to lr/(25 * 1e4) (OneCycleLR's shape).
        start, end = 1 / 25, 1 / 25e4
        rise = max(1, int(cfg.pct_start * total_steps))
        if step < rise:
            p = step / rise
            return start + (1 - start) * (1 - math.cos(math.pi * p)) / 2
        p = min(1.0, (step - rise) / max(1, total_steps - rise))
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    if cfg.name == "cosine":
        p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * p)) / 2
    if cfg.name == "linear":  # FFCV's step-free triangle: straight down from the peak to min_lr_ratio at the end
        p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - (1.0 - cfg.min_lr_ratio) * p
    raise ValueError(f"schedule.name: unknown schedule {cfg.name!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total_steps))
