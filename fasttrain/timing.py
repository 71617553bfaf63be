"""Timing: how every figure of fasttrain is clocked, for ``fasttrain bench``, autotune and ``benchmarks/``.

Rules every figure here follows:
- warm-up steps (compile, cuDNN autotune, worker start) run before the clock and are never counted;
- the clock is read only when the device is idle: CUDA events on CUDA (``elapsed_time`` after the end event
  completes), ``time.perf_counter`` after ``torch.cuda.synchronize`` when work may sit on other streams
  (loaders copy on side streams, DALI runs its own) or on the CPU;
- nothing is read back from the device inside a timed loop: step functions return their batch size as a
  Python ``int`` (known on the host), never a tensor and never ``.item()``;
- a measurement is repeated and reported as the median with its spread (min, max, IQR), together with peak
  memory and the environment that produced it;
- a measurement can be bounded by time instead of steps (:func:`time_window`), and a whole procedure by a
  :class:`TimeBudget`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fasttrain.memory import format_bytes, peak_memory, reset_peak_memory
from fasttrain.numbers import relative_range

__all__ = [
    "Timing",
    "StepTimer",
    "TimeBudget",
    "time_steps",
    "time_window",
    "run_steps",
    "cycle_batches",
    "synchronize",
    "relative_spread",
    "loader_throughput",
    "model_step_throughput",
    "end_to_end_throughput",
    "train_step_fn",
]


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for every stream of ``device`` (a no-op on CPU)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def relative_spread(rates: list[float]) -> float:
    """(max - min) / median of repeated measurements: their relative noise (0 for fewer than two)."""
    if len(rates) < 2:
        return 0.0
    mid = statistics.median(rates)
    return (max(rates) - min(rates)) / mid if mid else 0.0


# -- the clock ------------------------------------------------------------------------------------------------
class StepTimer:
    """Times one interval of device work.

    ``mode="events"`` (CUDA only): CUDA events recorded on the current stream; the host never stalls between
    ``start`` and ``stop``, and ``elapsed()`` waits for the end event. Right for work that runs on the current
    stream (a train step on a batch already on the device).
    ``mode="wall"``: ``time.perf_counter`` read after a full device synchronize at both ends. Right when work
    also runs on other streams or on the CPU (loaders, end to end) and always used on CPU.
    ``mode="auto"`` picks events on CUDA and wall otherwise.
    """

    def __init__(self, device: torch.device | str | None = None, mode: str = "auto"):
        self.device = _as_device(device)
        if mode not in ("auto", "events", "wall"):
            raise ValueError(f"StepTimer mode must be auto, events or wall, got {mode!r}")
        if mode == "events" and self.device.type != "cuda":
            raise ValueError(f"StepTimer: CUDA events need a CUDA device, got {self.device}")
        self.mode = ("events" if self.device.type == "cuda" else "wall") if mode == "auto" else mode
        self._start: Any = None
        self._end: Any = None

    def start(self) -> None:
        if self.mode == "events":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))
        else:
            synchronize(self.device)  # earlier work (warm-up) must not leak into this interval
            self._start = time.perf_counter()
            self._end = None

    def stop(self) -> None:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() before start()")
        if self.mode == "events":
            self._end.record(torch.cuda.current_stream(self.device))
        else:
            synchronize(self.device)  # the clock is read only once the device has finished
            self._end = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds between ``start`` and ``stop`` (waits for the end event on CUDA)."""
        if self._end is None:
            raise RuntimeError("StepTimer.elapsed() before stop()")
        if self.mode == "events":
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._end - self._start

    def __enter__(self) -> StepTimer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one measurement ------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One measurement: ``repeats`` timed runs of ``steps`` steps each, after ``warmup`` untimed steps."""

    samples_per_s: float
    """Median over repeats of samples / seconds."""
    samples_per_s_min: float
    samples_per_s_max: float
    samples_per_s_iqr: float
    """Interquartile range of the per-repeat samples/s (0 with fewer than 2 repeats)."""
    seconds_per_step: float
    """Median over repeats of seconds / steps."""
    steps: int
    """Timed steps per repeat."""
    warmup: int
    repeats: int
    samples: int
    """Samples in one repeat (the median repeat's count; all repeats have it with a fixed batch size)."""
    per_repeat_samples_per_s: list[float] = field(default_factory=list)
    per_repeat_seconds: list[float] = field(default_factory=list)
    peak_allocated_bytes: int | None = None
    """CUDA: torch.cuda.max_memory_allocated over the whole call, warm-up included (None on CPU)."""
    peak_reserved_bytes: int | None = None
    """CUDA: torch.cuda.max_memory_reserved over the whole call, warm-up included (None on CPU)."""
    peak_rss_bytes: int | None = None
    """Peak RSS of this process over its lifetime (getrusage; loader worker processes not included)."""
    device: str = "cpu"
    clock: str = "wall"
    """events (CUDA events) or wall (perf_counter after a device synchronize)."""

    @property
    def spread(self) -> float:
        """(max - min) / median of samples/s: the relative noise of this measurement."""
        return relative_range(self.samples_per_s_min, self.samples_per_s_max, self.samples_per_s)

    @property
    def timed_seconds(self) -> float:
        """Seconds on the clock, all repeats together (warm-up excluded)."""
        return float(sum(self.per_repeat_seconds))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = self.spread
        return d

    def describe(self) -> str:
        mem = ""
        if self.peak_allocated_bytes is not None:
            mem = f", peak {format_bytes(self.peak_allocated_bytes, 'GiB')} allocated"
        return (
            f"{self.samples_per_s:,.1f} samples/s (min {self.samples_per_s_min:,.1f}, max "
            f"{self.samples_per_s_max:,.1f}, {self.repeats}x{self.steps} steps){mem}"
        )


def _summarize(
    samples: list[int], seconds: list[float], *, steps: int, warmup: int, device: torch.device, clock: str
) -> Timing:
    rates = [n / s if s > 0 else float("inf") for n, s in zip(samples, seconds)]
    if len(rates) >= 2:
        q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive")
        iqr = q3 - q1
    else:
        iqr = 0.0
    order = sorted(range(len(rates)), key=rates.__getitem__)
    mid = order[len(order) // 2]
    mem = peak_memory(device)
    return Timing(
        samples_per_s=statistics.median(rates),
        samples_per_s_min=min(rates),
        samples_per_s_max=max(rates),
        samples_per_s_iqr=iqr,
        seconds_per_step=statistics.median(seconds) / steps,
        steps=steps,
        warmup=warmup,
        repeats=len(rates),
        samples=samples[mid],
        per_repeat_samples_per_s=rates,
        per_repeat_seconds=list(seconds),
        device=str(device),
        clock=clock,
        **mem,
    )


def run_steps(step_fn: Callable[[], int], steps: int, device: torch.device | str | None = None) -> int:
    """Run ``steps`` steps and wait for the device; returns the samples processed. One benchmark round."""
    n = 0
    for _ in range(steps):
        n += step_fn()
    synchronize(device)
    return n


def time_steps(
    step_fn: Callable[[], int],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    device: torch.device | str | None = None,
    clock: str = "auto",
    reset_peak: bool = True,
    max_repeat_s: float | None = None,
) -> Timing:
    """Time ``step_fn`` (runs one step, returns its batch size as an int).

    ``warmup`` steps run once, untimed, before the first repeat; then ``repeats`` x ``steps`` timed steps.
    Peak CUDA memory is reset before the warm-up (unless ``reset_peak`` is False: the caller owns the peak), so
    it covers everything this call ran. ``max_repeat_s`` (wall clock only, where the host reads the time anyway)
    ends a repeat early once it has lasted that long: a machine that slows down mid-measurement cannot stretch a
    bounded measurement; the rate counts the steps that ran. ``Timing.steps`` stays the planned count.
    """
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"time_steps: need steps >= 1, repeats >= 1, warmup >= 0 (got {steps}, {repeats}, {warmup})")
    dev = _as_device(device)
    if reset_peak:
        reset_peak_memory(dev)
    for _ in range(warmup):
        _check_batch_size(step_fn())
    timer = StepTimer(dev, clock)
    samples: list[int] = []
    seconds: list[float] = []
    bounded = max_repeat_s is not None and timer.mode == "wall"
    for _ in range(repeats):
        n = 0
        timer.start()
        for _ in range(steps):
            n += step_fn()
            if bounded and time.perf_counter() - timer._start > max_repeat_s:
                break
        timer.stop()
        seconds.append(timer.elapsed())
        samples.append(_check_batch_size(n))
    return _summarize(samples, seconds, steps=steps, warmup=warmup, device=dev, clock=timer.mode)


def time_window(
    step_fn: Callable[[], int],
    *,
    warmup: int,
    repeats: int,
    seconds: float,
    min_steps: int = 1,
    max_steps: int = 100_000,
    step_multiple: int = 1,
    device: torch.device | str | None = None,
    clock: str = "auto",
    reset_peak: bool = True,
    max_repeat_s: float | None = None,
) -> Timing:
    """:func:`time_steps` with each repeat lasting about ``seconds`` instead of a fixed step count.

    The ``warmup`` steps and one more calibration step are each timed alone (the device synchronized around
    them, untimed for the result); the fastest of them after the first (which carries compile and allocation)
    sizes the repeats: ``ceil(seconds / fastest)`` steps, kept within ``min_steps``..``max_steps`` and rounded
    up to a multiple of ``step_multiple`` (whole optimizer steps under accumulation). The fastest, not the last:
    one step slowed by another process must not shrink the window to a single step. A slow step still runs
    ``min_steps`` per repeat: the bound is on the window, and a caller that must bound the total checks the
    step's cost first. ``max_repeat_s``: see :func:`time_steps`.
    """
    if seconds <= 0 or min_steps < 1 or step_multiple < 1:
        raise ValueError(
            f"time_window: need seconds > 0, min_steps >= 1, step_multiple >= 1 (got {seconds}, "
            f"{min_steps}, {step_multiple})"
        )
    dev = _as_device(device)
    if reset_peak:
        reset_peak_memory(dev)
    times = []
    for _ in range(warmup + 1):
        calib = StepTimer(dev, "wall")
        with calib:
            _check_batch_size(step_fn())
        times.append(calib.elapsed())
    per_step = max(min(times[1:] or times), 1e-9)
    steps = min(max(min_steps, math.ceil(seconds / per_step)), max(max_steps, min_steps))
    steps = -(-steps // step_multiple) * step_multiple
    t = time_steps(
        step_fn,
        warmup=0,
        steps=steps,
        repeats=repeats,
        device=dev,
        clock=clock,
        reset_peak=False,
        max_repeat_s=max_repeat_s,
    )
    t.warmup = warmup + 1
    return t


class TimeBudget:
    """The seconds a procedure may take, counted from its creation. Time spent inside :meth:`excluded` (a
    compile the caller accounts for separately) does not count. ``clock`` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        if seconds <= 0:
            raise ValueError(f"TimeBudget: seconds must be > 0, got {seconds}")
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()
        self.excluded_s = 0.0

    def elapsed(self) -> float:
        """Seconds counted so far (excluded time left out)."""
        return self._clock() - self._start - self.excluded_s

    def left(self, share: float = 1.0) -> float:
        """Seconds left until ``share`` of the budget is spent (negative once past it)."""
        return self.seconds * share - self.elapsed()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` already spent out of the count."""
        self.excluded_s += max(0.0, seconds)

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.excluded_s += self._clock() - t0

    def stamp(self) -> str:
        """``12.3/45 s``: for progress lines (a computed budget, 0.901804 s, shown as 0.9)."""
        return f"{self.elapsed():.1f}/{round(self.seconds, 1):g} s"


def _check_batch_size(n: Any) -> int:
    # A tensor here would mean a device read-back (a hidden sync) in the timed loop.
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"step_fn must return its batch size as a Python int, got {type(n).__name__}")
    return n


def cycle_batches(loader: Any, epoch: int = 0) -> Iterator[Any]:
    """Endless batches: restarts the loader (with the next epoch number) when an epoch ends, as training does.

    ``epoch``: the epoch the loader is set to now; the passes after it take ``epoch + 1``, ``epoch + 2``, ...
    A caller that set a later epoch (progressive resizing: the first at the largest size) must say so, or the
    second pass would fall back to epoch 1 and its smaller size."""
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise ValueError("loader yielded no batches (fewer samples than one batch with drop_last?)")
        epoch += 1
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)


