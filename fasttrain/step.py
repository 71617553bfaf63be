"""One training step, the same for every task and every caller (engine, autotune, bench, benchmarks).

A task says what a batch means by yielding its losses in the order its networks update
(:meth:`~fasttrain.tasks.base.Task.train_phases`: a classifier yields one, pix2pix the discriminator's then the
generator's), and :meth:`~fasttrain.tasks.base.Task.train_step` hands those phases to :func:`run_step`. This module
sits below the tasks: it knows a train state only by the fields it uses (:class:`StepState`), never a task.
Everything around a loss lives here, once: the scaled backward pass, gradient synchronisation
across processes (skipped on accumulation micro-batches: DDP's ``require_backward_grad_sync``, the flag its
``no_sync()`` sets, for the forward and backward passes of the whole step), unscaling, clipping, the optimizer
step, the scaler update and clearing the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any, Protocol

import torch

__all__ = ["StepState", "Phases", "run_step", "optimizer_step", "gradient_sync"]


class StepState(Protocol):
    """What a step uses of a :class:`~fasttrain.tasks.base.TrainState`: each network by name, its optimizer,
    gradient scaler, weights' average (where kept) and DDP wrapper (under torchrun)."""

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    scalers: dict[str, Any]
    ema: dict[str, Any]
    ddp: dict[str, Any]


Phases = Generator[tuple[str, torch.Tensor], None, dict[str, torch.Tensor]]
"""A task's ``train_phases``: yields ``(module name, loss)`` per network update, returns detached metrics."""


@contextlib.contextmanager
def gradient_sync(state: StepState, enabled: bool) -> Iterator[None]:
    """Whether this step's backward passes all-reduce gradients across processes (a no-op for one process)."""
    wrapped = list(state.ddp.values())
    before = [m.require_backward_grad_sync for m in wrapped]
    for m in wrapped:
        m.require_backward_grad_sync = enabled
    try:
        yield
    finally:
        for m, flag in zip(wrapped, before):
            m.require_backward_grad_sync = flag


def optimizer_step(state: StepState, name: str, grad_clip: float) -> None:
    """Unscale, clip the global gradient norm (when ``grad_clip`` > 0), step, update the scaler, clear grads."""
    optimizer, scaler = state.optimizers[name], state.scalers[name]
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(state.modules[name].parameters(), grad_clip, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    # Under DDP (gradient_as_bucket_view=True) the gradients are views into the all-reduce buckets: zeroing keeps
    # them; set_to_none would drop the views, so every step would allocate fresh gradients and copy into buckets.
    optimizer.zero_grad(set_to_none=name not in state.ddp)
    ema = state.ema.get(name)
    if ema is not None:
        ema.update(state.modules[name])


def run_step(
    state: StepState, phases: Phases, *, grad_clip: float = 0.0, update: bool = True, loss_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Backward of each loss ``phases`` yields (one micro-batch's forward passes, run as it is advanced); the
    optimizers step when ``update`` (the last micro-batch of an accumulation), clipping at ``grad_clip`` (> 0).
    ``loss_scale`` (1 / accumulation) scales each backward pass. Returns the task's detached metrics (read back
    by the caller only every so often)."""
    with gradient_sync(state, update):
        try:
            name, loss = next(phases)
            while True:
                state.scalers[name].scale(loss * loss_scale if loss_scale != 1.0 else loss).backward()
                if update:
                    optimizer_step(state, name, grad_clip)
                name, loss = phases.send(None)
        except StopIteration as stop:
            return stop.value
