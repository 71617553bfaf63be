"""A time budget (``train.time_budget_s``, ``fasttrain train --time-budget 10m``): the number of epochs chosen
from measured speed so that the whole learning-rate schedule fits the budget (stretched to the chosen epochs,
never cut off). Pure functions, no torch: the engine measures, these decide.

The plan is made twice: before the first epoch from a short measurement (a few training steps, undone
afterwards), and once more after the first epoch from its measured time (training and evaluation), which
includes what the short measurement cannot see (the loader's steady state, evaluation, checkpoints).
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "epoch_seconds", "plan_epochs"]

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


def plan_epochs(budget_s: float, elapsed_s: float, epoch_s: float, *, done: int = 0, margin: float = 0.03) -> int:
    """Total epochs of the run: the ``done`` ones plus as many more of ``epoch_s`` as fit in what is left of
    ``budget_s`` after ``elapsed_s``, less a ``margin`` share of the budget (the end-of-run reports); at least
    ``done``, and at least 1 (a run always trains one epoch)."""
    if epoch_s <= 0:
        raise ValueError(f"epoch_s must be > 0 seconds, got {epoch_s}")
    left = budget_s * (1.0 - margin) - elapsed_s
    more = math.floor(left / epoch_s + 1e-9) if left > 0 else 0
    return max(1, done + max(more, 0))
