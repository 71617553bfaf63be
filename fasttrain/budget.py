"""A time budget (``train.time_budget_s``, ``fasttrain train --time-budget 10m``): the run's length in optimizer
steps, chosen from measured speed so that the whole learning-rate schedule fits the budget (stretched to the
planned steps, never cut off). The last epoch may be partial: the run ends exactly where its schedule ends, with
that epoch evaluated and recorded. Pure functions, no torch: the engine measures, these decide.

The plan is made twice: before the first epoch from a short measurement (a few training steps, undone
afterwards), and once more after the first epoch from its measured times (training, evaluation, checkpoint),
which include what the short measurement cannot see (the loader's steady state, evaluation, checkpoints).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["parse_duration", "epoch_seconds", "StepCosts", "plan_steps", "epochs_of", "process_age_s"]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"``, ``"1h30m"`` -> seconds (> 0); ValueError naming the text."""
    t = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|h|m|s|)", t)
    if not t or "".join(n + u for n, u in parts) != t.replace(" ", ""):
        raise ValueError(f"--time-budget: {text!r} is not a duration (examples: 90, 90s, 10m, 1.5h, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"--time-budget: must be > 0, got {text!r}")
    return seconds


def epoch_seconds(
    train_samples: int, train_rate: float, eval_samples: int = 0, eval_rate: float | None = None, eval_every: int = 1
) -> float:
    """Seconds one epoch takes on average: its training samples at ``train_rate`` (samples/s), plus an evaluation
    every ``eval_every`` epochs (at ``eval_rate``; default 3x the training rate: a forward pass without the
    backward)."""
    if train_rate <= 0:
        raise ValueError(f"train_rate must be > 0 samples/s, got {train_rate}")
    seconds = train_samples / train_rate
    if eval_samples:
        seconds += eval_samples / (eval_rate or 3.0 * train_rate) / eval_every
    return seconds


@dataclass(frozen=True)
class StepCosts:
    """What a run's time is made of, in seconds, as the plan counts it."""

    step_s: float
    """One optimizer step at the first epoch's image size."""
    steps_per_epoch: int
    eval_s: float = 0.0
    """One evaluation (every ``eval_every`` epochs, and always after the last)."""
    end_s: float = 0.0
    """The rest of each epoch's end: its checkpoint and record."""
    final_s: float = 0.0
    """The end of the run after its last epoch: the reports (best weights, confusion matrix, test split)."""
    eval_every: int = 1
    scale: Callable[[int], float] | None = None
    """A step's cost at epoch ``e`` relative to the first epoch's (progressive resizing: the pixels per image)."""
    size_change_s: float = 0.0
    """What a new training size costs once, at the first step of the first epoch at it (progressive resizing: a
    compiled step is compiled again, and with CUDA graphs recorded): the measured first steps' time beyond the
    steady steps'. A new size is an epoch whose ``scale`` differs from the one before."""

    def __post_init__(self) -> None:
        if not self.step_s > 0:
            raise ValueError(f"step_s must be > 0 seconds, got {self.step_s}")
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")

    def per_step(self, epoch: int) -> float:
        return self.step_s * (self.scale(epoch) if self.scale else 1.0)

    def epoch_start(self, epoch: int) -> float:
        """Epoch ``epoch``'s (0-based) cost before its steps: :attr:`size_change_s` where its size is new."""
        new_size = epoch > 0 and self.scale is not None and self.scale(epoch) != self.scale(epoch - 1)
        return self.size_change_s if new_size else 0.0

    def epoch_end(self, epoch: int, last: bool) -> float:
        """Epoch ``epoch``'s (0-based) end: evaluated when it is the last or every ``eval_every`` epochs."""
        return self.end_s + (self.eval_s if last or (epoch + 1) % self.eval_every == 0 else 0.0)


def plan_steps(budget_s: float, elapsed_s: float, costs: StepCosts, *, done: int = 0, margin: float = 0.02) -> int:
    """Total optimizer steps of the run: the ``done`` ones plus as many more as fit in what is left of
    ``budget_s`` after ``elapsed_s``, less a ``margin`` share of the budget, counting every epoch end the run
    passes and the last epoch's evaluation and the run's reports (``costs``). The last epoch may be partial.
    At least ``done + 1`` (a run trains one step at least, and a re-planned one ends with the step whose
    schedule completes, evaluated), however little is left."""
    spe = costs.steps_per_epoch
    left = budget_s * (1.0 - margin) - elapsed_s - costs.final_s
    step = done
    while True:
        epoch = step // spe
        if step % spe == 0:  # an epoch ahead, not started yet: its new size's compile is ahead too
            left -= costs.epoch_start(epoch)
        per = costs.per_step(epoch)
        closing = left - costs.epoch_end(epoch, last=True)  # for this epoch's steps, when the run ends in it
        fit = math.floor(closing / per + 1e-9) if closing > 0 else 0
        to_end = (epoch + 1) * spe - step
        if fit < to_end:  # the run ends in this epoch: after the steps that fit, or where the last one ended
            if fit > 0 or step % spe or step == done:
                return max(done + 1, step + fit)
            return step
        left -= to_end * per + costs.epoch_end(epoch, last=False)
        step += to_end


def epochs_of(total_steps: int, steps_per_epoch: int) -> int:
    """The epochs ``total_steps`` start (the last one partial when they do not divide)."""
    return max(1, math.ceil(total_steps / max(1, steps_per_epoch)))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: ``/proc``), None where not known: ``fasttrain train
    --time-budget`` counts from the command's start, which is the time its user waits for."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        started = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command's name in parentheses
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
