"""Batch-size and loader autotuning: the best samples/s that fits a memory budget, written to a new config.

Three layers, as STYLE.md habit 7 asks:

- **The search core** (pure, no torch): :func:`search_batch_size` grows the batch geometrically (x2) from
  ``tune.min_batch``, bisects on multiples of ``tune.multiple`` between the last usable size and the first
  unusable one, and stops early where throughput stopped rising (two consecutive growths within
  ``tune.noise``, or a bisection step that gained less than the noise). :func:`choose_batch` picks the best
  samples/s among sizes that leave ``tune.headroom`` of the budget, preferring the smaller of two within the
  noise. :func:`plan_batches` keeps a global batch larger than that via gradient accumulation.
- **The probe** (:class:`StepProbe`): the real ``task.train_step`` (forward, backward, optimizer step, so the
  optimizer state exists) on the largest input shape, then one ``task.eval_step`` at the eval batch size and
  one more train step (training resumes after evaluation with the allocator holding eval-shaped blocks),
  with the configured model, precision and channels_last. Timing comes from :mod:`fasttrain.bench` (warm-up
  excluded). A candidate fits when it raised no out-of-memory error *and* needed no allocator retries
  (``num_alloc_retries``: a size that only runs by flushing the cache is fragmenting and will stall or fail in
  a long run). Only real out-of-memory errors count as not fitting; every other error propagates. Recovery
  happens outside the ``except`` block (the exception's traceback holds the step's tensors).
- **The report**: a table, JSON, a PNG plot, a tuned TOML config, a cache entry, and a verification run.

Compile: the search probes **eagerly** and compiles **once**, at the chosen size. Compiling per candidate
costs a compile per batch size (tens of seconds each for a ResNet), and marking the batch dimension dynamic
measures a dynamic-shape program, while training runs a static one (the train loader drops the last batch so
every step has one shape): its kernels, speed and memory are not the ones training gets. Eager memory is an
upper bound of compiled memory for the step (inductor fuses and saves fewer activations; PERF.md: ResNet-50
27 GiB eager fp32 vs 10.6 GiB compiled), so an eager fit is a safe fit. The compiled check at the chosen size
then measures what training will run (and falls back to the next usable size if it does not fit, as
``reduce-overhead`` CUDA-graph pools can make it bigger); its state is reused by the verification run, so the
whole autotune compiles once.

On CPU there is no VRAM budget: samples/s per batch size and the process's peak RSS are measured, and the
config is still written.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fasttrain import _callable_module
from fasttrain.config import Config, default_workers, dump_config
from fasttrain.io import atomic_write_text, write_new, write_new_text

log = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "SearchResult",
    "BatchPlan",
    "Budget",
    "LoaderTrial",
    "AutotuneReport",
    "search_batch_size",
    "choose_batch",
    "plan_batches",
    "is_oom_error",
    "cache_key",
    "StepProbe",
    "autotune",
    "run_cli",
    "plot_report",
]

GIB = 2**30
CACHE_VERSION = 2
LOADER_MARGIN = 1.05
"""The loader keeps up when it delivers at least this multiple of the step's samples/s."""


