"""Optimizers and learning-rate schedules, built from the config.

Each optimizer is a builder ``(modules, cfg, lr, fused_kwargs) -> Optimizer`` and each schedule a
pure lr-factor function ``(cfg, step, steps_per_epoch, total_steps) -> float``, named in the ``optimizers`` and
``schedules`` tables of :mod:`fasttrain.registry` (which :mod:`fasttrain.config` validates against). Schedules are
wrapped in ``LambdaLR``, so they are tested without training and resume exactly from a checkpointed step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fasttrain import registry
from fasttrain.config import OptimConfig, ScheduleConfig
from fasttrain.timm_support import timm_optimizer

__all__ = [
    "make_optimizer",
    "lr_factor",
    "make_scheduler",
    "param_groups",
    "sgd",
    "adamw",
    "timm_factory",
    "constant",
    "step_decay",
    "cosine",
    "linear",
    "onecycle",
]


def _groups(modules: list[nn.Module], cfg: OptimConfig) -> list[dict]:
    return param_groups(modules, 0.0 if cfg.name == "adam" else cfg.weight_decay)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalization parameters (1-d tensors), as the reference recipes do."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- optimizers: (modules, cfg, lr, fused kwargs) -> torch.optim.Optimizer -------------------------------------------
def sgd(modules: list[nn.Module], cfg: OptimConfig, lr: float, kw: dict) -> torch.optim.Optimizer:
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(_groups(modules, cfg), lr=lr, momentum=cfg.momentum, nesterov=nesterov, **kw)


def adamw(modules: list[nn.Module], cfg: OptimConfig, lr: float, kw: dict) -> torch.optim.Optimizer:
    """AdamW; ``adam`` is the same with no weight decay."""
    b1, b2 = cfg.betas
    return torch.optim.AdamW(_groups(modules, cfg), lr=lr, betas=(b1, b2), **kw)


def timm_factory(modules: list[nn.Module], cfg: OptimConfig, lr: float, kw: dict) -> torch.optim.Optimizer:
    """lamb, lion, ``timm/<name>``, and any optimizer under ``optim.layer_decay``: built by timm's factory (the
    fused kwargs are torch's, not timm's)."""
    return timm_optimizer(modules, cfg, lr, param_groups)


def make_optimizer(
    module: nn.Module | list[nn.Module], cfg: OptimConfig, *, fused_kwargs: dict | None = None, lr: float | None = None
) -> torch.optim.Optimizer:
    """``optim.name``'s builder from the ``optimizers`` table; ``timm/<name>`` and layer-wise decay go to timm."""
    modules = module if isinstance(module, list) else [module]
    lr = cfg.lr if lr is None else lr
    by_timm = cfg.name.startswith("timm/") or cfg.layer_decay > 0
    build = timm_factory if by_timm else registry.resolve("optimizers", cfg.name)
    return build(modules, cfg, lr, dict(fused_kwargs or {}))


# -- schedules: (cfg, step, steps_per_epoch, total_steps) -> multiplier of the peak rate -----------------------------
def _warmup(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> tuple[int, float | None]:
    """Warmup's length in steps, and the factor while in it (None after it). The warm-up takes at most half of
    the run's steps: a run shorter than its warm-up (a time budget's plan, a short smoke run) would otherwise end
    before its rate ever decays."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps // 2)
    return warmup, ((step + 1) / warmup if step < warmup else None)


def constant(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    _, w = _warmup(cfg, step, steps_per_epoch, total_steps)
    return 1.0 if w is None else w


def step_decay(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiply by ``gamma`` every ``step_epochs``."""
    _, w = _warmup(cfg, step, steps_per_epoch, total_steps)
    return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch)) if w is None else w


def cosine(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    warmup, w = _warmup(cfg, step, steps_per_epoch, total_steps)
    if w is not None:
        return w
    p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * p)) / 2


def linear(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """FFCV's step-free triangle: straight down from the peak to min_lr_ratio at the end."""
    warmup, w = _warmup(cfg, step, steps_per_epoch, total_steps)
    if w is not None:
        return w
    p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 - (1.0 - cfg.min_lr_ratio) * p


def onecycle(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Cosine rise from lr/25 over pct_start of the run, then cosine decay to lr/(25 * 1e4) (OneCycleLR's shape)."""
    start, end = 1 / 25, 1 / 25e4
    rise = max(1, int(cfg.pct_start * total_steps))
    if step < rise:
        p = step / rise
        return start + (1 - start) * (1 - math.cos(math.pi * p)) / 2
    p = min(1.0, (step - rise) / max(1, total_steps - rise))
    return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): ``schedule.name``'s function."""
    schedule = registry.resolve("schedules", cfg.name)
    return schedule(cfg, step, max(1, steps_per_epoch), max(1, total_steps))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = registry.resolve("schedules", cfg.name)
    spe, total = max(1, steps_per_epoch), max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(cfg, i, spe, total))
