"""Optimizers and learning-rate schedules, built from the config.

Each optimizer is a builder ``(modules, cfg, lr, fused_kwargs) -> Optimizer`` and each schedule a
pure lr-factor function ``(cfg, step, steps_per_epoch, total_steps) -> float``, named in the ``optimizers`` and
``schedules`` tables of :mod:`fasttrain.registry` (which :mod:`fasttrain.config` validates against). Schedules are
wrapped in ``LambdaLR``, so they are tested without training and resume exactly from a checkpointed step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fasttrain import registry
from fasttrain.config import OptimConfig, ScheduleConfig
from fasttrain.timm_support import timm_optimizer

__all__ = [
    "make_optimizer",
    "lr_factor",
    "held_warmup",
    "make_scheduler",
    "warmup_steps",
    "param_groups",
    "Lookahead",
    "sgd",
    "adamw",
    "timm_factory",
    "constant",
    "step_decay",
    "cosine",
    "linear",
    "onecycle",
]


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _groups(modules: list[nn.Module], cfg: OptimConfig, lr: float) -> list[dict]:
    wd = 0.0 if cfg.name == "adam" else cfg.weight_decay
    groups = param_groups(modules, wd, norm_bias_lr_scale=cfg.norm_bias_lr_scale)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return groups


TRAIN_EPOCHS = "fasttrain_train_epochs"
"""A parameter with this attribute (an int N) is trained in the first N epochs only, then held: its group's rate
is 0 from then on (:func:`make_scheduler`). speednet's whitening bias: airbench trains it for 3 epochs. A lookahead
pull after the hold begins still moves it once, to its slow copy, as airbench's does."""
WEIGHT_DECAY = "fasttrain_weight_decay"
"""A parameter with this attribute (a bool) is decayed, or not, whatever its number of dimensions."""


def _decays(p: nn.Parameter) -> bool:
    return bool(getattr(p, WEIGHT_DECAY, p.ndim > 1))