# ================================================================================================= pure core ===
@dataclass
class Candidate:
    """One probed batch size."""

    batch_size: int
    fits: bool
    """Ran without an out-of-memory error and without allocator retries."""
    samples_per_s: float | None = None
    """Train-step samples/s (median over repeats, warm-up excluded); None when it did not fit."""
    usage_bytes: int | None = None
    """What counts against the budget: peak reserved (+ context/other processes when emulating); None on CPU."""
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    """Process peak RSS over its lifetime (CPU runs report this instead of VRAM)."""
    alloc_retries: int = 0
    """Allocator retries (cache flushed and malloc retried) during the probe; > 0 means it did not fit."""
    eval_batch_size: int = 0
    usable: bool = False
    """Fits and leaves the headroom (set by the search)."""
    phase: str = ""
    """grow, bisect or compiled."""
    error: str = ""
    """Why it did not fit or is not usable."""
    seconds: float = 0.0
    """Wall time of the probe, warm-up included."""
    spread: float = 0.0
    """(max - min) / median of the per-repeat samples/s."""
    untimed_s: float = 0.0
    """Of ``seconds``, the part outside the timed steps: warm-up (compile, cuDNN autotuning) and the eval step."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SearchResult:
    candidates: list[Candidate]
    """Every probe in the order it ran."""
    chosen: int | None
    """The chosen batch size; None when no size was usable."""
    best: int | None
    """The batch size with the highest samples/s among usable ones."""
    stop_reason: str
    max_usable: int | None = None
    """Largest usable batch size probed."""

    def by_size(self) -> dict[int, Candidate]:
        return {c.batch_size: c for c in self.candidates}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _round_down(x: int, m: int) -> int:
    return x // m * m


def mark_usable(c: Candidate, budget_bytes: int | None, headroom: float) -> Candidate:
    """Set ``c.usable``: it fits, was timed, and its usage leaves ``headroom`` of the budget (no budget on CPU)."""
    c.usable = c.fits and c.samples_per_s is not None
    limit = None if budget_bytes is None else (1.0 - headroom) * budget_bytes
    if c.usable and limit is not None and c.usage_bytes is not None and c.usage_bytes > limit:
        c.usable = False
        c.error = c.error or (f"leaves less than {headroom:.0%} headroom "
                              f"({c.usage_bytes / GIB:.2f} of {budget_bytes / GIB:.2f} GiB)")
    return c


def choose_batch(candidates: Iterable[Candidate], noise: float) -> tuple[int | None, int | None]:
    """(chosen, best): the best samples/s among usable candidates; the smallest batch within ``noise`` of it
    is chosen (it gives the same speed with less memory, and more optimizer steps per epoch)."""
    usable = [c for c in candidates if c.usable and c.samples_per_s is not None]
    if not usable:
        return None, None
    best = max(usable, key=lambda c: (c.samples_per_s, -c.batch_size))
    floor = best.samples_per_s * (1.0 - noise)
    chosen = min(c.batch_size for c in usable if c.samples_per_s >= floor)
    return chosen, best.batch_size


def search_batch_size(measure: Callable[[int, str], Candidate], *, min_batch: int, max_batch: int, multiple: int,
                      noise: float, budget_bytes: int | None, headroom: float) -> SearchResult:
    """Grow x2 from ``min_batch``, bisect the first unusable step on multiples of ``multiple``, choose.

    ``measure(batch_size, phase)`` probes one size and returns a :class:`Candidate` (``fits``, samples/s,
    ``usage_bytes``). A candidate is usable when it fits and ``usage_bytes <= (1 - headroom) * budget_bytes``
    (no budget: every fit is usable). Growth stops at the first unusable size, at ``max_batch``, or after two
    consecutive growths within ``noise`` (throughput stopped rising). Bisection runs only after an unusable
    size; it stops when the interval is one ``multiple`` wide or when a larger usable size gained less than
    ``noise`` over the last one (nothing between can win by more than the noise).
    """
    if multiple < 1 or min_batch < 1:
        raise ValueError(f"tune.multiple ({multiple}) and tune.min_batch ({min_batch}) must be >= 1")
    start = _round_up(min_batch, multiple)
    cap = _round_down(max_batch, multiple)
    if cap < start:
        raise ValueError(f"tune.max_batch: no multiple of tune.multiple ({multiple}) lies between tune.min_batch "
                         f"({min_batch}) and the largest batch tried ({max_batch})")
    results: dict[int, Candidate] = {}
    order: list[Candidate] = []

    def run(b: int, phase: str) -> Candidate:
        c = mark_usable(measure(b, phase), budget_bytes, headroom)
        c.phase = c.phase or phase
        results[b] = c
        order.append(c)
        return c

    last_ok: int | None = None
    first_bad: int | None = None
    flat = 0
    stop = ""
    b = start
    while True:
        c = run(b, "grow")
        if not c.usable:
            first_bad = b
            stop = f"batch {b} is not usable ({c.error or 'does not fit'})"
            break
        if last_ok is not None:
            rose = c.samples_per_s > results[last_ok].samples_per_s * (1.0 + noise)
            flat = 0 if rose else flat + 1
        last_ok = b
        if flat >= 2:
            stop = f"throughput stopped rising (two growths within {noise:.0%}) at batch {b}"
            break
        if b >= cap:
            stop = f"reached the largest batch tried ({cap})"
            break
        b = min(cap, b * 2)

    if first_bad is not None and last_ok is not None:
        lo, hi = last_ok, first_bad
        while hi - lo > multiple:
            mid = _round_down((lo + hi) // 2, multiple)
            if mid <= lo:
                mid = lo + multiple
            c = run(mid, "bisect")
            if c.usable:
                gained = c.samples_per_s > results[lo].samples_per_s * (1.0 + noise)
                lo = mid
                if not gained:
                    stop += f"; bisection stopped at {mid}: no gain beyond {noise:.0%}"
                    break
            else:
                hi = mid
        else:
            stop += f"; largest usable batch {lo}, first unusable {hi}"

    chosen, best = choose_batch(order, noise)
    if chosen is None:
        first = order[0]
        stop = (f"no batch size is usable: the smallest tried ({first.batch_size}) "
                f"{first.error or 'does not fit'}")
    usable = [c.batch_size for c in order if c.usable]
    return SearchResult(order, chosen, best, stop, max(usable) if usable else None)


@dataclass
class BatchPlan:
    """How the global batch (train.batch_size) is reached with micro-batches that fit."""

    micro_batch: int
    accumulation: int
    global_batch: int
    requested_global: int
    note: str

    @property
    def changed_global(self) -> bool:
        return self.global_batch != self.requested_global


def plan_batches(requested_global: int, chosen: int, *, multiple: int, max_usable: int | None = None) -> BatchPlan:
    """Turn the chosen batch into train.batch_size / train.accumulation.

    - requested <= chosen: the global batch becomes the chosen batch (one micro-batch per step);
    - chosen < requested <= ``max_usable`` (a probed size that fit with headroom; memory grows with the batch):
      the requested batch is kept as one micro-batch;
    - otherwise the requested batch is kept through accumulation: ``ceil(requested / chosen)`` micro-batches or
      a few more, on a split into equal micro-batches (on multiples of ``multiple`` where one exists), so
      micro * accumulation == requested. Where no equal split exists, the global batch is changed by less
      than one micro-batch, and the note says so.
    """
    g = requested_global
    if g <= chosen:
        if g == chosen:
            return BatchPlan(chosen, 1, chosen, g, f"train.batch_size {g} is the chosen batch")
        return BatchPlan(chosen, 1, chosen, g,
                         f"train.batch_size raised from {g} to {chosen} (the fastest usable batch); optim.lr is per "
                         f"optimizer step and was left as it is: retune it, or scale it x{chosen / g:.3g} "
                         f"(linear rule)")
    if max_usable is not None and g <= max_usable:
        return BatchPlan(g, 1, g, g, f"train.batch_size {g} fits as one micro-batch (batch {max_usable} was "
                                     f"measured within the budget): kept without accumulation")
    accum_min = math.ceil(g / chosen)
    tries = range(accum_min, 2 * accum_min + 1)
    for a in tries:
        if g % a == 0 and (g // a) % multiple == 0:
            return BatchPlan(g // a, a, g, g, f"train.batch_size {g} does not fit as one batch: kept as {a} x "
                                              f"{g // a} (gradient accumulation)")
    for a in tries:
        if g % a == 0:
            return BatchPlan(g // a, a, g, g,
                             f"train.batch_size {g} kept as {a} x {g // a} (gradient accumulation); the "
                             f"micro-batch is not a multiple of {multiple}: no equal split of {g} into "
                             f"micro-batches of at most {chosen} is")
    micro = math.ceil(g / accum_min)
    new_g = micro * accum_min
    return BatchPlan(micro, accum_min, new_g, g,
                     f"train.batch_size {g} cannot be split into {accum_min}..{2 * accum_min} equal micro-batches "
                     f"of at most {chosen}: changed to {new_g} = {accum_min} x {micro}")


def is_oom_error(exc: BaseException | None) -> bool:
    """True only for out-of-memory errors: torch.OutOfMemoryError, or a RuntimeError whose message says
    out of memory (CUDA, cuBLAS/cuDNN allocation failures, the CPU allocator), also when wrapped as the
    ``__cause__`` of another error (torch.compile re-raises). Everything else is a real bug and propagates."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    markers = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
               "can't allocate memory")
    for _ in range(8):
        if exc is None:
            return False
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        if isinstance(exc, (RuntimeError, MemoryError)):
            if isinstance(exc, MemoryError):
                return True
            text = str(exc).lower()
            if any(m in text for m in markers):
                return True
        exc = exc.__cause__
    return False


def _oom_summary(exc: BaseException) -> str:
    """A one-line description that keeps no reference to the exception (or its frames)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"out of memory ({first[:160]})"


def cache_key(fields: dict[str, Any]) -> str:
    """A stable hash of the fields that decide the result (see :func:`_key_fields`)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_dir_for(cfg: Config) -> Path:
    """tune.cache_dir, else the autotune/ folder of fasttrain's cache (where the demo dataset lives too)."""
    from fasttrain.data.synthetic import default_cache_dir

    return Path(cfg.tune.cache_dir).expanduser() if cfg.tune.cache_dir else default_cache_dir() / "autotune"