def _batch_device(batch: Any) -> torch.device:
    inputs = batch.inputs if hasattr(batch, "inputs") else batch[0]
    return inputs.device


def loader_throughput(
    loader: Iterable,
    *,
    warmup_batches: int,
    max_batches: int,
    repeats: int = 1,
    device: torch.device | str | None = None,
    epoch: int = 0,
) -> Timing:
    """The loader alone: batches drawn and the device synchronized before the clock is read.

    The first ``warmup_batches`` (at least one: it carries worker start) are untimed. ``device`` defaults to
    the device of the first batch. The loader restarts (next epoch) when it runs out; ``epoch``: the one it is
    set to now (:func:`cycle_batches`).
    """
    it = cycle_batches(loader, epoch)
    first = next(it)  # always warm-up: it carries worker / pipeline start
    dev = _as_device(device) if device is not None else _batch_device(first)

    def step() -> int:
        return len(next(it))

    t = time_steps(
        step, warmup=max(warmup_batches - 1, 0), steps=max_batches, repeats=repeats, device=dev, clock="wall"
    )
    t.warmup = max(warmup_batches, 1)
    return t


def train_step_fn(task: Any, state: Any, next_batch: Callable[[], Any], accumulation: int) -> Callable[[], int]:
    """One micro-batch through ``task.train_step`` as the engine runs it (the optimizer steps every
    ``accumulation`` micro-batches); returns the batch size, reading nothing back from the device."""
    state.train(True)
    counter = [0]

    def step() -> int:
        batch = next_batch()
        counter[0] += 1
        task.train_step(state, batch, update=counter[0] % accumulation == 0, loss_scale=1.0 / accumulation)
        return len(batch)

    return step


