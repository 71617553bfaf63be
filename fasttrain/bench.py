"""Timing helpers shared by ``fasttrain bench``, autotune and the pytest-benchmark suites in ``benchmarks/``.

Rules every figure here follows (PERF.md, STYLE.md habit 6):
- warm-up steps (compile, cuDNN autotune, worker start) run before the clock and are never counted;
- the clock is read only when the device is idle: CUDA events on CUDA (``elapsed_time`` after the end event
  completes), ``time.perf_counter`` after ``torch.cuda.synchronize`` when work may sit on other streams
  (loaders copy on side streams, DALI runs its own) or on the CPU;
- nothing is read back from the device inside a timed loop: step functions return their batch size as a
  Python ``int`` (known on the host), never a tensor and never ``.item()``;
- a measurement is repeated and reported as the median with its spread (min, max, IQR), together with peak
  memory and the environment that produced it.

``bench(cfg)`` answers the user's question "what limits my run": the loader alone, the train step alone on a
synthetic batch already on the device (the ceiling) and the two together as ``fasttrain train`` runs them.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttrain import _callable_module
from fasttrain.config import Config
from fasttrain.io import write_new_text

log = logging.getLogger(__name__)

__all__ = [
    "Timing",
    "StepTimer",
    "time_steps",
    "run_steps",
    "cycle_batches",
    "synchronize",
    "reset_peak_memory",
    "peak_memory",
    "peak_rss_bytes",
    "loader_throughput",
    "model_step_throughput",
    "end_to_end_throughput",
    "BenchReport",
    "bench",
    "verdict",
]

NOISY_SPREAD = 0.25
"""(max - min) / median of the repeats above which a report calls its figures rough."""
INPUT_BOUND = "input-bound"
COMPUTE_BOUND = "compute-bound"


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for every stream of ``device`` (a no-op on CPU)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- memory ---------------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device | str | None) -> None:
    """Start a fresh peak on CUDA. On CPU the process peak RSS cannot be reset (getrusage is a lifetime peak)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (not of loader worker processes), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def peak_memory(device: torch.device | str | None) -> dict[str, int | None]:
    """Peak allocated / reserved CUDA bytes since the last reset (None on CPU) and the process peak RSS."""
    dev = _as_device(device)
    out: dict[str, int | None] = {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
                                  "peak_rss_bytes": peak_rss_bytes()}
    if dev.type == "cuda":
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
    return out


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
        return (self.samples_per_s_max - self.samples_per_s_min) / self.samples_per_s if self.samples_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread"] = self.spread
        return d

    def describe(self) -> str:
        mem = ""
        if self.peak_allocated_bytes is not None:
            mem = f", peak {self.peak_allocated_bytes / 2**30:.2f} GiB allocated"
        return (f"{self.samples_per_s:,.1f} samples/s (min {self.samples_per_s_min:,.1f}, max "
                f"{self.samples_per_s_max:,.1f}, {self.repeats}x{self.steps} steps){mem}")


def _summarize(samples: list[int], seconds: list[float], *, steps: int, warmup: int, device: torch.device,
               clock: str) -> Timing:
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


def time_steps(step_fn: Callable[[], int], *, warmup: int, steps: int, repeats: int,
               device: torch.device | str | None = None, clock: str = "auto") -> Timing:
    """Time ``step_fn`` (runs one step, returns its batch size as an int).

    ``warmup`` steps run once, untimed, before the first repeat; then ``repeats`` x ``steps`` timed steps.
    Peak CUDA memory is reset before the warm-up, so it covers everything this call ran.
    """
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"time_steps: need steps >= 1, repeats >= 1, warmup >= 0 (got {steps}, {repeats}, {warmup})")
    dev = _as_device(device)
    reset_peak_memory(dev)
    for _ in range(warmup):
        _check_batch_size(step_fn())
    timer = StepTimer(dev, clock)
    samples: list[int] = []
    seconds: list[float] = []
    for _ in range(repeats):
        n = 0
        timer.start()
        for _ in range(steps):
            n += step_fn()
        timer.stop()
        seconds.append(timer.elapsed())
        samples.append(_check_batch_size(n))
    return _summarize(samples, seconds, steps=steps, warmup=warmup, device=dev, clock=timer.mode)