# ================================================================================================== budget ===
@dataclass
class Budget:
    """The memory a candidate may use, and how it is enforced."""

    mode: str
    """emulated (a cap on a larger card), card (the card is smaller: its free memory) or cpu (no VRAM budget)."""
    requested_gib: float
    budget_bytes: int | None = None
    """What usage is compared to (None on CPU)."""
    card_total_bytes: int | None = None
    in_use_before_bytes: int | None = None
    """Device memory in use before the probes (CUDA context, other processes), from NVML."""
    counted_in_use: bool = False
    """Whether in_use_before counts against the budget (emulated: yes; card: already subtracted)."""
    fraction: float | None = None
    """torch.cuda.set_per_process_memory_fraction applied while tuning (emulated only)."""
    source: str = ""
    """nvml or cudaMemGetInfo."""
    gpu: str = ""

    def usage(self, peak_reserved: int | None) -> int | None:
        if peak_reserved is None:
            return None
        return peak_reserved + ((self.in_use_before_bytes or 0) if self.counted_in_use else 0)

    def describe(self) -> str:
        if self.mode == "cpu":
            return "CPU run: the VRAM budget does not apply; memory is the process's peak RSS"
        used = (self.in_use_before_bytes or 0) / GIB
        if self.mode == "emulated":
            return (f"{self.requested_gib:g} GiB emulated on {self.gpu} ({self.card_total_bytes / GIB:.1f} GiB): "
                    f"per-process memory fraction {self.fraction:.3f}; {used:.2f} GiB already in use (CUDA context, "
                    f"other processes, via {self.source}) counted in the budget")
        return (f"{self.gpu} ({self.card_total_bytes / GIB:.1f} GiB) is not larger than the {self.requested_gib:g} GiB "
                f"budget: the budget is its free memory, {self.budget_bytes / GIB:.2f} GiB ({used:.2f} GiB in use "
                f"before tuning, via {self.source})")


def _device_memory(device) -> tuple[int, int, str]:
    """(total, used) bytes of the whole device, and where they came from (NVML, else cudaMemGetInfo)."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            props = torch.cuda.get_device_properties(device)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.total), int(info.used), "nvml"
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - NVML missing, MIG, no NVML in a container: CUDA knows the totals
        log.debug("NVML unavailable (%s); using cudaMemGetInfo", e)
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(total - free), "cudaMemGetInfo"


def setup_budget(device, requested_gib: float) -> Budget:
    """Measure what is in use, then cap this process (emulated) or take the card's free memory (card)."""
    import torch

    if device.type != "cuda":
        return Budget("cpu", requested_gib)
    # Create the CUDA context and load cuBLAS / cuDNN first (lazily loaded, hundreds of MiB): they count as in use.
    a = torch.ones(64, 64, device=device)
    torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8, device=device), torch.ones(4, 3, 3, 3, device=device))
    (a @ a).sum().item()
    del a
    gc.collect()
    torch.cuda.empty_cache()
    _nvml_total, used, source = _device_memory(device)
    # set_per_process_memory_fraction multiplies the CUDA runtime's total, which can differ from NVML's.
    total = int(torch.cuda.mem_get_info(device)[1])
    in_use = max(0, used - torch.cuda.memory_reserved(device))  # our own cache is ours to spend
    gpu = torch.cuda.get_device_name(device)
    want = int(requested_gib * GIB)
    if want < total:
        if want <= in_use:
            raise ValueError(f"--memory-budget / tune.memory_budget_gib: {requested_gib:g} GiB is less than what is "
                             f"already in use on {gpu} ({in_use / GIB:.2f} GiB: CUDA context, other processes)")
        fraction = (want - in_use) / total
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return Budget("emulated", requested_gib, want, total, in_use, True, fraction, source, gpu)
    return Budget("card", requested_gib, total - in_use, total, in_use, False, None, source, gpu)