def model_step_throughput(
    task: Any, state: Any, batch: Any, *, warmup: int, steps: int, repeats: int, accumulation: int = 1
) -> Timing:
    """The train step alone on a batch already on the device: the ceiling no loader can beat."""
    device = task.runtime.device
    step = train_step_fn(task, state, lambda: batch, accumulation)
    clock = "events" if device.type == "cuda" else "wall"
    return time_steps(step, warmup=warmup, steps=steps, repeats=repeats, device=device, clock=clock)


def end_to_end_throughput(
    task: Any,
    state: Any,
    loader: Iterable,
    *,
    warmup: int,
    steps: int,
    repeats: int,
    accumulation: int = 1,
    epoch: int = 0,
) -> Timing:
    """Loader and train step together, as ``fasttrain train`` runs them (micro-batches, update every
    ``accumulation``). ``steps`` counts micro-batches. Timed by the wall clock: the loader works on the CPU and
    on side streams that CUDA events on the current stream would not see. ``epoch``: the one the loader is set
    to now (:func:`cycle_batches`)."""
    it = cycle_batches(loader, epoch)
    step = train_step_fn(task, state, lambda: next(it), accumulation)
    return time_steps(step, warmup=warmup, steps=steps, repeats=repeats, device=task.runtime.device, clock="wall")