def _check_batch_size(n: Any) -> int:
    # A tensor here would mean a device read-back (a hidden sync) in the timed loop.
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"step_fn must return its batch size as a Python int, got {type(n).__name__}")
    return n


def cycle_batches(loader: Any) -> Iterator[Any]:
    """Endless batches: restarts the loader (with the next epoch number) when an epoch ends, as training does."""
    epoch = 0
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


def loader_throughput(loader: Iterable, *, warmup_batches: int, max_batches: int, repeats: int = 1,
                      device: torch.device | str | None = None) -> Timing:
    """The loader alone: batches drawn and the device synchronized before the clock is read.

    The first ``warmup_batches`` (at least one: it carries worker start) are untimed. ``device`` defaults to
    the device of the first batch. The loader restarts (next epoch) when it runs out.
    """
    it = cycle_batches(loader)
    first = next(it)  # always warm-up: it carries worker / pipeline start
    dev = _as_device(device) if device is not None else _batch_device(first)

    def step() -> int:
        return len(next(it))

    t = time_steps(step, warmup=max(warmup_batches - 1, 0), steps=max_batches, repeats=repeats, device=dev,
                   clock="wall")
    t.warmup = max(warmup_batches, 1)
    return t


def _train_step_fn(task: Any, state: Any, next_batch: Callable[[], Any], accumulation: int) -> Callable[[], int]:
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


def model_step_throughput(task: Any, state: Any, batch: Any, *, warmup: int, steps: int, repeats: int,
                          accumulation: int = 1) -> Timing:
    """The train step alone on a batch already on the device: the ceiling no loader can beat."""
    device = task.runtime.device
    step = _train_step_fn(task, state, lambda: batch, accumulation)
    clock = "events" if device.type == "cuda" else "wall"
    return time_steps(step, warmup=warmup, steps=steps, repeats=repeats, device=device, clock=clock)


def end_to_end_throughput(task: Any, state: Any, loader: Iterable, *, warmup: int, steps: int, repeats: int,
                          accumulation: int = 1) -> Timing:
    """Loader and train step together, as ``fasttrain train`` runs them (micro-batches, update every
    ``accumulation``). ``steps`` counts micro-batches. Timed by the wall clock: the loader works on the CPU and
    on side streams that CUDA events on the current stream would not see."""
    it = cycle_batches(loader)
    step = _train_step_fn(task, state, lambda: next(it), accumulation)
    return time_steps(step, warmup=warmup, steps=steps, repeats=repeats, device=task.runtime.device, clock="wall")


# -- the user-facing report -----------------------------------------------------------------------------------
def verdict(loader_sps: float, model_sps: float) -> str:
    """input-bound when the loader alone cannot keep up with the train step alone, else compute-bound."""
    return INPUT_BOUND if loader_sps < model_sps else COMPUTE_BOUND