def release_budget(budget: Budget, device) -> None:
    if budget.mode == "emulated":
        import torch

        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _free_device_memory(device) -> None:
    """After dropping references: collect cycles, then hand cached blocks back (CUDA)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _alloc_retries(device) -> int:
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


# =================================================================================================== probe ===
class StepProbe:
    """Runs the real step at one batch size on synthetic batches of the largest input shape.

    The task (and so its runtime: precision, channels_last, compile) decides what runs. The state (modules,
    optimizer, scaler) is built once and kept across candidates, as training keeps it; after an out-of-memory
    error it is dropped and rebuilt, so no half-created gradients or optimizer state leak into the next size.
    """

    def __init__(self, task, *, budget: Budget, warmup: int, measure_steps: int, eval_batch: Callable[[int], int],
                 state=None):
        self.task = task
        self.budget = budget
        self.warmup = warmup
        self.repeats = 3 if measure_steps >= 3 else 1
        self.steps = max(1, measure_steps // self.repeats)
        self.eval_batch = eval_batch
        self.state = state

    @property
    def device(self):
        return self.task.runtime.device

    def _ensure_state(self):
        if self.state is None:
            self.state = self.task.build_state()
        self.state.train(True)
        return self.state

    def _run(self, b: int, eb: int) -> tuple[Any, int, dict[str, int | None]]:
        """Warm-up (train steps, one eval step, one train step), then the timed train steps, then the eval step
        and a train step again. Returns (timing, allocator retries after the warm-up, peak memory).

        Retries are counted after the warm-up only: cuDNN's benchmark mode tries workspaces that may not fit
        the cap on a new shape's first call, and the allocator counts the flush-and-retry before cuDNN skips
        that algorithm; training sees that once too, and it is not a sign that the steady state is at the limit.
        Peak memory spans the warm-up as well (the workspace cuDNN settles on stays reserved in training too).
        """
        import torch

        from fasttrain.bench import peak_memory, time_steps

        task, device = self.task, self.device
        state = self._ensure_state()
        spec = task.input_spec()
        batch = task.synthetic_batch(b, spec, train=True)
        ebatch = task.synthetic_batch(eb, spec, train=False)

        def step() -> int:
            task.train_step(state, batch, update=True)
            return b

        def evaluate_once() -> None:
            state.train(False)
            with torch.no_grad():
                task.eval_step(state, ebatch)
            state.train(True)

        for _ in range(max(1, self.warmup)):
            step()
        evaluate_once()
        step()  # training resumes with eval-shaped blocks in the cache
        task.runtime.synchronize()
        warm_peak = peak_memory(device)  # time_steps resets the peak: keep the warm-up's
        retries0 = _alloc_retries(device)
        timing = time_steps(step, warmup=0, steps=self.steps, repeats=self.repeats, device=device)
        evaluate_once()
        step()
        task.runtime.synchronize()
        mem = peak_memory(device)
        for k in ("peak_allocated_bytes", "peak_reserved_bytes"):
            if mem[k] is not None:
                mem[k] = max(mem[k], warm_peak[k])
        return timing, _alloc_retries(device) - retries0, mem

    def __call__(self, b: int, phase: str = "") -> Candidate:
        from fasttrain.bench import reset_peak_memory

        device = self.device
        eb = self.eval_batch(b)
        _free_device_memory(device)  # each size starts from an empty cache: retries are its own
        reset_peak_memory(device)
        t0 = time.perf_counter()
        oom = ""
        result = None
        try:
            result = self._run(b, eb)
        except Exception as e:
            if not is_oom_error(e):
                raise
            oom = _oom_summary(e)
        # Outside the except block: the exception and its frames (holding the step's tensors) are gone now.
        if oom:
            self.state = None
            _free_device_memory(device)
            log.info("batch %d: %s", b, oom)
            return Candidate(b, False, eval_batch_size=eb, phase=phase, error=oom, seconds=time.perf_counter() - t0)
        timing, retries, mem = result
        c = Candidate(
            batch_size=b,
            fits=retries == 0,
            samples_per_s=timing.samples_per_s,
            usage_bytes=self.budget.usage(mem["peak_reserved_bytes"]),
            peak_allocated_bytes=mem["peak_allocated_bytes"],
            peak_reserved_bytes=mem["peak_reserved_bytes"],
            peak_rss_bytes=mem["peak_rss_bytes"],
            alloc_retries=retries,
            eval_batch_size=eb,
            phase=phase,
            error="" if retries == 0 else f"needed {retries} allocator retries in the steady state (at the limit)",
            seconds=time.perf_counter() - t0,
            spread=timing.spread,
        )
        c.untimed_s = max(0.0, c.seconds - sum(timing.per_repeat_seconds))
        log.info("batch %d: %s samples/s, %s%s", b, f"{c.samples_per_s:,.1f}", _mem_text(c),
                 f", {c.error}" if c.error else "")
        return c

    def close(self) -> None:
        self.state = None
        _free_device_memory(self.device)


def _mem_text(c: Candidate) -> str:
    if c.peak_reserved_bytes is not None:
        return f"peak {c.peak_allocated_bytes / GIB:.2f} GiB allocated, {c.peak_reserved_bytes / GIB:.2f} reserved"
    if c.peak_rss_bytes is not None:
        return f"peak RSS {c.peak_rss_bytes / GIB:.2f} GiB"
    return "memory unknown"


# ================================================================================================== loader ===
@dataclass
class LoaderTrial:
    setting: dict[str, Any]
    """The data.* values tried."""
    samples_per_s: float
    keeps_up: bool
    seconds: float = 0.0


def loader_ladder(backend: str, data_cfg) -> list[dict[str, Any]]:
    """Settings to try, cheapest first (at most 4).

    torch: workers at a quarter, half and all of the machine's share. dali: threads likewise, at the configured
    hw_decoder_load; when that is below 0.9 a last try raises it to 0.9. The hardware JPEG decoder is a separate
    engine: a lower load only moves decoding onto CPU threads and the SMs the train step uses, which a
    loader-alone trial cannot see, so the ladder never lowers it. cache: no knobs (the data already lives on
    the device).
    """
    w = default_workers()
    counts = sorted({max(1, w // 4), max(1, w // 2), w})
    if backend == "torch":
        return [{"workers": n} for n in counts]
    if backend == "dali":
        load = data_cfg.hw_decoder_load
        ladder = [{"dali_threads": n, "hw_decoder_load": load} for n in counts]
        if load < 0.9:
            ladder.append({"dali_threads": w, "hw_decoder_load": 0.9})
        return ladder
    return [{}]


def tune_loader(cfg: Config, runtime, source, backend: str, micro: int, step_sps: float, *,
                warmup_steps: int, measure_steps: int) -> dict[str, Any]:
    """Measure the loader alone (real data, the chosen micro-batch) for the cheapest settings first; keep the
    first that delivers LOADER_MARGIN x the step's samples/s, else the fastest (the run is input-bound)."""
    from fasttrain.bench import loader_throughput
    from fasttrain.tasks import make_task

    trials: list[LoaderTrial] = []
    chosen: LoaderTrial | None = None
    need = step_sps * LOADER_MARGIN
    ladder = loader_ladder(backend, cfg.data)
    for setting in ladder:
        data = dataclasses.replace(cfg.data, **setting)
        task = make_task(dataclasses.replace(cfg, data=data), runtime, source)
        depth = data.prefetch * (data.num_workers if backend == "torch" else 1)
        t0 = time.perf_counter()
        loader = task.make_loader(source.train, train=True, batch_size=micro, backend=backend)
        try:
            # Warm-up drains the queue filled while workers started, so the clock sees the steady state.
            t = loader_throughput(loader, warmup_batches=max(2, warmup_steps, depth),
                                  max_batches=max(measure_steps, 8), device=runtime.device)
        finally:
            loader.close()
        trial = LoaderTrial(setting, t.samples_per_s, t.samples_per_s >= need, time.perf_counter() - t0)
        trials.append(trial)
        log.info("loader %s %s: %s samples/s (%s the step's %s x %.2f)", backend, setting or "(no knobs)",
                 f"{t.samples_per_s:,.1f}", "keeps up with" if trial.keeps_up else "below",
                 f"{step_sps:,.1f}", LOADER_MARGIN)
        if trial.keeps_up:
            chosen = trial
            break
    input_bound = chosen is None
    if chosen is None:
        chosen = max(trials, key=lambda t: t.samples_per_s)
    share = chosen.samples_per_s / step_sps if step_sps else float("inf")
    if input_bound:
        note = (f"input-bound: the fastest setting delivers {chosen.samples_per_s:,.1f} samples/s, {share:.0%} of the "
                f"step's {step_sps:,.1f}; expect about {chosen.samples_per_s:,.0f} samples/s end to end")
    else:
        note = (f"keeps up: {chosen.setting or 'no knobs'} delivers {chosen.samples_per_s:,.1f} samples/s "
                f"({share:.2f} x the step's {step_sps:,.1f})")
    # The setting pins the backend that was measured: `auto` at train time could pick another one.
    setting = {"loader": backend, **chosen.setting}
    return {"backend": backend, "trials": [dataclasses.asdict(t) for t in trials], "setting": setting,
            "samples_per_s": chosen.samples_per_s, "step_samples_per_s": step_sps, "input_bound": input_bound,
            "loader_to_step": share, "note": note}


