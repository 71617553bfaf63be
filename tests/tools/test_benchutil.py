"""benchmarks/benchutil.py: the timing helper the DALI epoch-gap benchmark reads its figures from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def _load():
    spec = importlib.util.spec_from_file_location("benchutil", ROOT / "benchmarks" / "benchutil.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchutil", mod)
    spec.loader.exec_module(mod)
    return mod


def test_epoch_gap_times_wait_for_the_device_before_each_clock_reading():
    """On a GPU a batch comes back once its work is enqueued: timing next() alone measured enqueueing. Each
    reading of the clock must follow a synchronize."""
    B = _load()
    events: list[str] = []
    ticks = iter(range(100))

    def clock():
        events.append("clock")
        return float(next(ticks))

    def sync():
        events.append("sync")

    n, times, last = B.epoch_batch_times([[0, 1], [2, 3], [4]], sync, clock=clock)
    assert n == 5 and times == [1.0, 1.0, 1.0] and last == 3.0
    assert events == ["sync", "clock"] * 4  # the start, then every batch
    events.clear()
    _, times, _ = B.epoch_batch_times([[0]], sync, since=1.0, clock=clock)  # the gap from the last epoch's end
    assert times == [3.0] and events == ["sync", "clock"]
