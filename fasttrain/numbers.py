"""Plain numbers shared by the torch side (memory, timing) and the pure rules (autotune's search): byte units and
the spread of repeated measurements. No torch, nothing of fasttrain: the ground floor."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["KIB", "MIB", "GIB", "relative_range", "spread_of"]

KIB, MIB, GIB = 2**10, 2**20, 2**30


def relative_range(low: float, high: float, mid: float) -> float:
    """(high - low) / mid: how far apart repeated measurements are, relative to their median (0 when mid is)."""
    return (high - low) / mid if mid else 0.0


def spread_of(rates: Sequence[float]) -> float:
    """(max - min) / median of repeated measurements; 0 for fewer than two."""
    if len(rates) < 2:
        return 0.0
    return relative_range(min(rates), max(rates), statistics.median(rates))
