"""An exponential moving average of a module's weights, updated on the device with no host sync.

torch's ``AveragedModel`` keeps ``n_averaged`` on the CPU and copies it to the device on every update (one or two
blocking copies per step; with ``device=`` the sync only moves to ``bool(n_averaged == 0)``). Here the update
count is a Python int, the first update is a plain copy chosen by it, and every later one is a single
``torch._foreach_lerp_`` over the floating-point parameters and buffers (integer buffers such as BatchNorm's
``num_batches_tracked`` are copied).

The decay warms up as TensorFlow's ``ExponentialMovingAverage(num_updates=)`` and timm's ``ModelEmaV2/V3`` do:
``min(decay, (1 + n) / (10 + n))`` at update ``n``. Without it, ``decay = 0.9998`` averages over ~5000 steps, so
a run of a few hundred steps ends with an average still dominated by the initial (untrained) weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEma", "ema_decay_at"]


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used by update number ``updates`` (0-based): warmed up, never above ``decay``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModelEma:
    """``module``: a frozen copy of the averaged model (same device, dtype and memory format), evaluated and
    saved beside it. ``update(model)`` after every optimizer step.

    ``state_dict()`` keeps the layout of torch's ``AveragedModel`` (``module.<key>`` and ``n_averaged``), so
    checkpoints written before this class load unchanged, and ``predict`` reads either.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        """Updates made (a Python int: deciding the first copy and the decay needs no device read)."""
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._lists: tuple[int, tuple[list[torch.Tensor], ...]] | None = None
        """(id of the model, its tensor lists): built once, not per step (optimizers and load_state_dict update
        parameters and buffers in place, so the same objects stay the model's)."""

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(averaged floats, model floats, averaged others, model others), in state_dict order."""
        mine = self.module.state_dict(keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            raise ValueError("ModelEma.update: the model's parameters and buffers differ from the averaged copy's")
        avg_f: list[torch.Tensor] = []
        new_f: list[torch.Tensor] = []
        avg_o: list[torch.Tensor] = []
        new_o: list[torch.Tensor] = []
        seen: set[int] = set()
        for key, a in mine.items():
            b = theirs[key]
            if id(a) in seen:  # a weight the model uses twice (tied) is listed under each name: averaged once
                continue
            seen.add(id(a))
            # The Parameter objects themselves, not detached views: a later ``param.data = ...`` (a move, a
            # memory-format change) stays visible. update() runs under no_grad.
            if a.is_floating_point():
                avg_f.append(a)
                new_f.append(b)
            else:
                avg_o.append(a)
                new_o.append(b)
        return avg_f, new_f, avg_o, new_o

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights and buffers (all on the device)."""
        if self._lists is None or self._lists[0] != id(model):
            self._lists = (id(model), self._tensors(model))
        avg_f, new_f, avg_o, new_o = self._lists[1]
        if self.updates == 0:
            torch._foreach_copy_(avg_f, new_f)
        else:
            torch._foreach_lerp_(avg_f, new_f, 1.0 - ema_decay_at(self.decay, self.updates))
        if avg_o:
            torch._foreach_copy_(avg_o, new_o)
        self.updates += 1

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        sd["n_averaged"] = torch.tensor(self.updates, dtype=torch.long)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        weights = {k[len("module.") :]: v for k, v in sd.items() if k.startswith("module.")}
        self.module.load_state_dict(weights)
        self.updates = int(sd.get("n_averaged", 0))  # on load only: a read from the checkpoint's CPU tensor
