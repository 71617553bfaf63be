"""What autotune measures: the memory budget, the step probe, the compiled check and the verification run.

- **Budget** (:func:`setup_budget`): on a card larger than the budget, torch's allocator is capped at the
  budget minus what this process already holds (CUDA context, libraries; NVML); on a smaller card the budget is
  its free memory; on a CPU there is none. The process's own cap from before is read first and put back by
  :func:`release_budget`. Memory outside torch's allocator that the loader needs (DALI's decode buffers and
  prefetched batches, measured with NVML while it runs) is charged to the budget by :func:`charge_outside`.
- **Step probe** (:class:`StepProbe`): the real ``task.train_step`` (forward, backward, optimizer step, so the
  optimizer state exists) on a synthetic batch of the largest input shape, with the configured model,
  precision and channels_last. Where a budget applies, one ``eval_step`` at the eval batch size and one more
  train step run in the warm-up and again after the timing (training resumes after evaluation with the
  allocator holding eval-shaped blocks). Peaks are *steady-state* peaks: after the warm-up torch's cached
  blocks are returned and the peak statistics reset, so cuDNN's benchmark search (whose workspace is sized
  from the whole card's free memory, whatever the cap) is reported as ``warmup_reserved_bytes`` and not
  charged. Timing comes from :func:`fasttrain.timing.time_window` (``tune.repeats`` repeats of about
  ``tune.repeat_s`` each); a spread above ``tune.max_spread`` is measured once more and, if still above, the
  candidate is marked unreliable. Only real out-of-memory errors count as not fitting; every other error
  propagates, and recovery happens outside the ``except`` block (the traceback holds the step's tensors).
- **Compiled check** (:func:`compiled_check`): the compiled step at the planned micro-batch; if it does not
  fit, the next usable sizes below, with dynamo reset in between (its recompile limit would otherwise drop
  the next size to eager silently, and the reset releases a failed size's CUDA-graph pool).
- **Verification** (:func:`verify`): the tuned settings end to end on the real data for about ``tune.verify_s``
  seconds, then evaluation batches for a bounded time, under the budget; its samples/s is compared with the
  probe's (:func:`fasttrain.tuning.search.judge_verification`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fasttrain import memory
from fasttrain.data.progressive import train_sizes
from fasttrain.memory import GIB, format_bytes, is_oom_error, oom_summary
from fasttrain.timing import cycle_batches, synchronize, time_steps, time_window, train_step_fn
from fasttrain.tuning.search import (
    MIN_WINDOW_STEPS,
    Agreement,
    BatchPlan,
    Candidate,
    counted_windows,
    judge_verification,
    mark_usable,
    measurement_reliable,
)

log = logging.getLogger("fasttrain.tuning")

__all__ = [
    "Budget",
    "setup_budget",
    "release_budget",
    "charge_outside",
    "ProbeSettings",
    "StepProbe",
    "SizeRate",
    "compiled_check",
    "reset_compiler",
    "Verification",
    "verify",
]


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
    """Device memory in use before the probes, torch's cache left out: emulated, this process's (its CUDA context
    and libraries; the whole device's where NVML cannot see processes); card, every process's."""
    counted_in_use: bool = False
    """Whether in_use_before counts against the budget (emulated: yes; card: already subtracted)."""
    fraction: float | None = None
    """torch's per-process memory fraction applied while tuning (emulated only)."""
    previous_fraction: float | None = None
    """The process's own fraction before autotune (1.0 when never set), restored afterwards."""
    outside_torch_bytes: int = 0
    """Memory outside torch's allocator charged to the budget (DALI's, measured with NVML while it ran)."""
    source: str = ""
    """Where in_use_before was read: nvml process (this process's own), nvml or cudaMemGetInfo (the device's)."""
    gpu: str = ""
    short: str = ""
    """Why the emulated budget is more than this GPU can give now (other processes hold the rest): the answer
    then fits what was free, and is not cached. Empty when it is not."""

    def usage(self, peak_reserved: int | None) -> int | None:
        if peak_reserved is None:
            return None
        return peak_reserved + ((self.in_use_before_bytes or 0) if self.counted_in_use else 0)

    def describe(self) -> str:
        if self.mode == "cpu":
            return "CPU run: the VRAM budget does not apply; memory is the process's peak RSS"
        used = format_bytes(self.in_use_before_bytes or 0, "GiB")
        card = format_bytes(self.card_total_bytes, "GiB")
        outside = (
            f"; {format_bytes(self.outside_torch_bytes, 'GiB')} outside torch (the loader) charged to it"
            if self.outside_torch_bytes
            else ""
        )
        if self.mode == "emulated":
            return (
                f"{self.requested_gib:g} GiB emulated on {self.gpu} ({card}): "
                f"per-process memory fraction {self.fraction:.3f}; {used} already in use ("
                f"{'this process: CUDA context, libraries' if self.source == 'nvml process' else 'the device'}, "
                f"via {self.source}) counted in the budget{outside}"
            )
        return (
            f"{self.gpu} ({card}) is not larger than the {self.requested_gib:g} GiB "
            f"budget: the budget is its free memory, {format_bytes(self.budget_bytes, 'GiB')} ({used} in use "
            f"before tuning, via {self.source}){outside}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def setup_budget(device: torch.device, requested_gib: float) -> Budget:
    """Read the process's own cap, measure what is in use, then cap this process (emulated) or take the card's
    free memory (card)."""
    if device.type != "cuda":
        return Budget("cpu", requested_gib)
    previous = memory.get_memory_fraction(device)
    memory.load_cuda_libraries(device)  # the context, cuBLAS and cuDNN count as in use
    # The caching allocator's cap is this fraction of the device's totalGlobalMem (NVML's total may differ).
    total = int(torch.cuda.get_device_properties(device).total_memory)
    reserved = int(torch.cuda.memory_reserved(device))  # our own cache is ours to spend
    gpu = torch.cuda.get_device_name(device)
    want = int(requested_gib * GIB)
    if want < total:
        # A smaller card emulated: this process's CUDA context and libraries would be on it, other processes'
        # memory would not (it is on this card only; counted, a neighbour holding 16 GiB refused every budget).
        # Where NVML cannot see processes, the whole device's use is all there is to count.
        held, source = memory.held_device_bytes(device)
        in_use = max(0, held - reserved)
        if want <= in_use:
            raise ValueError(
                f"--memory-budget / tune.memory_budget_gib: {requested_gib:g} GiB is less than what is "
                f"already in use on {gpu} ({format_bytes(in_use, 'GiB')}: CUDA context"
                f"{'' if source == 'nvml process' else ', other processes'})"
            )
        fraction = min(previous, (want - in_use) / total)
        memory.set_memory_fraction(device, fraction)
        free = int(torch.cuda.mem_get_info(device)[0]) + reserved  # what torch could get now, its cache included
        short = (
            f"only {format_bytes(free, 'GiB')} of the {requested_gib:g} GiB budget were free on {gpu} (other "
            f"processes held the rest): the answer fits what was free"
            if want - in_use > free
            else ""
        )
        if short:
            log.warning("autotune: %s", short)
        return Budget("emulated", requested_gib, want, total, in_use, True, fraction, previous, 0, source, gpu, short)
    dm = memory.device_memory(device)  # the card itself: every process's memory is taken from it
    in_use = max(0, dm.used_bytes - reserved)
    return Budget("card", requested_gib, total - in_use, total, in_use, False, None, previous, 0, dm.source, gpu)


def charge_outside(budget: Budget, device: torch.device, nbytes: int) -> None:
    """Charge ``nbytes`` outside torch's allocator (the loader's) to the budget: torch's cap shrinks by as much
    (emulated), and candidates' usage is compared with it added (every mode)."""
    budget.outside_torch_bytes = max(0, int(nbytes))
    if budget.mode == "emulated" and budget.card_total_bytes and budget.budget_bytes is not None:
        room = budget.budget_bytes - (budget.in_use_before_bytes or 0) - budget.outside_torch_bytes
        budget.fraction = max(0.0, min(budget.previous_fraction or 1.0, room / budget.card_total_bytes))
        memory.set_memory_fraction(device, budget.fraction)


def release_budget(budget: Budget, device: torch.device) -> None:
    """Put back the fraction the process had before autotune (not 1.0: the user's own cap stays)."""
    if budget.mode == "emulated":
        memory.set_memory_fraction(device, budget.previous_fraction if budget.previous_fraction is not None else 1.0)


# =================================================================================================== probe ===
@dataclass
class ProbeSettings:
    warmup: int
    """Train steps before the clock (each new batch shape: allocation, cuDNN's algorithm search)."""
    repeats: int
    repeat_s: float
    """Each timed repeat lasts about this long (at least ``min_steps`` steps)."""
    min_steps: int
    max_spread: float
    """A spread above this is measured once more, then the candidate is marked unreliable."""
    with_eval: bool
    """Run an eval step at the eval batch size (memory, where a budget applies)."""


def _default_stamp() -> str:
    return ""


@dataclass
class SizeRate:
    """Progressive resizing: the training step's samples/s at one of the run's training sizes."""

    size: int
    """Side of the training crop, in pixels."""
    samples_per_s: float
    batch_size: int


class StepProbe:
    """Runs the real step at one batch size on synthetic batches of the largest input shape.

    The task (and so its runtime: precision, channels_last, compile) decides what runs. The state (modules,
    optimizer, scaler) is built once and kept across candidates, as training keeps it; after an out-of-memory
    error it is dropped and rebuilt, so no half-created gradients or optimizer state leak into the next size.
    ``stamp()`` prefixes progress lines (the time budget's ``12.3/45 s``); ``time_left()`` (seconds) decides
    whether a noisy measurement may be taken once more.
    """

    def __init__(
        self,
        task,
        *,
        budget: Budget,
        settings: ProbeSettings,
        eval_batch: Callable[[int], int],
        state=None,
        stamp: Callable[[], str] = _default_stamp,
        time_left: Callable[[], float] | None = None,
    ):
        self.task = task
        self.budget = budget
        self.s = settings
        self.eval_batch = eval_batch
        self.state = state
        self.stamp = stamp
        self.time_left = time_left
        self._setup_s = 0.0
        """Seconds spent building the state since the current probe began."""

    @property
    def device(self) -> torch.device:
        return self.task.runtime.device

    def _ensure_state(self):
        if self.state is None:
            t0 = time.perf_counter()
            self.state = self.task.build_state()
            self._setup_s += time.perf_counter() - t0
        self.state.train(True)
        return self.state

    def _step_fn(self, state, batch, b: int) -> Callable[[], int]:
        task = self.task

        def step() -> int:
            task.train_step(state, batch, update=True)
            return b

        return step

    def _evaluate_once(self, state, ebatch) -> None:
        state.train(False)
        with torch.no_grad():
            self.task.eval_step(state, ebatch)
        state.train(True)

    def _measure(self, step: Callable[[], int], warmup: int, batch: int) -> tuple[list[float], float, bool, int]:
        """(rates, timed seconds, reliable, steps per repeat): a time window, once more when too noisy and time
        allows. A repeat is cut at 4 x tune.repeat_s (wall clock) if the machine slows down under it; a repeat
        cut to a single step does not count (:func:`~fasttrain.tuning.search.counted_windows`)."""
        s = self.s
        t = time_window(
            step,
            warmup=warmup,
            repeats=s.repeats,
            seconds=s.repeat_s,
            min_steps=max(s.min_steps, MIN_WINDOW_STEPS),
            device=self.device,
            reset_peak=False,
            max_repeat_s=4 * s.repeat_s,
        )
        rates, _ = counted_windows(t.per_repeat_samples_per_s, t.per_repeat_seconds, batch)
        rates = rates or list(t.per_repeat_samples_per_s)  # none counts: kept for a figure, never reliable
        timed = t.timed_seconds
        if measurement_reliable(rates, s.max_spread):
            return rates, timed, True, t.steps
        if self.time_left is not None and self.time_left() < 2 * timed:
            return rates, timed, False, t.steps
        again = time_steps(
            step,
            warmup=0,
            steps=t.steps,
            repeats=s.repeats,
            device=self.device,
            reset_peak=False,
            max_repeat_s=4 * s.repeat_s,
        )
        timed += again.timed_seconds
        second, _ = counted_windows(again.per_repeat_samples_per_s, again.per_repeat_seconds, batch)
        if measurement_reliable(second, s.max_spread):  # the first round caught a disturbance the second did not
            return second, timed, True, t.steps
        return rates + (second or list(again.per_repeat_samples_per_s)), timed, False, t.steps

    def _run(self, b: int, eb: int) -> tuple[list[float], float, bool, int, memory.MemoryPeak, memory.MemoryPeak, int]:
        """Warm-up (train steps; where a budget applies one eval step and one train step), then the timed train
        steps, then the eval step and a train step again. Returns (rates, timed seconds, reliable, steps per
        repeat, warm-up peak, steady-state peak, allocator retries after the warm-up)."""
        task, device = self.task, self.device
        state = self._ensure_state()
        spec = task.input_spec()
        batch = task.synthetic_batch(b, spec, train=True)
        ebatch = task.synthetic_batch(eb, spec, train=False) if self.s.with_eval else None
        step = self._step_fn(state, batch, b)
        warmup = max(1, self.s.warmup)
        if device.type == "cuda" or ebatch is not None:
            for _ in range(warmup):
                step()
            if ebatch is not None:
                self._evaluate_once(state, ebatch)
                step()  # training resumes with eval-shaped blocks in the cache
            synchronize(device)
            warmup = 1  # the step that allocates again after empty_cache below
        warm = memory.read_peak(device)
        # Steady state from here: the warm-up's cached blocks (cuDNN's benchmark workspaces among them) go back
        # to the driver and the peak starts over; what the steps need is allocated again, and counted.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        memory.reset_peak_memory(device)
        retries0 = memory.alloc_retries(device)
        rates, timed, reliable, steps = self._measure(step, warmup=warmup, batch=b)
        if ebatch is not None:
            self._evaluate_once(state, ebatch)
            step()
        synchronize(device)
        steady = memory.read_peak(device)
        return rates, timed, reliable, steps, warm, steady, memory.alloc_retries(device) - retries0

    def __call__(self, b: int, phase: str = "") -> Candidate:
        device = self.device
        eb = self.eval_batch(b)
        memory.free_device_memory(device)  # each size starts from an empty cache: retries are its own
        memory.reset_peak_memory(device)
        t0 = time.perf_counter()
        self._setup_s = 0.0
        oom = ""
        result = None
        try:
            result = self._run(b, eb)
        except Exception as e:
            if not is_oom_error(e):
                raise
            oom = oom_summary(e)
        # Outside the except block: the exception and its frames (holding the step's tensors) are gone now.
        if oom:
            self.state = None
            memory.free_device_memory(device)
            c = Candidate(
                b, False, eval_batch_size=eb, phase=phase, failure="oom", error=oom, seconds=time.perf_counter() - t0
            )
            log.info("autotune [%s] batch %d (%s): %s", self.stamp(), b, phase, oom)
            return c
        assert result is not None  # no out-of-memory error: _run returned
        rates, timed, reliable, steps, warm, steady, retries = result
        c = Candidate(
            batch_size=b,
            fits=retries == 0,
            reliable=reliable,
            usage_bytes=self.budget.usage(steady.peak_reserved_bytes),
            peak_allocated_bytes=steady.peak_allocated_bytes,
            peak_reserved_bytes=steady.peak_reserved_bytes,
            warmup_reserved_bytes=warm.peak_reserved_bytes,
            peak_rss_bytes=steady.peak_rss_bytes,
            alloc_retries=retries,
            eval_batch_size=eb,
            phase=phase,
            failure="" if retries == 0 else "retries",
            error="" if retries == 0 else f"needed {retries} allocator retries in the steady state (at the limit)",
            seconds=time.perf_counter() - t0,
            timed_s=timed,
            setup_s=self._setup_s,
        )
        c.set_rates(rates)
        c.untimed_s = max(0.0, c.seconds - timed - c.setup_s)
        log.info(
            "autotune [%s] batch %d (%s): %s samples/s ±%.0f%% (%dx%d steps)%s, %s%s; %.1f s: %s%.1f s warm-up and "
            "eval, %.1f s timed",
            self.stamp(),
            b,
            phase,
            f"{c.samples_per_s:,.1f}",
            100 * c.spread / 2,
            len(rates),
            steps,
            "" if reliable else " UNRELIABLE",
            _mem_text(c),
            f", {c.error}" if c.error else "",
            c.seconds,
            f"{c.setup_s:.1f} s set-up (model, optimizer), " if c.setup_s >= 0.05 else "",
            c.untimed_s,
            c.timed_s,
        )
        return c

    def remeasure(self, cands: list[Candidate]) -> None:
        """More repeats for ``cands``, interleaved (A B A B ...): a change of the machine's speed hits all of them
        alike, so their comparison holds. The new rates are appended to each candidate's."""
        s = self.s
        runs: list[tuple[Candidate, Callable[[], int], int, list[float]]] = []
        try:
            state = self._ensure_state()
            spec = self.task.input_spec()
            for c in cands:
                if c.samples_per_s is None:
                    continue
                batch = self.task.synthetic_batch(c.batch_size, spec, train=True)
                steps = max(s.min_steps, MIN_WINDOW_STEPS, math.ceil(s.repeat_s * c.samples_per_s / c.batch_size))
                runs.append((c, self._step_fn(state, batch, c.batch_size), steps, []))
            for _ in range(s.repeats):
                for _c, step, steps, rates in runs:
                    t = time_steps(
                        step,
                        warmup=1,
                        steps=steps,
                        repeats=1,
                        device=self.device,
                        reset_peak=False,
                        max_repeat_s=4 * s.repeat_s,
                    )
                    counted, _ = counted_windows(t.per_repeat_samples_per_s, t.per_repeat_seconds, _c.batch_size)
                    rates.extend(counted)
        except Exception as e:
            if not is_oom_error(e):
                raise
            runs = []  # leave the candidates as they were
        if not runs:
            self.state = None
            memory.free_device_memory(self.device)
            return
        for c, _step, _steps, rates in runs:
            c.add_rates(rates, max_spread=s.max_spread)  # the flag follows the spread of all its rates
        log.info(
            "autotune [%s] re-measured together: %s",
            self.stamp(),
            ", ".join(f"batch {c.batch_size} {c.samples_per_s:,.1f} ±{100 * c.spread / 2:.0f}%" for c, *_ in runs),
        )

    def size_rates(self, b: int, sizes: list[int], *, steps: int = 2, rounds: int = 2) -> list[SizeRate]:
        """Progressive resizing: the training step's samples/s at batch ``b`` for each of ``sizes`` (no larger
        than the largest, which the probes fitted), on synthetic inputs of that size: ``rounds`` rounds over the
        sizes in turn (a machine whose speed changes meanwhile hits every size alike), ``steps`` timed steps each
        after one warm-up step. Cheap, and what a run's epochs at each size cost."""
        task = self.task
        state = self._ensure_state()
        spec = task.input_spec()
        labels = task.synthetic_batch(b, spec, train=True)  # classification (progressive resizing is): targets
        steppers = {
            size: self._step_fn(state, dataclasses.replace(labels, inputs=task.synthetic_inputs(b, spec, size)), b)
            for size in sizes
        }
        done = {size: [0, 0.0] for size in sizes}  # samples, seconds
        for r in range(rounds):
            for size, step in steppers.items():
                t = time_steps(step, warmup=int(r == 0), steps=steps, repeats=1, device=self.device, reset_peak=False)
                done[size][0] += t.samples
                done[size][1] += t.samples / t.samples_per_s
        rates = [SizeRate(size, n / max(sec, 1e-9), b) for size, (n, sec) in done.items()]
        log.info(
            "autotune [%s] samples/s per training size at batch %d: %s",
            self.stamp(),
            b,
            ", ".join(f"{r.size} px {r.samples_per_s:,.1f}" for r in rates),
        )
        return rates

    def close(self) -> None:
        self.state = None
        memory.free_device_memory(self.device)


def _mem_text(c: Candidate) -> str:
    if c.peak_reserved_bytes is not None:
        return (
            f"steady-state peak {format_bytes(c.peak_allocated_bytes, 'GiB')} allocated, "
            f"{format_bytes(c.peak_reserved_bytes, 'GiB')} reserved (warm-up "
            f"{format_bytes(c.warmup_reserved_bytes, 'GiB')})"
        )
    if c.peak_rss_bytes is not None:
        return f"peak RSS {format_bytes(c.peak_rss_bytes, 'GiB')}"
    return "memory unknown"


# ========================================================================================== compiled check ===
def reset_compiler(device: torch.device) -> None:
    """Forget every compiled graph: dynamo's caches (and its recompile counts, which would otherwise send the
    next batch size to eager silently) and, once CUDA is initialised, the CUDA-graph trees with their memory
    pools (``torch._dynamo.reset`` does both). Then hand the freed memory back."""
    import torch._dynamo

    torch._dynamo.reset()
    memory.free_device_memory(device)


def compiled_check(
    task,
    *,
    budget: Budget,
    settings: ProbeSettings,
    eval_batch: Callable[[int], int],
    sizes: list[int],
    headroom: float,
    stamp: Callable[[], str] = _default_stamp,
    reset: Callable[[torch.device], None] = reset_compiler,
    max_sizes: int = 3,
) -> tuple[Any, Candidate | None, list[Candidate]]:
    """Compile once and run the first of ``sizes`` as training will; if it is not usable, the next ones (at most
    ``max_sizes`` in all), resetting the compiler in between. Returns (state, the usable compiled candidate or
    None, every compiled candidate tried)."""
    probe = StepProbe(
        task,
        budget=budget,
        settings=dataclasses.replace(settings, warmup=max(settings.warmup, 3)),
        eval_batch=eval_batch,
        stamp=stamp,
    )
    tried: list[Candidate] = []
    for i, size in enumerate(sizes[:max_sizes]):
        if i:
            reset(task.runtime.device)  # a failed size's graphs and CUDA-graph pool must not reach the next
        got = mark_usable(probe(size, "compiled"), budget.budget_bytes, headroom, budget.outside_torch_bytes)
        tried.append(got)
        log.info(
            "autotune [%s] compiled check at %d: %s (%.1f s, of which %.1f s warm-up and compile)",
            stamp(),
            size,
            "usable" if got.usable else got.error,
            got.seconds,
            got.untimed_s,
        )
        if got.usable:
            return probe.state, got, tried
        probe.state = None
    if tried:
        reset(task.runtime.device)  # nothing usable: the last size's graphs and pool go too, not held to the end
    return None, None, tried


# ============================================================================================ verification ===
@dataclass
class Verification:
    """The tuned settings end to end on the real data, then evaluation batches, under the budget."""

    ok: bool
    micro_batch: int
    accumulation: int
    backend: str
    samples_per_s: float | None = None
    """End-to-end samples/s (median of the repeats)."""
    rates: list[float] = field(default_factory=list)
    spread: float = 0.0
    steps: int = 0
    """Micro-batches per timed repeat."""
    window_s: float = 0.0
    """Seconds on the clock (all repeats)."""
    probe_samples_per_s: float | None = None
    """The model-only figure it is compared with: the compiled check, else the eager probe at this micro-batch."""
    probe_spread: float = 0.0
    recheck_samples_per_s: float | None = None
    """The model-only step re-measured right after the verification (only when the two disagreed)."""
    agreement: Agreement | None = None
    eval_batches: int | None = None
    eval_total_batches: int | None = None
    eval_seconds: float | None = None
    eval_batch_size: int | None = None
    peak_allocated_bytes: int | None = None
    """Steady state (peak statistics reset after the warm-up)."""
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    alloc_retries: int = 0
    device_used_bytes: int | None = None
    """What this process held on the device while the loaders ran (torch plus memory outside its allocator;
    the whole device's use where NVML cannot see processes)."""
    error: str = ""
    failure: str = ""
    """oom, retries or budget: memory evidence against the micro-batch."""
    warning: str = ""
    note: str = ""
    seconds: float = 0.0

    @property
    def memory_text(self) -> str:
        if self.peak_reserved_bytes is not None:
            return (
                f"steady-state peak {format_bytes(self.peak_allocated_bytes, 'GiB')} allocated, "
                f"{format_bytes(self.peak_reserved_bytes, 'GiB')} reserved, {self.alloc_retries} allocator "
                f"retries"
            )
        return f"peak RSS {format_bytes(self.peak_rss_bytes, 'GiB')}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verification:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["agreement"] = Agreement.from_dict(d["agreement"]) if d.get("agreement") else None
        return cls(**kw)


def _evaluate_for(task, state, loader, seconds: float) -> tuple[int, float]:
    """Evaluation batches until ``seconds`` have passed or the split ends; (batches, seconds)."""
    state.train(False)
    n, t0 = 0, time.perf_counter()
    try:
        with torch.no_grad():
            for batch in loader:
                task.eval_step(state, batch)
                n += 1
                if n % 4 == 0:
                    synchronize(task.runtime.device)
                    if time.perf_counter() - t0 >= seconds:
                        break
        synchronize(task.runtime.device)
    finally:
        state.train(True)
    return n, time.perf_counter() - t0


def _recheck(task, state, micro: int, settings: ProbeSettings) -> tuple[float, float]:
    """The model-only step at ``micro`` again, now: (samples/s, spread)."""
    batch = task.synthetic_batch(micro, task.input_spec(), train=True)

    def step() -> int:
        task.train_step(state, batch, update=True)
        return micro

    t = time_window(
        step,
        warmup=1,
        repeats=settings.repeats,
        seconds=settings.repeat_s,
        min_steps=settings.min_steps,
        device=task.runtime.device,
        reset_peak=False,
        max_repeat_s=4 * settings.repeat_s,
    )
    return t.samples_per_s, t.spread


def verify(
    task,
    source,
    *,
    backend: str,
    state,
    plan: BatchPlan,
    budget: Budget,
    seconds: float,
    noise: float,
    settings: ProbeSettings,
    reference: Candidate | None,
    loader=None,
    loader_share: float | None = None,
    loader_spread: float = 0.0,
    eval_batch_size: int,
    stamp: Callable[[], str] = _default_stamp,
) -> tuple[Verification, Any]:
    """About ``seconds`` of training at ``plan`` (whole optimizer steps) on the real data, then evaluation
    batches for a bounded time, under the budget. ``state`` (the compiled check's, or the probe's) is reused,
    and so is ``loader`` (the loader trial's, already warm; closed here either way). ``loader_share``: the loader
    trial's end to end over model-only (with its spread), which explains a verification below the probe when
    the run is input-bound. Returns (verification, state or None after an out-of-memory error)."""
    device = task.runtime.device
    out = Verification(False, plan.micro_batch, plan.accumulation, backend)
    memory.free_device_memory(device)
    t0 = time.perf_counter()
    err = ""
    try:
        state, timing, retries, eval_retries = _run_verification(
            task, source, out, state=state, plan=plan, backend=backend, loader=loader, seconds=seconds,
            settings=settings, eval_batch_size=eval_batch_size,
        )  # fmt: skip
    except Exception as e:
        if not is_oom_error(e):
            raise
        err = oom_summary(e)
    out.seconds = round(time.perf_counter() - t0, 3)
    if err:
        state = None
        memory.free_device_memory(device)
        out.error, out.failure = err, "oom"
        log.info("autotune [%s] verification at %d x %d: %s", stamp(), plan.micro_batch, plan.accumulation, err)
        return out, None
    peak = memory.read_peak(device)
    out.peak_allocated_bytes, out.peak_reserved_bytes = peak.peak_allocated_bytes, peak.peak_reserved_bytes
    out.peak_rss_bytes, out.alloc_retries = peak.peak_rss_bytes, retries
    out.rates, out.steps, out.window_s = list(timing.per_repeat_samples_per_s), timing.steps, timing.timed_seconds
    out.samples_per_s, out.spread = timing.samples_per_s, timing.spread
    _judge_memory(out, budget, retries, eval_retries)
    if out.error:
        log.info("autotune [%s] verification at %d x %d: %s", stamp(), plan.micro_batch, plan.accumulation, out.error)
        return out, state
    if reference is not None and reference.samples_per_s is not None:
        out.probe_samples_per_s, out.probe_spread = reference.samples_per_s, reference.spread
    out.agreement = _agreement(task, state, out, settings, noise, loader_share, loader_spread)
    out.ok = out.agreement.explained
    if not out.ok:
        out.error = f"verification disagrees with the probe: {out.agreement.text}"
    log.info(
        "autotune [%s] verification at %d x %d: %s samples/s end to end ±%.0f%% (%s); %s",
        stamp(),
        plan.micro_batch,
        plan.accumulation,
        f"{out.samples_per_s:,.1f}",
        100 * out.spread / 2,
        out.memory_text,
        out.agreement.status,
    )
    return out, state


def _run_verification(
    task,
    source,
    out: Verification,
    *,
    state,
    plan: BatchPlan,
    backend: str,
    loader,
    seconds: float,
    settings: ProbeSettings,
    eval_batch_size: int,
):
    """The training window and the evaluation batches; (state, timing, retries while training, retries while
    evaluating). Fills ``out``'s evaluation fields and the whole device's memory; closes the loaders."""
    device = task.runtime.device
    accum = plan.accumulation
    val_loader = None
    try:
        if state is None:
            state = task.build_state()
        first = train_sizes(task.cfg).first_largest_epoch  # progressive: time the largest size
        if loader is None:
            loader = task.make_loader(source.train, train=True, batch_size=plan.micro_batch, backend=backend)
            loader.set_epoch(first)  # (the loader trial's is at its first epoch there or a later one)
        it = cycle_batches(loader, first)
        step = train_step_fn(task, state, lambda: next(it), accum)
        for _ in range(accum):  # one optimizer step with this loader before the steady state
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        memory.reset_peak_memory(device)
        retries0 = memory.alloc_retries(device)
        # warm-up: one more optimizer step (it allocates again after empty_cache), then the window.
        window = max(0.05, seconds / settings.repeats)
        timing = time_window(
            step,
            warmup=accum,
            repeats=settings.repeats,
            seconds=window,
            min_steps=accum,
            step_multiple=accum,
            device=device,
            clock="wall",
            reset_peak=False,
            max_repeat_s=2 * window,
        )
        retries = memory.alloc_retries(device) - retries0
        if source.val:
            val_loader = task.make_loader(source.val, train=False, batch_size=eval_batch_size, backend=backend)
            out.eval_total_batches = len(val_loader)
            out.eval_batches, eval_s = _evaluate_for(task, state, val_loader, max(0.2, 0.3 * seconds))
            out.eval_seconds = round(eval_s, 3)
            out.eval_batch_size = eval_batch_size
        else:
            out.note = "no validation split: evaluation skipped"
        synchronize(device)
        if device.type == "cuda":
            # DALI (and cuDNN/cuBLAS workspaces) allocate outside torch's allocator, which the memory fraction does
            # not cap: read what this process holds (the whole device where NVML cannot see processes) while the
            # loaders are still alive.
            out.device_used_bytes = memory.held_device_bytes(device)[0]
        eval_retries = memory.alloc_retries(device) - retries0 - retries
    finally:
        for ld in (loader, val_loader):
            if ld is not None:
                ld.close()
        loader = val_loader = None
    return state, timing, retries, eval_retries


def _judge_memory(out: Verification, budget: Budget, retries: int, eval_retries: int) -> None:
    """Memory evidence against the micro-batch: allocator retries while training, or (emulated budget) what the
    run held on the device over the budget; retries only while evaluating are a warning."""
    if retries:
        out.error, out.failure = f"needed {retries} allocator retries in the steady state (at the limit)", "retries"
    if eval_retries:
        # A partial last evaluation batch is a new shape: cuDNN's algorithm search tries workspaces sized from the
        # whole card, and the allocator flushes its cache for them once. Training never sees that shape.
        out.warning = (
            f"{eval_retries} allocator retries during evaluation (cuDNN's algorithm search on a new batch "
            f"shape); none while training"
        )
    used = out.device_used_bytes
    if (
        budget.mode == "emulated"
        and used is not None
        and budget.budget_bytes is not None
        and used > budget.budget_bytes
    ):
        # Memory outside torch's allocator is not capped by the fraction: on a real card of the budget's size this
        # run would fail, so it does not count as fitting.
        out.error = (
            f"the run held {format_bytes(used, 'GiB')} on the device during verification (torch plus memory "
            f"outside its allocator, e.g. DALI), more than the {format_bytes(budget.budget_bytes, 'GiB')} budget"
        )
        out.failure = "budget"


def _agreement(
    task,
    state,
    out: Verification,
    settings: ProbeSettings,
    noise: float,
    loader_share: float | None,
    loader_spread: float,
) -> Agreement:
    """The verification against the probe (:func:`~fasttrain.tuning.search.judge_verification`); when they
    disagree, or the micro-batch was not probed, the model-only step is measured again, now."""

    def judge(recheck_sps: float | None = None, recheck_spread: float = 0.0) -> Agreement:
        assert out.probe_samples_per_s is not None and out.samples_per_s is not None
        return judge_verification(
            probe_sps=out.probe_samples_per_s,
            probe_spread=out.probe_spread,
            verify_sps=out.samples_per_s,
            verify_spread=out.spread,
            noise=noise,
            loader_share=loader_share,
            loader_spread=loader_spread,
            recheck_sps=recheck_sps,
            recheck_spread=recheck_spread,
        )

    agreement = judge() if out.probe_samples_per_s is not None else None
    if agreement is not None and agreement.explained:
        return agreement
    # Not probed at this micro-batch, or the two disagree: measure the model-only step again, now.
    out.recheck_samples_per_s, recheck_spread = _recheck(task, state, out.micro_batch, settings)
    if out.probe_samples_per_s is None:
        out.probe_samples_per_s, out.probe_spread = out.recheck_samples_per_s, recheck_spread
        out.note = (out.note + "; " if out.note else "") + (
            f"micro-batch {out.micro_batch} was not probed: compared with the model-only step measured now"
        )
        return judge()
    return judge(recheck_sps=out.recheck_samples_per_s, recheck_spread=recheck_spread)