def param_groups(modules: Iterable[nn.Module], weight_decay: float, *, norm_bias_lr_scale: float = 1.0) -> list[dict]:
    """No weight decay on biases and normalization parameters (1-d tensors), as the reference recipes do.

    ``norm_bias_lr_scale`` != 1 puts the biases of normalization layers in a third group, airbench's: its rate is
    the others' times the scale (``lr_scale``, which the schedule keeps) and its weight decay ``weight_decay /
    scale``, so that ``lr * weight_decay``, the decay each step applies, is the weights'.

    A model may mark parameters: :data:`WEIGHT_DECAY` overrides the 1-d rule, and :data:`TRAIN_EPOCHS` puts a
    parameter in a group of its own (``train_epochs``) whose rate the schedule holds at 0 after that many epochs.
    Optimizers that timm groups (``timm/<name>``, ``optim.layer_decay``) do not read these marks."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    norm_biases: list[nn.Parameter] = []
    limited: dict[tuple[int, bool], list[nn.Parameter]] = {}
    scaled = norm_bias_lr_scale != 1
    for m in modules:
        for sub in m.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                epochs = getattr(p, TRAIN_EPOCHS, None)
                if epochs is not None:
                    limited.setdefault((int(epochs), _decays(p)), []).append(p)
                elif scaled and name == "bias" and isinstance(sub, _NORMS):
                    norm_biases.append(p)
                else:
                    (decay if _decays(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scaled:
        wd = weight_decay / norm_bias_lr_scale
        groups.append({"params": norm_biases, "weight_decay": wd, "lr_scale": norm_bias_lr_scale})
    for (epochs, decays), params in limited.items():
        groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0, "train_epochs": epochs})
    return groups


# -- optimizers: (modules, cfg, lr, fused kwargs) -> torch.optim.Optimizer -------------------------------------------
def sgd(modules: list[nn.Module], cfg: OptimConfig, lr: float, kw: dict) -> torch.optim.Optimizer:
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(_groups(modules, cfg, lr), lr=lr, momentum=cfg.momentum, nesterov=nesterov, **kw)


def adamw(modules: list[nn.Module], cfg: OptimConfig, lr: float, kw: dict) -> torch.optim.Optimizer:
    """AdamW; ``adam`` is the same with no weight decay."""
    b1, b2 = cfg.betas
    return torch.optim.AdamW(_groups(modules, cfg, lr), lr=lr, betas=(b1, b2), **kw)


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
    if build is timm_factory and cfg.norm_bias_lr_scale != 1:
        raise ValueError(
            f"optim.norm_bias_lr_scale: {cfg.norm_bias_lr_scale:g} is not applied to an optimizer built by timm "
            f"(optim.name {cfg.name!r}{', optim.layer_decay' if cfg.layer_decay > 0 else ''}); leave it at 1"
        )
    optimizer = build(modules, cfg, lr, dict(fused_kwargs or {}))
    if cfg.lookahead_every:
        Lookahead(cfg.lookahead_every, cfg.lookahead_decay, modules).attach(optimizer)
    return optimizer


# -- lookahead: airbench's, as hooks around optimizer.step -----------------------------------------------------------
class Lookahead:
    """Every ``every`` optimizer steps: ``slow.lerp_(weights, 1 - d)``, then ``weights.copy_(slow)``, with
    ``d = decay**every * (step / total)**3``; after the last step (``total``, which :func:`make_scheduler` sets)
    the weights become the slow copy. The slow copies live in the optimizer's per-parameter state
    (``lookahead_slow``) and the step count in its first group (``lookahead_step``), so checkpoints carry them
    and a resumed run continues exactly. They start as the weights before the first step (airbench's start).

    The floating-point buffers of ``modules`` (BatchNorm's running statistics) are pulled alike, as airbench
    pulls its whole state_dict: the final weights are then evaluated with statistics averaged as they were, not
    with the last fast weights'. Their slow copies travel in the optimizer's state_dict (``lookahead_buffers``)."""

    STATE_KEY = "lookahead_buffers"

    def __init__(self, every: int, decay: float, modules: Iterable[nn.Module] = ()):
        self.every, self.decay = every, decay
        self.modules = list(modules)
        self.total_steps = 0
        """The run's optimizer steps (0 until a schedule says: no pulls before then)."""
        self._starts: dict[int, torch.Tensor] = {}
        """The parameters this step moves that have no slow copy yet, as they were before it (their start)."""
        self._all_started = False
        self._start_buffers: list[torch.Tensor] | None = None
        self.slow_buffers: list[torch.Tensor] | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)
        optimizer.register_state_dict_post_hook(self._save_buffers)
        optimizer.register_load_state_dict_pre_hook(self._load_buffers)
        # airbench's start for the statistics: as they are before any forward pass (the weights' start is taken
        # before the first step, which leaves them as they were)
        self._start_buffers = [b.detach().clone() for b in self.buffers()]
        optimizer.fasttrain_lookahead = self  # type: ignore[attr-defined]  # found by make_scheduler

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"]]

    def buffers(self) -> list[torch.Tensor]:
        """The modules' floating-point buffers, read at each pull (moving a module to a device or converting its
        BatchNorms replaces the tensors)."""
        return [b for m in self.modules for b in m.buffers() if b.is_floating_point()]

    def _save_buffers(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        if self.slow_buffers is not None:
            state_dict[self.STATE_KEY] = list(self.slow_buffers)

    def _load_buffers(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        saved = state_dict.pop(self.STATE_KEY, None)  # a shallow copy: the caller's dict keeps it
        # none saved (no pull yet, or an older checkpoint): they start from the live ones at the next pull
        self.slow_buffers, self._start_buffers = None, None
        self._starts, self._all_started = {}, False  # the parameters' states are the checkpoint's now
        if saved is not None:
            live = self.buffers()
            if len(saved) != len(live) or any(s.shape != b.shape for s, b in zip(saved, live, strict=False)):
                raise ValueError(
                    f"optimizer state: the checkpoint's lookahead holds {len(saved)} buffers that do not match the "
                    f"model's {len(live)} floating-point buffers"
                )
            self.slow_buffers = [s.detach().to(b.device, b.dtype, copy=True) for s, b in zip(saved, live, strict=True)]

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """Each parameter's start is its value before the first step that moves it (airbench's start: the
        weights before training), kept until that step has made the optimizer's own state for it."""
        if self._all_started:
            return
        state = optimizer.state
        self._starts = {
            i: p.detach().clone()
            for i, p in enumerate(self._params(optimizer))
            if p.grad is not None and "lookahead_slow" not in state[p]
        }

    @torch.no_grad()
    def _keep_starts(self, optimizer: torch.optim.Optimizer) -> None:
        """After a step: the starts of the parameters it moved first become their slow copies, in the optimizer's
        state, so every checkpoint carries them (held in memory until the first pull, a resume before it started
        them from its own weights). Not before the step: Adam takes a parameter whose state is not empty for one
        it has stepped. The buffers' slow copies start as they were before any forward pass."""
        params = self._params(optimizer)
        for i, start in self._starts.items():
            optimizer.state[params[i]]["lookahead_slow"] = start
        self._starts = {}
        self._all_started = all("lookahead_slow" in optimizer.state.get(p, {}) for p in params)
        buffers = self.buffers()
        if buffers and self.slow_buffers is None:
            first = self._start_buffers
            if first is None or [t.shape for t in first] != [b.shape for b in buffers]:
                first = buffers
            self.slow_buffers = [t.detach().to(b.device, b.dtype, copy=True) for t, b in zip(first, buffers)]
        self._start_buffers = None

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        group = optimizer.param_groups[0]
        step = group["lookahead_step"] = group.get("lookahead_step", 0) + 1
        if not self._all_started:
            self._keep_starts(optimizer)
        total = self.total_steps
        if not total or (step % self.every and step != total):
            return
        params, slow = [], []
        for p in self._params(optimizer):
            if p.grad is None:  # not stepped (its state may be empty: Adam would take a slow copy for its "first")
                continue
            params.append(p)
            slow.append(optimizer.state[p]["lookahead_slow"])  # every parameter stepped has one
        buffers = self.buffers()
        if buffers:
            if self.slow_buffers is None:  # buffers that appeared after the first step
                self.slow_buffers = [b.detach().clone() for b in buffers]
            params += buffers
            slow += self.slow_buffers
        if step % self.every == 0:
            torch._foreach_lerp_(slow, params, 1.0 - self.decay**self.every * min(1.0, step / total) ** 3)
        torch._foreach_copy_(params, slow)


# -- schedules: (cfg, step, steps_per_epoch, total_steps) -> multiplier of the peak rate -----------------------------
def _warmup(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> tuple[int, float | None]:
    """Warmup's length in steps, and the factor while in it (None after it). The warm-up takes at most half of
    the run's steps: a run shorter than its warm-up (a time budget's plan, a short smoke run) would otherwise end
    before its rate ever decays."""
    warmup = warmup_steps(cfg, steps_per_epoch, total_steps)
    start = cfg.warmup_start
    return warmup, (start + (1 - start) * (step + 1) / warmup if step < warmup else None)


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


def lr_factor(
    cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int, *, warmup: int | None = None
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): ``schedule.name``'s function
    (``warmup``: a warm-up length held in steps, as :func:`make_scheduler` takes it)."""
    return _Rate(cfg, max(1, steps_per_epoch), max(1, total_steps), warmup)(step)


class _Rate:
    """The scheduler's function of the step: ``schedule.name``'s, with the warm-up's length held at
    ``warmup_steps`` once a run has set it (see :func:`held_warmup`). ``warmup_steps`` is the one attribute in
    ``__dict__`` (the others are slots): LambdaLR's state_dict saves a callable object's ``__dict__``, so the held
    length travels in the checkpoint and a resume restores it."""

    __slots__ = ("schedule", "cfg", "spe", "total", "until", "_held", "__dict__")

    def __init__(
        self, cfg: ScheduleConfig, spe: int, total: int, warmup_steps: int | None = None, until: int | None = None
    ):
        self.schedule = registry.resolve("schedules", cfg.name)
        self.cfg, self.spe, self.total = cfg, spe, total
        self.until = until
        """The step from which the rate is 0 (a group of parameters trained for its first epochs), or None."""
        self._held: tuple[int | None, ScheduleConfig] | None = None
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.until is not None and step >= self.until:
            return 0.0
        cfg = self.cfg
        if self.warmup_steps is not None:
            if self._held is None or self._held[0] != self.warmup_steps:
                held = dataclasses.replace(self.cfg, warmup_epochs=self.warmup_steps / self.spe)
                self._held = (self.warmup_steps, held)
            cfg = self._held[1]
        return self.schedule(cfg, step, self.spe, self.total)


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int, held: int | None = None) -> int:
    """The warm-up's length in steps: ``schedule.warmup_epochs`` (or a ``held`` length) at most half the run."""
    want = held if held is not None else int(round(cfg.warmup_epochs * max(1, steps_per_epoch)))
    return min(want, max(1, total_steps) // 2)


def held_warmup(scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> int | None:
    """The warm-up length a scheduler holds (None: it follows the config)."""
    fns = getattr(scheduler, "lr_lambdas", None) or [None]
    return getattr(fns[0], "warmup_steps", None) if isinstance(fns[0], _Rate) else None


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    steps_per_epoch: int,
    total_steps: int,
    *,
    warmup: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``schedule.name``'s function. ``warmup``: the warm-up's length held in steps, whatever the
    run's length (a time budget's re-plan during a run keeps the warm-up it started with; its cap at half the
    run then moved it, and the rate jumped). A group with ``train_epochs`` (:func:`param_groups`) follows the
    same rate until then, and 0 after: its parameters stay as they are (no step, no weight decay)."""
    spe, total = max(1, steps_per_epoch), max(1, total_steps)
    lookahead = getattr(optimizer, "fasttrain_lookahead", None)
    if lookahead is not None:  # the run's length, which its pulls grow with (a time budget may change it)
        lookahead.total_steps = total
    rates: list[Callable[[int], float]] = []
    for group in optimizer.param_groups:
        epochs = group.get("train_epochs")
        rates.append(_Rate(cfg, spe, total, warmup, None if epochs is None else int(epochs) * spe))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rates)
