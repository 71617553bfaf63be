"""One training step, the same for every task and every caller (engine, autotune, bench, benchmarks).

A task says what a batch means by yielding its losses in the order its networks update
(:meth:`~fasttrain.tasks.base.Task.train_phases`: a classifier yields one, pix2pix the discriminator's then the
generator's). Everything around a loss lives here, once: the scaled backward pass, gradient synchronisation
across processes (skipped on accumulation micro-batches: DDP's ``require_backward_grad_sync``, the flag its
``no_sync()`` sets, for the forward and backward passes of the whole step), unscaling, clipping, the optimizer
step, the scaler update and clearing the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fasttrain.tasks.base import Task, TrainState

__all__ = ["run_step", "optimizer_step", "gradient_sync"]


@contextlib.contextmanager
def gradient_sync(state: TrainState, enabled: bool) -> Iterator[None]:
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


def optimizer_step(state: TrainState, name: str, grad_clip: float) -> None:
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
    task: Task, state: TrainState, batch, *, update: bool = True, loss_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch; the optimizers step when ``update`` (the last micro-batch of an
    accumulation). ``loss_scale`` (1 / accumulation) scales each backward pass. Returns the task's detached
    metrics (read back by the caller only every so often)."""
    clip = task.cfg.optim.grad_clip
    with gradient_sync(state, update):
        phases = task.train_phases(state, batch)
        try:
            name, loss = next(phases)
            while True:
                state.scalers[name].scale(loss * loss_scale if loss_scale != 1.0 else loss).backward()
                if update:
                    optimizer_step(state, name, clip)
                name, loss = phases.send(None)
        except StopIteration as stop:
            return stop.value