# ================================================================================================== report ===
@dataclass
class AutotuneReport:
    config_name: str
    model: str
    task: str
    device: str
    runtime: str
    """Runtime.describe() of the configured run (precision, channels_last, compile)."""
    input_shape: list[int]
    """C, H, W of the largest input."""
    budget: dict[str, Any]
    budget_text: str
    headroom: float
    noise: float
    multiple: int
    candidates: list[Candidate]
    chosen_batch: int | None
    best_batch: int | None
    stop_reason: str
    probe_mode: str
    """How compile was handled (eager search + one compiled check, or eager throughout)."""
    compiled: Candidate | None = None
    """The compiled check at the chosen size (None when compile is off)."""
    plan: dict[str, Any] | None = None
    """BatchPlan as a dict: micro_batch, accumulation, global_batch, requested_global, note."""
    loader: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    tuned_values: dict[str, Any] = field(default_factory=dict)
    """section.key -> value written into the tuned config."""
    files: dict[str, str] = field(default_factory=dict)
    """config, json, plot -> path."""
    cached: bool = False
    cache_path: str = ""
    elapsed_s: float = 0.0
    """Wall time of this call."""
    compile_s: float = 0.0
    """Of which the compiled check's warm-up (compilation) took about this long."""
    error: str = ""
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        verified = self.verify is None or self.verify.get("ok", False)
        return not self.error and self.chosen_batch is not None and verified

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutotuneReport:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["candidates"] = [Candidate.from_dict(c) for c in d.get("candidates", [])]
        kw["compiled"] = Candidate.from_dict(d["compiled"]) if d.get("compiled") else None
        return cls(**kw)

    def to_table(self) -> str:
        cuda = any(c.peak_reserved_bytes is not None for c in self.candidates)
        c_, h, w = self.input_shape
        lines = [f"fasttrain autotune {self.config_name}: {self.model} ({self.task}) {c_}x{h}x{w}, {self.runtime}"
                 + (" [cached]" if self.cached else ""),
                 f"budget: {self.budget_text}"]
        if cuda:
            head = f"{'batch':>7}{'samples/s':>13}{'alloc GiB':>11}{'reserved':>10}{'retries':>9}  {'fits':<6}phase"
        else:
            head = f"{'batch':>7}{'samples/s':>13}{'RSS GiB':>11}  {'fits':<6}phase"
        lines += [head, "-" * max(len(head), 56)]
        rows = sorted(self.candidates, key=lambda c: c.batch_size)
        if self.compiled is not None:
            rows.append(self.compiled)
        for c in rows:
            sps = "-" if c.samples_per_s is None else f"{c.samples_per_s:,.1f}"
            if c.fits and c.usable:
                fits = "yes"
            elif c.fits:
                fits = "tight" if c.phase != "compiled" else "yes"
            else:
                fits = "OOM" if c.error.startswith("out of memory") else "no"
            mark = " *" if c.batch_size == self.chosen_batch and c.phase != "compiled" else ""
            if cuda:
                alloc = "-" if c.peak_allocated_bytes is None else f"{c.peak_allocated_bytes / GIB:.2f}"
                res = "-" if c.peak_reserved_bytes is None else f"{c.peak_reserved_bytes / GIB:.2f}"
                lines.append(f"{c.batch_size:>7}{sps:>13}{alloc:>11}{res:>10}{c.alloc_retries:>9}  {fits:<6}"
                             f"{c.phase}{mark}")
            else:
                rss = "-" if c.peak_rss_bytes is None else f"{c.peak_rss_bytes / GIB:.2f}"
                lines.append(f"{c.batch_size:>7}{sps:>13}{rss:>11}  {fits:<6}{c.phase}{mark}")
        lines.append("")
        lines.append(f"search: {self.stop_reason}")
        lines.append(f"compile: {self.probe_mode}")
        if self.error:
            lines.append(f"error: {self.error}")
        if self.chosen_batch is not None:
            by = {c.batch_size: c for c in self.candidates}
            ch, best = by[self.chosen_batch], by.get(self.best_batch)
            text = f"chosen batch {self.chosen_batch}: {ch.samples_per_s:,.1f} samples/s"
            if best is not None and best.batch_size != ch.batch_size:
                text += (f" (best {best.samples_per_s:,.1f} at {best.batch_size}; {self.chosen_batch} is within "
                         f"{self.noise:.0%} and smaller)")
            lines.append(text)
        if self.plan:
            p = self.plan
            lines.append(f"train: batch_size {p['global_batch']} = {p['accumulation']} x {p['micro_batch']}: "
                         f"{p['note']}")
        if self.loader:
            lines.append(f"loader ({self.loader['backend']}): {self.loader['note']}")
        if self.verify:
            v = self.verify
            if v.get("ok"):
                lines.append(f"verify: {v['steps']} steps + evaluation at batch {v['micro_batch']} x "
                             f"{v['accumulation']}: {v['samples_per_s']:,.1f} samples/s end to end, "
                             f"{v.get('memory_text', '')}, no out-of-memory")
            else:
                lines.append(f"verify: FAILED: {v.get('error', '')}")
            if v.get("warning"):
                lines.append(f"verify warning: {v['warning']}")
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.files:
            lines.append("written: " + ", ".join(self.files[k] for k in ("config", "json", "plot") if k in self.files))
        timing = f"{self.elapsed_s:.1f} s"
        if self.compile_s:
            timing += f" (compiled check warm-up {self.compile_s:.1f} s)"
        lines.append(f"took {timing}" + (f"; from the cache {self.cache_path}" if self.cached else ""))
        return "\n".join(lines)