@dataclass
class BenchReport:
    config_name: str
    backend: str
    """Loader backend the run uses: torch, dali or cache (``data.loader``, or what auto chose)."""
    model: str
    batch_size: int
    """Micro-batch (samples per train_step call)."""
    runtime: str
    """Runtime.describe(): device, precision, channels_last, compile."""
    loader: Timing
    model_step: Timing
    end_to_end: Timing
    environment: dict[str, Any] = field(default_factory=dict)
    json_path: str | None = None
    """Where the JSON report was written (a new name when the asked-for file existed)."""

    @property
    def verdict(self) -> str:
        return verdict(self.loader.samples_per_s, self.model_step.samples_per_s)

    @property
    def ceiling_share(self) -> float:
        """End-to-end samples/s as a share of the model-only ceiling (1.0 = the loader costs nothing)."""
        ceiling = self.model_step.samples_per_s
        return self.end_to_end.samples_per_s / ceiling if ceiling else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_name,
            "backend": self.backend,
            "model": self.model,
            "batch_size": self.batch_size,
            "runtime": self.runtime,
            "verdict": self.verdict,
            "ceiling_share": self.ceiling_share,
            "loader": self.loader.to_dict(),
            "model_step": self.model_step.to_dict(),
            "end_to_end": self.end_to_end.to_dict(),
            "environment": self.environment,
        }

    def to_table(self) -> str:
        rows = [("loader only", self.loader), ("model only (ceiling)", self.model_step),
                ("end to end", self.end_to_end)]
        cuda = self.model_step.peak_allocated_bytes is not None
        mem_head = "alloc GiB" if cuda else "RSS GiB"  # CUDA: peak allocated; CPU: process peak RSS
        head = f"{'measurement':<22}{'samples/s':>12}{'min':>12}{'max':>12}{'ms/step':>10}{mem_head:>11}"
        lines = [f"fasttrain bench {self.config_name}: {self.model}, batch {self.batch_size}, "
                 f"loader {self.backend}, {self.runtime}", head, "-" * len(head)]
        for name, t in rows:
            peak = t.peak_allocated_bytes if cuda else t.peak_rss_bytes
            mem = "-" if peak is None else f"{peak / 2**30:.2f}"
            lines.append(f"{name:<22}{t.samples_per_s:>12,.1f}{t.samples_per_s_min:>12,.1f}"
                         f"{t.samples_per_s_max:>12,.1f}{t.seconds_per_step * 1e3:>10.1f}{mem:>11}")
        lines.append("")
        lines.append(f"verdict: {self.verdict}; end to end reaches {self.ceiling_share:.0%} of the model-only "
                     f"ceiling")
        noisiest = max(t.spread for _, t in rows)
        if self.ceiling_share > 1.05 or noisiest > NOISY_SPREAD:
            lines.append(f"note: repeats differ by up to {noisiest:.0%} of their median (a busy machine?); the "
                         f"figures are rough: raise bench.steps / bench.repeats for steadier ones")
        if self.verdict == INPUT_BOUND:
            lines.append("the loader limits this run: try data.loader = dali or cache, more data.workers / "
                         "data.dali_threads, or smaller images")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` to ``path``, or ``stem-2.json``... where it exists (a user's file is never
        overwritten); returns the path written."""
        return write_new_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def bench(cfg: Config, *, json_path: str | os.PathLike | None = None) -> BenchReport:
    """Loader-only, model-only and end-to-end samples/s for ``cfg``, with the verdict. Writes JSON when asked.

    The config is prepared exactly as ``fasttrain train`` prepares it (data root, runtime, task, backend);
    ``cfg.bench`` (warmup_steps, steps, repeats) sets every measurement; batches are training micro-batches.
    """
    from fasttrain.prepare import prepare
    from fasttrain.runtime import environment, seed_everything

    prep = prepare(cfg)
    cfg, runtime = prep.cfg, prep.runtime
    seed_everything(cfg.runtime.seed)
    b, tc = cfg.bench, cfg.train
    log.info("bench %s: %s | loader %s (%s)", cfg.name, runtime.describe(), prep.backend, prep.backend_reason)
    with runtime.flags():
        model_t, loader_t, e2e_t = _measure_all(prep, b, tc)
    report = BenchReport(
        config_name=cfg.name,
        backend=prep.backend,
        model=cfg.model.name,
        batch_size=tc.micro_batch,
        runtime=runtime.describe(),
        loader=loader_t,
        model_step=model_t,
        end_to_end=e2e_t,
        environment=environment(),
    )
    if json_path is not None:
        report.json_path = str(report.write_json(json_path))
        log.info("bench report written to %s", report.json_path)
    return report


def _measure_all(prep, b, tc) -> tuple[Timing, Timing, Timing]:
    """(model-only, loader-only, end to end) for a prepared config."""
    task, runtime = prep.task, prep.runtime
    state = task.build_state()
    loader = task.make_loader(prep.source.train, train=True, batch_size=tc.micro_batch, backend=prep.backend)
    try:
        # The ceiling first: its warm-up also absorbs compile and cuDNN autotuning, so end to end starts warm.
        batch = task.synthetic_batch(tc.micro_batch, task.input_spec(), train=True)
        model_t = model_step_throughput(task, state, batch, warmup=b.warmup_steps, steps=b.steps,
                                        repeats=b.repeats, accumulation=tc.accumulation)
        del batch
        loader_t = loader_throughput(loader, warmup_batches=b.warmup_steps, max_batches=b.steps, repeats=b.repeats,
                                     device=runtime.device)
        e2e_t = end_to_end_throughput(task, state, loader, warmup=b.warmup_steps, steps=b.steps, repeats=b.repeats,
                                      accumulation=tc.accumulation)
    finally:
        loader.close()
    return model_t, loader_t, e2e_t


_callable_module(__name__, "bench")  # fasttrain.bench(...) is bench(...): see fasttrain/__init__.py