def plot_report(report: AutotuneReport | dict[str, Any], path: str | os.PathLike) -> Path:
    """samples/s and peak memory against batch size (PNG, matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = report if isinstance(report, AutotuneReport) else AutotuneReport.from_dict(report)
    cands = sorted(r.candidates, key=lambda c: c.batch_size)
    cuda = any(c.peak_reserved_bytes is not None for c in cands)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    fits = [c for c in cands if c.samples_per_s is not None]
    ax.plot([c.batch_size for c in fits], [c.samples_per_s for c in fits], "o-", color="tab:blue", label="samples/s")
    fails = [c for c in cands if c.samples_per_s is None]
    if fails:
        ax.plot([c.batch_size for c in fails], [0] * len(fails), "x", color="tab:red", markersize=9,
                label="does not fit")
    if r.compiled is not None and r.compiled.samples_per_s is not None:
        ax.plot([r.compiled.batch_size], [r.compiled.samples_per_s], "*", color="tab:green", markersize=13,
                label="compiled")
    if r.chosen_batch is not None:
        ax.axvline(r.chosen_batch, color="tab:green", linestyle="--", linewidth=1, label=f"chosen {r.chosen_batch}")
    ax.set_xscale("log", base=2)
    sizes = [c.batch_size for c in cands]
    if sizes and len(sizes) <= 16:
        ax.set_xticks(sizes, [str(b) for b in sizes], fontsize=7)
        ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("train-step samples/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    if cuda:
        mem = [(c.batch_size, c.peak_reserved_bytes / GIB) for c in cands if c.peak_reserved_bytes is not None]
        label = "peak reserved GiB"
    else:
        mem = [(c.batch_size, c.peak_rss_bytes / GIB) for c in cands if c.peak_rss_bytes is not None]
        label = "peak RSS GiB (process lifetime)"
    if mem:
        ax2.plot(*zip(*mem), "s--", color="tab:orange", label=label)
    budget = r.budget.get("budget_bytes")
    if cuda and budget:
        ax2.axhline(budget / GIB, color="tab:red", linewidth=1, label=f"budget {budget / GIB:.1f} GiB")
        ax2.axhline((1 - r.headroom) * budget / GIB, color="tab:red", linestyle=":", linewidth=1,
                    label=f"{r.headroom:.0%} headroom")
    ax2.set_ylabel(label, color="tab:orange")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right", fontsize=8)
    ax.set_title(f"{r.config_name}: {r.model} {'x'.join(map(str, r.input_shape))}, {r.runtime}", fontsize=9)
    fig.tight_layout()
    return write_new(Path(path), lambda p: fig.savefig(p, format="png"))


# =================================================================================================== files ===
def default_out_dir(cfg: Config) -> Path:
    """runs_dir/autotune-<config name>-<date>-<time>, created now; a suffix is added when it exists."""
    from fasttrain.rundir import new_run_dir, run_name

    return new_run_dir(cfg.train.runs_dir, run_name(cfg.name, prefix="autotune-"))


def tuned_config(cfg: Config, plan: BatchPlan, loader_setting: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """The input config with the chosen train.batch_size / accumulation and loader knobs (nothing else)."""
    train = dataclasses.replace(cfg.train, batch_size=plan.global_batch, accumulation=plan.accumulation)
    data = dataclasses.replace(cfg.data, **loader_setting)
    values = {"train.batch_size": plan.global_batch, "train.accumulation": plan.accumulation}
    values.update({f"data.{k}": v for k, v in loader_setting.items()})
    return dataclasses.replace(cfg, train=train, data=data), values


def _tuned_toml(cfg: Config, report: AutotuneReport) -> str:
    head = [f"# Written by `fasttrain autotune` on {datetime.now():%Y-%m-%d %H:%M} from config {cfg.name!r}.",
            f"# {report.runtime}; budget: {report.budget_text}"]
    for k, v in report.tuned_values.items():
        head.append(f"# tuned: {k} = {v}")
    if report.plan:
        head.append(f"# {report.plan['note']}")
    if report.loader:
        head.append(f"# loader: {report.loader['note']}")
    return "\n".join(head) + "\n" + dump_config(cfg)


def _write_outputs(cfg: Config, report: AutotuneReport, out_dir: Path | None, plan: BatchPlan | None,
                   loader_setting: dict[str, Any]) -> None:
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if plan is not None and report.ok:  # never hand out a config that is known not to fit
        new_cfg, report.tuned_values = tuned_config(cfg, plan, loader_setting)
        report.files["config"] = str(write_new_text(out / f"{cfg.name}.tuned.toml", _tuned_toml(new_cfg, report)))
    if report.candidates:
        try:
            report.files["plot"] = str(plot_report(report, out / "autotune.png"))
        except Exception as e:  # noqa: BLE001 - a plot must never cost the user the result
            report.notes.append(f"plot not written: {type(e).__name__}: {e}")
    # The JSON last, so it lists the other files.
    written = write_new_text(out / "autotune.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    report.files["json"] = str(written)


# ================================================================================================= driver ===
def _key_fields(cfg: Config, runtime, budget_gib: float) -> dict[str, Any]:
    """What decides the result: model, input shape and channels, precision, compile, channels_last, GPU, torch,
    budget, headroom, task; plus the search settings, the optimizer (its state is memory), the batch sizes
    asked for and the data/loader (the loader trial is cached too)."""
    import torch

    if runtime.is_cuda:
        gpu = torch.cuda.get_device_name(runtime.device)
    else:
        gpu = f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}"
    t = cfg.tune
    return {
        "version": CACHE_VERSION,
        "task": cfg.task.name,
        "model": dataclasses.asdict(cfg.model),
        "input": [cfg.data.channels, cfg.data.image_size, cfg.data.image_size],
        "precision": runtime.precision.name,
        "compile": [runtime.compile, cfg.runtime.compile_mode],
        "channels_last": runtime.channels_last,
        "gpu": gpu,
        "torch": torch.__version__,
        "cudnn": [env_cudnn(), cfg.runtime.cudnn_benchmark, cfg.runtime.deterministic],  # workspace memory, speed
        "budget_gib": budget_gib,
        "headroom": t.headroom,
        "search": [t.min_batch, t.max_batch, t.multiple, t.noise],
        # momentum 0 keeps no SGD state; grad clipping adds a norm pass
        "optim": [cfg.optim.name, cfg.optim.momentum > 0, cfg.optim.grad_clip > 0],
        "batch": [cfg.train.batch_size, cfg.train.eval_batch_size],
        "data": [cfg.data.root, cfg.data.loader, cfg.data.max_samples, cfg.data.format, default_workers(),
                 cfg.data.cache_budget],
        # the loader ladder starts from these
        "loader": [cfg.data.workers, cfg.data.dali_threads, cfg.data.hw_decoder_load, cfg.data.prefetch,
                   env_dali()],
    }


def env_cudnn() -> int | None:
    import torch

    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def env_dali() -> str | None:
    from fasttrain.runtime import dali_version

    return dali_version()


def _load_cached(path: Path, fields: dict[str, Any]) -> AutotuneReport | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") != json.loads(json.dumps(fields, default=str)):
            return None
        return AutotuneReport.from_dict(entry["report"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable autotune cache %s: %s", path, e)
        return None


def autotune(cfg: Config, *, memory_budget_gib: float | None = None, out_dir: str | os.PathLike | None = None,
             verify: bool = True, use_cache: bool = True) -> AutotuneReport:
    """Find the batch size with the best train-step samples/s that fits the budget, the cheapest loader
    settings that keep up, verify them, and write a tuned config (table, JSON, PNG) into ``out_dir``
    (default: ``train.runs_dir/autotune-<name>-<time>``). The input config file is never touched.

    ``memory_budget_gib`` defaults to ``tune.memory_budget_gib``. Results are cached under ``tune.cache_dir``
    (default ``~/.cache/fasttrain/autotune``, or ``$FASTTRAIN_CACHE/autotune``); ``use_cache=False`` ignores
    the cache (and refreshes it). ``verify`` runs ``tune.verify_steps`` steps plus one evaluation on the real
    data at the chosen settings, under the same budget.
    """
    from fasttrain.runtime import environment, runtime_for

    t_start = time.perf_counter()
    budget_gib = float(memory_budget_gib if memory_budget_gib is not None else cfg.tune.memory_budget_gib)
    if budget_gib <= 0:
        raise ValueError(f"--memory-budget: must be > 0 GiB, got {budget_gib:g}")
    runtime = runtime_for(cfg)
    fields = _key_fields(cfg, runtime, budget_gib)
    cache_path = cache_dir_for(cfg) / f"{cache_key(fields)}.json"
    if use_cache and cache_path.is_file():
        report = _load_cached(cache_path, fields)
        if report is not None:
            report.cached, report.cache_path, report.files, report.notes = True, str(cache_path), {}, list(report.notes)
            plan = BatchPlan(**report.plan) if report.plan else None
            setting = report.loader["setting"] if report.loader else {}
            report.elapsed_s = time.perf_counter() - t_start  # before the files, so the JSON holds it
            _write_outputs(cfg, report, out_dir, plan, setting)
            report.elapsed_s = time.perf_counter() - t_start
            log.info("autotune: answered from the cache %s", cache_path)
            return report

    with runtime.flags():
        report = _tune(cfg, budget_gib, verify=verify)
    report.environment = environment()
    plan = BatchPlan(**report.plan) if report.plan else None
    setting = report.loader["setting"] if report.loader else {}
    report.elapsed_s = time.perf_counter() - t_start
    _write_outputs(cfg, report, out_dir, plan, setting)
    report.elapsed_s = time.perf_counter() - t_start
    if report.ok:
        try:
            atomic_write_text(cache_path, json.dumps({"key": fields, "report": report.to_dict()}, indent=1,
                                                     default=str))
            report.cache_path = str(cache_path)
        except OSError as e:
            report.notes.append(f"cache not written ({cache_path}: {e})")
    return report


def _tune(cfg: Config, budget_gib: float, *, verify: bool) -> AutotuneReport:
    from fasttrain.prepare import prepare
    from fasttrain.runtime import runtime_for, seed_everything
    from fasttrain.tasks import make_task

    # The GPU cache is chosen against the budget, not the whole (maybe larger) card.
    prep = prepare(cfg, memory_limit=int(budget_gib * GIB))
    pcfg, source, backend = prep.cfg, prep.source, prep.backend
    runtime = prep.runtime
    tune = pcfg.tune
    seed_everything(pcfg.runtime.seed)
    device = runtime.device
    budget = setup_budget(device, budget_gib)
    notes: list[str] = []
    n_train = len(source.train)
    max_batch = tune.max_batch
    if n_train < max_batch:
        max_batch = max(min(n_train, max_batch), tune.min_batch)
        notes.append(f"batch sizes capped at the training set's {n_train} images")
    eval_batch = (lambda b: pcfg.train.eval_batch_size) if pcfg.train.eval_batch_size else (lambda b: 2 * b)
    resident = None
    report = AutotuneReport(
        config_name=cfg.name, model=cfg.model.name, task=cfg.task.name, device=str(device),
        runtime=runtime.describe(), input_shape=[cfg.data.channels, cfg.data.image_size, cfg.data.image_size],
        budget=dataclasses.asdict(budget), budget_text=budget.describe(), headroom=tune.headroom,
        noise=tune.noise, multiple=tune.multiple, candidates=[], chosen_batch=None, best_batch=None,
        stop_reason="", probe_mode="", notes=notes)
    try:
        # Eager probes with everything else as configured; compile comes once, at the chosen size.
        eager_rt = runtime_for(pcfg, compile="off")
        eager_task = make_task(pcfg, eager_rt, source)
        probe = StepProbe(eager_task, budget=budget, warmup=tune.warmup_steps, measure_steps=tune.measure_steps,
                          eval_batch=eval_batch)
        log.info("autotune %s: %s; %s", cfg.name, runtime.describe(), budget.describe())
        resident = _hold_resident_dataset(pcfg, source, backend, device, budget, notes)
        result = search_batch_size(probe, min_batch=tune.min_batch, max_batch=max_batch, multiple=tune.multiple,
                                   noise=tune.noise, budget_bytes=budget.budget_bytes, headroom=tune.headroom)
        report.candidates, report.stop_reason = result.candidates, result.stop_reason
        report.chosen_batch, report.best_batch = result.chosen, result.best
        if result.chosen is None:
            report.error = (f"{result.stop_reason}; lower tune.min_batch / tune.multiple, the image size or the "
                            f"model, or raise --memory-budget")
            report.probe_mode = "eager probes; nothing fit, so nothing was compiled"
            return report

        chosen = result.chosen
        # The plan first: the micro-batch training will run (the requested global batch may be kept as one
        # batch or split) is the size to compile and verify, so the whole command compiles one shape.
        plan = plan_batches(pcfg.train.batch_size, chosen, multiple=tune.multiple, max_usable=result.max_usable)
        # The probe's state is handed over (or dropped): a failed verification must not leave it holding memory.
        state, probe.state = (None if runtime.compile else probe.state), None
        probe.close()
        if runtime.compile:
            report.probe_mode = ("eager search (a compile per candidate would cost a compile per size; a dynamic "
                                 "batch dimension is not the static program training runs); compiled once at the "
                                 "planned micro-batch, its state reused by the verification run")
            state, compiled_batch = _compiled_check(report, result, prep, budget, eval_batch,
                                                    first=plan.micro_batch)
            if compiled_batch is None:
                report.error = "the compiled step does not fit at any usable batch size tried"
                return report
            if compiled_batch != plan.micro_batch:
                report.notes.append(f"micro-batch lowered from {plan.micro_batch} to {compiled_batch}: the compiled "
                                    f"step did not fit at the larger size")
                chosen = min(chosen, compiled_batch)
                plan = plan_batches(pcfg.train.batch_size, compiled_batch, multiple=tune.multiple,
                                    max_usable=compiled_batch)
                if plan.micro_batch != compiled_batch:
                    report.notes.append(f"the plan's micro-batch {plan.micro_batch} was not compiled here: the "
                                        f"verification compiles it once more")
        else:
            report.probe_mode = "runtime.compile is off: the eager probes are the step training runs"
        report.chosen_batch = chosen
        resident = None  # the loader trials and the verification build the real cache
        _free_device_memory(device)
        by_size = result.by_size()
        step_c = report.compiled if report.compiled is not None else by_size.get(plan.micro_batch, by_size[chosen])
        report.plan = dataclasses.asdict(plan)
        report.loader = tune_loader(pcfg, runtime, source, backend, plan.micro_batch, step_c.samples_per_s,
                                    warmup_steps=tune.warmup_steps, measure_steps=tune.measure_steps)
        if not (verify and tune.verify_steps > 0):
            report.notes.append("verification skipped (--no-verify or tune.verify_steps = 0)")
            return report
        for attempt in range(2):
            tuned, _ = tuned_config(pcfg, plan, report.loader["setting"])
            report.verify, state = _verify(tuned, prep, state, plan, tune.verify_steps, budget)
            if report.verify["ok"]:
                report.error = ""
                break
            report.error = f"verification failed: {report.verify['error']}"
            smaller = [c for c in result.candidates if c.usable and c.batch_size < plan.micro_batch]
            if attempt == 1 or not smaller:
                break
            chosen, _best = choose_batch(smaller, tune.noise)
            report.notes.append(f"verification at micro-batch {plan.micro_batch} ran out of memory "
                                f"({report.verify['error']}); trying {chosen}")
            report.chosen_batch = chosen
            plan = plan_batches(pcfg.train.batch_size, chosen, multiple=tune.multiple, max_usable=chosen)
            report.plan = dataclasses.asdict(plan)
        return report
    finally:
        state = probe = resident = None  # noqa: F841 - drop the last references before handing memory back
        _free_device_memory(device)
        release_budget(budget, device)


def _hold_resident_dataset(cfg: Config, source, backend: str, device, budget: Budget, notes: list[str]):
    """With the GPU cache backend the decoded dataset lives on the device for the whole run: hold a placeholder
    of its size during the probes so it counts against the budget as it will in training."""
    if backend != "cache" or device.type != "cuda":
        return None
    import torch

    from fasttrain.data.gpu_cache import cache_bytes

    n = len(source.train) + len(source.val or [])
    nbytes = cache_bytes(n, cfg.data)
    if budget.budget_bytes and nbytes > 0.5 * budget.budget_bytes:
        notes.append(f"the GPU cache of the dataset takes {nbytes / GIB:.2f} GiB, over half the budget: "
                     f"data.loader = dali or torch may allow larger batches")
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _compiled_check(report: AutotuneReport, result: SearchResult, prep, budget: Budget,
                    eval_batch: Callable[[int], int], *, first: int):
    """Compile once and run the micro-batch ``first`` as training will; if it does not fit, the next usable
    probed sizes below it, at most twice more. Returns (state, batch) or (None, None)."""
    tune = prep.cfg.tune
    probe = StepProbe(prep.task, budget=budget, warmup=max(tune.warmup_steps, 3), measure_steps=tune.measure_steps,
                      eval_batch=eval_batch)
    smaller = sorted({c.batch_size for c in result.candidates if c.usable and c.batch_size < first}, reverse=True)
    for size in [first, *smaller][:3]:
        got = mark_usable(probe(size, "compiled"), budget.budget_bytes, tune.headroom)
        report.compile_s += got.untimed_s  # warm-up (the compile) and the eval step (its compile)
        report.compiled = got
        log.info("compiled check at %d: %s (%.1f s, of which %.1f s warm-up and compile)", size,
                 "ok" if got.usable else got.error, got.seconds, got.untimed_s)
        if got.usable:
            return probe.state, size
        report.notes.append(f"compiled step at batch {size}: {got.error}; trying a smaller size")
        probe.state = None
        _free_device_memory(prep.runtime.device)
    return None, None


def _verify(tuned: Config, prep, state, plan: BatchPlan, steps: int, budget: Budget):
    """tune.verify_steps optimizer steps on the real data at the tuned settings, then one full evaluation of the
    validation split, under the same budget; the state of the compiled check is reused (no second compile)."""
    from fasttrain.bench import end_to_end_throughput, peak_memory, reset_peak_memory
    from fasttrain.engine import evaluate
    from fasttrain.tasks import make_task

    runtime, source = prep.runtime, prep.source
    device = runtime.device
    task = make_task(tuned, runtime, source)
    out: dict[str, Any] = {"ok": False, "steps": steps, "micro_batch": plan.micro_batch,
                           "accumulation": plan.accumulation, "backend": prep.backend}
    loader = val_loader = None
    _free_device_memory(device)
    retries0 = _alloc_retries(device)
    reset_peak_memory(device)
    err = ""
    t0 = time.perf_counter()
    try:
        if state is None:
            state = task.build_state()
        loader = task.make_loader(source.train, train=True, batch_size=plan.micro_batch, backend=prep.backend)
        accum = plan.accumulation
        timing = end_to_end_throughput(task, state, loader, warmup=max(1, tuned.tune.warmup_steps) * accum,
                                       steps=steps * accum, repeats=1, accumulation=accum)
        out["samples_per_s"] = timing.samples_per_s
        if source.val:
            val_loader = task.make_loader(source.val, train=False, batch_size=tuned.train.eval_batch,
                                          backend=prep.backend)
            t_eval = time.perf_counter()
            evaluate(task, state, val_loader)
            out["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
            out["eval_batch_size"] = tuned.train.eval_batch
        else:
            out["eval_seconds"] = None
            out["note"] = "no validation split: evaluation skipped"
        runtime.synchronize()
        if device.type == "cuda":
            # DALI (and cuDNN/cuBLAS workspaces) allocate outside PyTorch's allocator, which the memory fraction
            # does not cap: read the whole device while the loaders are still alive.
            _, used, _src = _device_memory(device)
            out["device_used_bytes"] = used
    except Exception as e:
        if not is_oom_error(e):
            raise
        err = _oom_summary(e)
    finally:
        for ld in (loader, val_loader):
            if ld is not None:
                ld.close()
    if err:
        state = None
        _free_device_memory(device)
        out["error"] = err
        return out, None
    mem = peak_memory(device)
    retries = _alloc_retries(device) - retries0
    out.update(mem)
    out["alloc_retries"] = retries
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if mem["peak_reserved_bytes"] is not None:
        out["memory_text"] = (f"peak {mem['peak_allocated_bytes'] / GIB:.2f} GiB allocated, "
                              f"{mem['peak_reserved_bytes'] / GIB:.2f} GiB reserved, {retries} allocator retries")
    else:
        out["memory_text"] = f"peak RSS {mem['peak_rss_bytes'] / GIB:.2f} GiB"
    out["ok"] = True
    warnings = []
    if retries:
        warnings.append(f"{retries} allocator retries during verification: close to the limit")
    used = out.get("device_used_bytes")
    if budget.mode == "emulated" and used is not None and used > budget.budget_bytes:
        # Memory outside torch's allocator (DALI's decoder buffers) is not capped by the memory fraction: on a
        # real card of the budget's size this run would fail, so it does not count as fitting.
        out["ok"] = False
        out["error"] = (f"the device held {used / GIB:.2f} GiB during verification (PyTorch plus memory outside "
                        f"its allocator, e.g. DALI), more than the {budget.budget_bytes / GIB:.2f} GiB budget; "
                        f"fewer data.dali_threads or data.loader = torch need less")
    if warnings:
        out["warning"] = "; ".join(warnings)
    log.info("verify: %s samples/s end to end, %s", f"{out['samples_per_s']:,.1f}", out["memory_text"])
    return out, state


def run_cli(cfg: Config, args) -> int:
    """``fasttrain autotune``: run, print the table; 0 when a verified choice was written, 1 otherwise."""
    report = autotune(cfg, memory_budget_gib=getattr(args, "memory_budget", None), out_dir=getattr(args, "out", None),
                      verify=not getattr(args, "no_verify", False), use_cache=not getattr(args, "no_cache", False))
    print(report.to_table())
    return 0 if report.ok else 1


_callable_module(__name__, "autotune")  # fasttrain.autotune(...) is autotune(...): see fasttrain/__init__.py
