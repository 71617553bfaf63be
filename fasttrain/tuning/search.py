"""The pure core of autotune: candidates, noise-aware comparison, the batch-size search, the choice, batch plans,
the loader choice and the verification verdict. No torch import: every rule here is tested with fake
measurements.

Noise is an input, not an assumption. Every measurement carries the per-repeat rates it came from and their
spread, ``(max - min) / median``. Two measurements differ only beyond ``max(tune.noise, mean of their
spreads)``; inside that margin they tie, and a tie keeps what the user gave (else the smaller batch: the same
speed with less memory and more optimizer steps per epoch). A change is advice, and advice needs evidence.

Evidence for memory is an out-of-memory error, allocator retries, or a measured peak over the budget's
headroom *at that batch or a smaller one* (memory grows with the batch). A size that was never probed is
reported as not probed (cap or time), never as "does not fit", and gradient accumulation is proposed only
where memory evidence says the global batch does not fit.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fasttrain.numbers import GIB, spread_of

__all__ = [
    "Candidate",
    "Skipped",
    "SearchResult",
    "BatchPlan",
    "Agreement",
    "margin",
    "beats",
    "mark_usable",
    "choose_batch",
    "search_batch_size",
    "counted_windows",
    "cpu_time_cap",
    "cpu_tuning_pays",
    "cpu_shortcut",
    "least_cpu_tuning_s",
    "CPU_TUNE_SHARE",
    "measurement_reliable",
    "MIN_WINDOW_STEPS",
    "plan_batches",
    "choose_loader",
    "loader_share",
    "judge_verification",
]

MEMORY_FAILURES = ("oom", "retries", "headroom", "budget")


class Measured(Protocol):
    samples_per_s: float | None
    spread: float


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Candidate:
    """One probed batch size."""

    batch_size: int
    fits: bool
    """Ran without an out-of-memory error and without allocator retries."""
    samples_per_s: float | None = None
    """Train-step samples/s: the median of ``rates``; None when it did not run."""
    rates: list[float] = field(default_factory=list)
    """Samples/s of every timed repeat (re-measurements appended)."""
    spread: float = 0.0
    """(max - min) / median of ``rates``: this measurement's own noise."""
    reliable: bool = True
    """False when the spread stayed above tune.max_spread after a repeat."""
    usage_bytes: int | None = None
    """What counts against the budget: the steady-state peak reserved (+ memory in use before tuning when the
    budget is emulated, + memory outside torch charged to it); None on CPU."""
    peak_allocated_bytes: int | None = None
    """Steady state (after the warm-up; see ``warmup_reserved_bytes``)."""
    peak_reserved_bytes: int | None = None
    """Steady state: peak stats are reset after the warm-up, so cuDNN's benchmark search is not in it."""
    warmup_reserved_bytes: int | None = None
    """Peak reserved during the warm-up, cuDNN's benchmark workspaces included (sized from the whole card's
    free memory, whatever the cap): shown, not charged."""
    peak_rss_bytes: int | None = None
    """Process peak RSS over its lifetime (CPU runs report this instead of VRAM)."""
    alloc_retries: int = 0
    """Allocator retries (cache flushed and malloc retried) after the warm-up; > 0 means it did not fit."""
    eval_batch_size: int = 0
    usable: bool = False
    """Fits, was timed, and leaves the headroom (set by the search)."""
    failure: str = ""
    """oom, retries, headroom (a probe) or budget (what the run held on the device over it in the verification,
    the whole device's use where NVML cannot see processes): the memory evidence against this size; empty when
    usable."""
    phase: str = ""
    """given (the config's own micro-batch), grow, bisect or compiled; for a plan that failed, verify or loader
    (its loader trials ran out of memory)."""
    error: str = ""
    """Why it did not fit or is not usable."""
    seconds: float = 0.0
    """Wall time of the probe, warm-up included."""
    timed_s: float = 0.0
    """Of ``seconds``, the time on the clock (all repeats)."""
    untimed_s: float = 0.0
    """Of ``seconds``, the part outside the timed steps and the set-up: warm-up (compile, cuDNN autotuning) and
    eval steps, what grows with the batch."""
    setup_s: float = 0.0
    """Of ``seconds``, building the training state (model, optimizer): once per state, which the probes share
    until an out-of-memory error drops it, so not a cost of the batch size."""
    remeasured: int = 0
    """Times more repeats were added (a second round, or an interleaved comparison)."""

    def set_rates(self, rates: Sequence[float]) -> None:
        self.rates = [float(r) for r in rates]
        self.samples_per_s = statistics.median(self.rates) if self.rates else None
        self.spread = spread_of(self.rates)

    def add_rates(self, rates: Sequence[float], max_spread: float | None = None) -> None:
        """Append a re-measurement's rates; with ``max_spread`` the reliability is judged again on all of them
        (a measurement whose repeats disagree wildly is never left marked reliable)."""
        self.set_rates([*self.rates, *rates])
        self.remeasured += 1
        if max_spread is not None:
            self.reliable = measurement_reliable(self.rates, max_spread)

    @property
    def memory_failure(self) -> bool:
        return self.failure in MEMORY_FAILURES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return _from_dict(cls, d)


CPU_TUNE_SHARE = 0.5
"""On CPU autotune may take at most this share of the training run it tunes."""


def cpu_time_cap(budget_s: float, *, job_samples: int, samples_per_s: float | None, setup_s: float) -> float:
    """The time budget of a CPU autotune: at most :data:`CPU_TUNE_SHARE` of the training it tunes, estimated as
    the set-up both pay (``setup_s``: data discovery, the cache build) plus the job's samples at the config's own
    measured step (``samples_per_s``; the model-only step overestimates training's speed, so the estimate is
    short and the cap errs tight); never more than ``budget_s``."""
    if not samples_per_s or samples_per_s <= 0:
        return budget_s
    train_s = setup_s + job_samples / samples_per_s
    return min(budget_s, CPU_TUNE_SHARE * train_s)


def least_cpu_tuning_s(*, repeats: int, repeat_s: float, verify_s: float) -> float:
    """The least a CPU autotune that could change the config costs: two probes (the config's own batch and one
    other: one alone compares with nothing), each ``repeats`` windows of ``repeat_s``, and two end-to-end windows
    of ``verify_s`` (on CPU a change is kept only when it beats the config's own end to end; 0 without
    verification). Set-up, warm-up and loader trials come on top: the figure errs low."""
    return 2 * repeats * repeat_s + 2 * verify_s


def cpu_tuning_pays(job_s: float | None, least_s: float) -> bool:
    """Whether a CPU job of about ``job_s`` seconds of training steps leaves room, within
    :data:`CPU_TUNE_SHARE` of it, for the least tuning that could change its config (``least_s``,
    :func:`least_cpu_tuning_s`). An unknown length (None) is tuned: the time cap measured after the first
    probe bounds it."""
    return job_s is None or CPU_TUNE_SHARE * job_s >= least_s


def cpu_shortcut(
    *, capped: bool, own_stands: bool, own_known: bool, loader_left_s: float, left_s: float, confirm_s: float
) -> str:
    """After the search on CPU, under the time cap from the job's length (``capped``): ``"cap-spent"`` when the
    config's own batch stands and no time is left for loader trials (``loader_left_s <= 0``): the loader trials
    and the verification are skipped, the config is written as it is; ``"unconfirmed"`` when the search chose
    another batch but the time left (``left_s``) cannot pay the two end-to-end windows (``confirm_s``) that
    would confirm it against the config's own (``own_known``: measured usable): the config's own is kept; ``""``
    otherwise (go on). Never a change that was not confirmed end to end."""
    if not capped or not own_known:
        return ""
    if own_stands:
        return "cap-spent" if loader_left_s <= 0 else ""
    return "unconfirmed" if left_s < confirm_s else ""


MIN_WINDOW_STEPS = 2
"""A timed window of fewer steps does not count: one step's time is one sample of the machine's noise (a step
that ran alone between two other processes' slices measured 3.5x the model's speed)."""


def counted_windows(
    rates: Sequence[float], seconds: Sequence[float], batch_size: int
) -> tuple[list[float], list[float]]:
    """(the rates of the windows that count, those of the windows too short to count): a window counts when it
    ran at least :data:`MIN_WINDOW_STEPS` steps of ``batch_size`` samples (a repeat cut short by a slow machine
    may have run one)."""
    counted: list[float] = []
    dropped: list[float] = []
    for r, sec in zip(rates, seconds):
        steps = round(r * sec / batch_size) if batch_size else 0
        (counted if steps >= MIN_WINDOW_STEPS else dropped).append(float(r))
    return counted, dropped


def measurement_reliable(rates: Sequence[float], max_spread: float) -> bool:
    """A measurement is reliable when a window counts and the spread of those that count is within
    ``max_spread`` (one window, with ``tune.repeats = 1``, has none to show)."""
    return bool(rates) and spread_of(rates) <= max_spread


@dataclass
class Skipped:
    """A size the search would have probed next and did not."""

    batch_size: int
    reason: str
    """cap or time."""
    detail: str = ""

    def describe(self) -> str:
        return f"not probed ({self.reason})"


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
    given: int | None = None
    """The config's own micro-batch, probed first as the baseline."""
    limit: str = ""
    """What ended the growth: cap, time, memory, plateau, drop, or none (nothing usable)."""
    not_probed: list[Skipped] = field(default_factory=list)

    def by_size(self) -> dict[int, Candidate]:
        return {c.batch_size: c for c in self.candidates}

    @property
    def fails_at(self) -> int | None:
        """The smallest batch size with memory evidence against it (OOM, retries or headroom)."""
        return min((c.batch_size for c in self.candidates if c.memory_failure), default=None)


# -- comparison -------------------------------------------------------------------------------------------------
def margin(a: Measured, b: Measured, noise: float) -> float:
    """The relative difference below which ``a`` and ``b`` tie: tune.noise, or their own measured noise (the
    mean of their spreads) when that is larger."""
    return max(noise, (a.spread + b.spread) / 2)


def beats(a: Measured, b: Measured, noise: float) -> bool:
    """``a`` is faster than ``b`` beyond the noise of both."""
    if a.samples_per_s is None or b.samples_per_s is None:
        return False
    return a.samples_per_s > b.samples_per_s * (1.0 + margin(a, b, noise))


def mark_usable(c: Candidate, budget_bytes: int | None, headroom: float, extra_bytes: int = 0) -> Candidate:
    """Set ``c.usable`` (fits, timed, and its usage plus ``extra_bytes`` leaves ``headroom`` of the budget; no
    budget on CPU) and ``c.failure`` (the memory evidence against it)."""
    if not c.fits:
        c.usable = False
        c.failure = c.failure or ("retries" if c.alloc_retries else "oom")
        return c
    c.usable = c.samples_per_s is not None
    limit = None if budget_bytes is None else (1.0 - headroom) * budget_bytes
    if (
        c.usable
        and budget_bytes is not None
        and limit is not None
        and c.usage_bytes is not None
        and c.usage_bytes + extra_bytes > limit
    ):
        c.usable = False
        c.failure = "headroom"
        extra = f" + {extra_bytes / GIB:.2f} GiB outside torch" if extra_bytes else ""
        c.error = (
            f"leaves less than {headroom:.0%} headroom ({c.usage_bytes / GIB:.2f} GiB{extra} of "
            f"{budget_bytes / GIB:.2f} GiB)"
        )
    elif c.usable:
        c.failure, c.error = "", ""
    return c


def choose_batch(
    candidates: Iterable[Candidate], noise: float, prefer: int | None = None
) -> tuple[int | None, int | None]:
    """(chosen, best). ``best``: the highest samples/s among usable candidates. Every usable size that ``best``
    does not beat beyond the noise ties with it; of those, ``prefer`` (the config's own batch) is chosen when it
    is one of them, else the smallest."""
    usable = [c for c in candidates if c.usable and c.samples_per_s is not None]
    if not usable:
        return None, None
    best = max(usable, key=lambda c: (c.samples_per_s, -c.batch_size))
    ties = [c for c in usable if not beats(best, c, noise)]
    if prefer is not None and any(c.batch_size == prefer for c in ties):
        return prefer, best.batch_size
    return min(c.batch_size for c in ties), best.batch_size


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _round_down(x: int, m: int) -> int:
    return x // m * m


def _fmt_sps(c: Candidate) -> str:
    return f"{c.samples_per_s:,.1f}" if c.samples_per_s is not None else "-"


def search_batch_size(
    measure: Callable[[int, str], Candidate],
    *,
    min_batch: int,
    max_batch: int,
    multiple: int,
    noise: float,
    budget_bytes: int | None,
    headroom: float,
    given: int | None = None,
    time_left: Callable[[], float] | None = None,
    remeasure: Callable[[list[Candidate]], None] | None = None,
    cap_reason: str = "tune.max_batch",
) -> SearchResult:
    """Probe the config's own micro-batch ``given`` first (the baseline), then grow x2 from ``min_batch`` and
    bisect the first unusable step on multiples of ``multiple``; choose.

    ``measure(batch_size, phase)`` probes one size and returns a :class:`Candidate`. A candidate is usable
    when it fits and its usage leaves ``headroom`` of ``budget_bytes`` (no budget: every fit is usable).
    Growth stops at the first unusable size (or at a size at least as large as one already seen failing), at
    ``max_batch`` (the cap), when ``time_left()`` is smaller than the next probe's estimated cost (the last
    probe's seconds scaled by the batch ratio), after two growths that did not beat the best smaller size
    beyond the noise (a plateau), or at a size the best smaller size beats beyond the noise (a drop). A plateau
    or drop is confirmed first: ``remeasure([best smaller, this size])`` adds interleaved repeats to both (a
    load change hits both alike), then the comparison is made again. Bisection runs only after an unusable
    size and stops when the interval is one ``multiple`` wide, when a larger usable size gained nothing
    beyond the noise, or when time runs out. Last, when the best size beats ``given``, both are re-measured
    together before the choice is final.
    """
    if multiple < 1 or min_batch < 1:
        raise ValueError(f"tune.multiple ({multiple}) and tune.min_batch ({min_batch}) must be >= 1")
    start = _round_up(min_batch, multiple)
    cap = _round_down(max_batch, multiple)
    if cap < start:
        raise ValueError(
            f"tune.max_batch: no multiple of tune.multiple ({multiple}) lies between tune.min_batch "
            f"({min_batch}) and the largest batch tried ({max_batch})"
        )
    s = _BatchSearch(measure, noise, budget_bytes, headroom, time_left, remeasure)
    if given is not None:
        s.run(given, "given")
    s.grow(start, cap, cap_reason)
    s.bisect(multiple)
    return s.result(given)


@dataclass
class _BatchSearch:
    """The search's state: every probe so far, what was skipped, why it stopped (see :func:`search_batch_size`)."""

    measure: Callable[[int, str], Candidate]
    noise: float
    budget_bytes: int | None
    headroom: float
    time_left: Callable[[], float] | None
    remeasure: Callable[[list[Candidate]], None] | None
    results: dict[int, Candidate] = field(default_factory=dict)
    order: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    last_ok: int | None = None
    first_bad: int | None = None
    stop: str = ""
    limit: str = ""

    def run(self, b: int, phase: str) -> Candidate:
        c = mark_usable(self.measure(b, phase), self.budget_bytes, self.headroom)
        c.phase = c.phase or phase
        self.results[b] = c
        self.order.append(c)
        return c

    def cost(self, b: int) -> float:
        """The next probe's seconds, from the timed probe nearest in size: its untimed part (warm-up, eval)
        grows with the batch; its timed part is a fixed window until one step per repeat outlasts it."""
        timed = [(c, c.samples_per_s) for c in self.order if c.samples_per_s]
        if not timed:
            return max((c.seconds for c in self.order), default=0.0)
        ref, sps = min(timed, key=lambda t: abs(math.log(b / t[0].batch_size)))
        scale = max(1.0, b / ref.batch_size)
        step = b / sps
        return ref.untimed_s * scale + max(ref.timed_s, len(ref.rates) * step)

    def affordable(self, b: int) -> bool:
        return self.time_left is None or self.time_left() >= self.cost(b)

    def confirm(self, cands: list[Candidate]) -> bool:
        """Re-measure ``cands`` together when time allows; True when it ran."""
        if self.remeasure is None:
            return False
        need = sum(c.timed_s + (c.seconds - c.timed_s) / 4 for c in cands)
        if self.time_left is not None and self.time_left() < need:
            return False
        self.remeasure(cands)
        return True

    def best_below(self, b: int) -> Candidate | None:
        below = [c for c in self.results.values() if c.usable and c.batch_size < b]
        return max(below, key=lambda c: c.samples_per_s or 0.0) if below else None

    def probe_or_skip(self, b: int, phase: str) -> Candidate | None:
        """The candidate at ``b`` (measured before, or now); None when time does not allow its probe."""
        if b in self.results:
            return self.results[b]
        if not self.affordable(b):
            self.skipped.append(Skipped(b, "time", f"the next probe would take about {self.cost(b):.0f} s"))
            return None
        return self.run(b, phase)

    def grow(self, b: int, cap: int, cap_reason: str) -> None:
        """x2 from ``b`` until a stop (see :func:`search_batch_size`)."""
        flat = 0
        while True:
            known_bad = min((x for x, c in self.results.items() if not c.usable), default=None)
            if known_bad is not None and b >= known_bad:
                self.first_bad = known_bad
                self.stop = f"batch {known_bad} is not usable ({self.results[known_bad].error or 'does not fit'})"
                self.limit = "memory"
                return
            c = self.probe_or_skip(b, "grow")
            if c is None:
                self.stop, self.limit = f"time budget: batch {b} not probed (about {self.cost(b):.0f} s more)", "time"
                return
            if not c.usable:
                self.first_bad = b
                self.stop, self.limit = f"batch {b} is not usable ({c.error or 'does not fit'})", "memory"
                return
            self.last_ok = b
            flat, ended = self.judge_growth(c, flat)
            if ended:
                return
            if b >= cap:
                self.stop, self.limit = f"reached {cap_reason} ({cap}) while samples/s still rose or held", "cap"
                self.skipped.append(Skipped(2 * cap, "cap", f"{cap_reason} = {cap}"))
                return
            b = min(cap, b * 2)

    def judge_growth(self, c: Candidate, flat: int) -> tuple[int, bool]:
        """(growths in a row within the noise, whether growth ends here: a confirmed drop or plateau)."""
        prev = self.best_below(c.batch_size)
        if prev is None:
            return flat, False
        if beats(c, prev, self.noise):
            return 0, False
        flat += 1
        dropped = beats(prev, c, self.noise)
        if (dropped or flat >= 2) and self.confirm([prev, c]):
            dropped = beats(prev, c, self.noise)
            if beats(c, prev, self.noise):
                flat = 0
        if dropped:
            self.stop = (
                f"throughput fell at batch {c.batch_size} ({_fmt_sps(c)} vs {_fmt_sps(prev)} samples/s at "
                f"{prev.batch_size}, beyond the noise)"
            )
            self.limit = "drop"
            return flat, True
        if flat >= 2:
            self.stop = f"throughput stopped rising (two growths within the noise) at batch {c.batch_size}"
            self.limit = "plateau"
            return flat, True
        return flat, False

    def bisect(self, multiple: int) -> None:
        """Between the largest usable size and the first unusable one, on multiples of ``multiple``."""
        if self.first_bad is None or self.last_ok is None:
            return
        lo, hi = self.last_ok, self.first_bad
        while hi - lo > multiple:
            mid = _round_down((lo + hi) // 2, multiple)
            if mid <= lo:
                mid = lo + multiple
            c = self.probe_or_skip(mid, "bisect")
            if c is None:
                self.stop += f"; bisection stopped by the time budget before batch {mid}"
                return
            if c.usable:
                gained = beats(c, self.results[lo], self.noise)
                lo = mid
                if not gained:
                    self.stop += f"; bisection stopped at {mid}: no gain beyond the noise"
                    return
            else:
                hi = mid
        self.stop += f"; largest usable batch {lo}, first unusable {hi}"

    def result(self, given: int | None) -> SearchResult:
        """The choice (the best against ``given`` re-measured together first) and the result."""
        order, results = self.order, self.results
        chosen, best = choose_batch(order, self.noise, prefer=given)
        if given is not None and best is not None and chosen != given and given in results and results[given].usable:
            if self.confirm([results[given], results[best]]):
                chosen, best = choose_batch(order, self.noise, prefer=given)
        stop, limit = self.stop, self.limit
        if chosen is None:
            first = order[0]
            stop = (
                f"no batch size is usable: the smallest tried ({min(c.batch_size for c in order)}) "
                f"{first.error or 'does not fit'}"
            )
            limit = "none"
        usable = [c.batch_size for c in order if c.usable]
        return SearchResult(order, chosen, best, stop, max(usable) if usable else None, given, limit, self.skipped)


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """How the global batch (train.batch_size) is reached with micro-batches that fit."""

    micro_batch: int
    accumulation: int
    global_batch: int
    requested_global: int
    note: str
    requested_accumulation: int = 1

    @property
    def changed_global(self) -> bool:
        return self.global_batch != self.requested_global

    @property
    def changed(self) -> bool:
        return self.changed_global or self.accumulation != self.requested_accumulation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchPlan:
        return _from_dict(cls, d)


def _split(g: int, chosen: int, multiple: int, why: str, a0: int) -> BatchPlan:
    """``g`` as equal micro-batches of at most ``chosen`` (on multiples of ``multiple`` where a split exists)."""
    accum_min = math.ceil(g / chosen)
    tries = range(accum_min, 2 * accum_min + 1)
    for a in tries:
        if g % a == 0 and (g // a) % multiple == 0:
            return BatchPlan(
                g // a, a, g, g, f"train.batch_size {g} {why}: kept as {a} x {g // a} (gradient accumulation)", a0
            )
    for a in tries:
        if g % a == 0:
            return BatchPlan(
                g // a,
                a,
                g,
                g,
                f"train.batch_size {g} {why}: kept as {a} x {g // a} (gradient accumulation); the "
                f"micro-batch is not a multiple of {multiple}: no equal split of {g} into micro-batches "
                f"of at most {chosen} is",
                a0,
            )
    micro = math.ceil(g / accum_min)
    new_g = micro * accum_min
    return BatchPlan(
        micro,
        accum_min,
        new_g,
        g,
        f"train.batch_size {g} {why}, and cannot be split into {accum_min}..{2 * accum_min} equal "
        f"micro-batches of at most {chosen}: changed to {new_g} = {accum_min} x {micro}",
        a0,
    )


def plan_batches(
    requested_global: int,
    chosen: int,
    *,
    multiple: int,
    accumulation: int = 1,
    fails_at: int | None = None,
    fail_reason: str = "",
    allow_accumulation: bool = True,
) -> BatchPlan:
    """Turn the chosen micro-batch into train.batch_size / train.accumulation.

    The config asked for ``requested_global`` in ``accumulation`` micro-batches. ``fails_at``: the smallest batch
    with memory evidence against it (``fail_reason`` says which). Rules, in order:

    - the chosen batch is the config's own micro-batch: nothing changes;
    - the global batch is kept through accumulation when memory evidence says it does not fit as one batch
      (``fails_at <= requested_global``; never where ``allow_accumulation`` is False: a CPU has no memory
      budget, and CUDA graphs overwrite gradients kept across micro-batches), or when the config already
      accumulates (its own choice is kept, with the faster micro-batch); a chosen batch at least as large as the
      global one means the global batch fits as one micro-batch;
    - otherwise the global batch becomes the chosen batch (raised or lowered) and the note says that optim.lr
      was left as it is.
    """
    g, a0 = requested_global, accumulation
    m0 = g // a0
    if chosen == m0:
        how = f"{a0} x {m0}" if a0 > 1 else "one batch"
        return BatchPlan(
            m0,
            a0,
            g,
            g,
            f"train.batch_size {g} is kept ({how}): no batch size was measured faster beyond the noise",
            a0,
        )
    evidence = fails_at is not None and fails_at <= g
    if (allow_accumulation and evidence) or a0 > 1:
        if chosen >= g:
            return BatchPlan(
                g,
                1,
                g,
                g,
                f"train.batch_size {g} fits as one micro-batch (batch {chosen} was "
                f"measured usable): kept without accumulation",
                a0,
            )
        why = (
            f"does not fit as one batch ({fail_reason or 'memory'} at batch {fails_at})"
            if evidence
            else "keeps the config's own accumulation, with a faster micro-batch"
        )
        return _split(g, chosen, multiple, why, a0)
    verb = "raised" if chosen > g else "lowered"
    return BatchPlan(
        chosen,
        1,
        chosen,
        g,
        f"train.batch_size {verb} from {g} to {chosen} (faster beyond the noise); optim.lr is per "
        f"optimizer step and was left as it is: retune it, or scale it x{chosen / g:.3g} (linear rule)",
        a0,
    )


# -- loader -----------------------------------------------------------------------------------------------------
class LoaderMeasured(Protocol):
    samples_per_s: float | None
    """End to end."""
    spread: float
    model_samples_per_s: float | None
    """The model-only step, measured right before and after the end-to-end window (the same machine state)."""
    model_spread: float


def loader_share(t: LoaderMeasured) -> tuple[float, float]:
    """(end to end / model-only, its spread): how much of the step's speed the loader lets through."""
    if not t.samples_per_s or not t.model_samples_per_s:
        return 0.0, 0.0
    return t.samples_per_s / t.model_samples_per_s, t.spread + t.model_spread


def choose_loader(trials: Sequence[LoaderMeasured], noise: float, given: int = 0) -> tuple[int, bool]:
    """(index of the setting to keep, whether it keeps up with the model-only step).

    ``trials`` are in the order tried, ``given`` the index of the config's own setting. Each is judged by its
    share of the model-only step measured alongside it, so a machine whose speed changes between trials does not
    decide. A setting keeps up when the model-only step does not beat it beyond the noise. The highest share
    wins; settings tying with it keep the given one, else the earliest (the ladder runs cheapest first)."""
    if not trials:
        raise ValueError("choose_loader: no trials")
    shares = [_Rate(*loader_share(t)) for t in trials]
    best = max(range(len(trials)), key=lambda i: shares[i].samples_per_s or 0.0)
    ties = [i for i in range(len(trials)) if not beats(shares[best], shares[i], noise)]
    pick = given if given in ties else min(ties)
    return pick, not beats(_Rate(1.0, 0.0), shares[pick], noise)


@dataclass
class _Rate:
    samples_per_s: float | None
    spread: float


# -- verification -----------------------------------------------------------------------------------------------
@dataclass
class Agreement:
    """Whether the verification's end-to-end samples/s agrees with the probe's, and if not, why."""

    status: str
    """agrees, input-bound, machine-changed or disagrees."""
    explained: bool
    """True unless the figures disagree for no reason found (then the answer is not ok)."""
    reliable: bool
    """False when the machine's speed changed between the probes and the verification (not cached)."""
    believe: str
    """Which figure to believe, and for what."""
    text: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Agreement:
        return _from_dict(cls, d)


def _within(a: float, sa: float, b: float, sb: float, noise: float) -> tuple[bool, float]:
    m = max(noise, (sa + sb) / 2)
    return abs(a / b - 1.0) <= m if b else False, m


def judge_verification(
    *,
    probe_sps: float,
    probe_spread: float,
    verify_sps: float,
    verify_spread: float,
    noise: float,
    loader_share: float | None = None,
    loader_spread: float = 0.0,
    recheck_sps: float | None = None,
    recheck_spread: float = 0.0,
) -> Agreement:
    """Compare the verification (end to end, real data) with the probe (model-only step, synthetic batch).

    ``loader_share`` (spread ``loader_spread``): the loader trial's end-to-end samples/s as a share of the
    model-only step measured alongside it; below 1 beyond the noise, the run is input-bound and the verification
    is expected at ``probe x share``. ``recheck_sps``: the model-only step measured again right after the
    verification.

    - within the noise of the probe: agrees;
    - input-bound and within the noise of ``probe x share``: input-bound (believe the verification for training
      speed; the probe is the model-only ceiling);
    - the recheck moved away from the probe beyond the noise, and the verification is within the noise of
      ``recheck`` (x share when input-bound): the machine's speed changed (other load, thermal throttling);
      believe the later figures; the search compared sizes at another speed, so the answer is marked unreliable;
    - anything else disagrees, unexplained.
    """
    ok, m = _within(verify_sps, verify_spread, probe_sps, probe_spread, noise)
    rel = verify_sps / probe_sps - 1.0 if probe_sps else 0.0
    fig = f"verification {verify_sps:,.1f} samples/s end to end vs the probe's {probe_sps:,.1f} ({rel:+.0%})"
    if ok:
        return Agreement("agrees", True, True, "either", f"{fig}: within the noise (±{m:.0%})")
    bound = loader_share is not None and beats(_Rate(1.0, 0.0), _Rate(loader_share, loader_spread), noise)
    share = loader_share if bound and loader_share is not None else 1.0
    if bound:
        same, _ = _within(verify_sps, verify_spread, probe_sps * share, probe_spread + loader_spread, noise)
        if same:
            return Agreement(
                "input-bound",
                True,
                True,
                "the verification, for training speed (the probe is the model-only ceiling)",
                f"{fig}: input-bound, the loader trial ran end to end at {share:.0%} of the model-only "
                f"step measured alongside it",
            )
    if recheck_sps is not None:
        unmoved, _ = _within(recheck_sps, recheck_spread, probe_sps, probe_spread, noise)
        same, _ = _within(
            verify_sps, verify_spread, recheck_sps * share, recheck_spread + (loader_spread if bound else 0.0), noise
        )
        if not unmoved and same:
            word = "slowed down" if recheck_sps < probe_sps else "sped up"
            extra = f"; input-bound as well ({share:.0%} of the step)" if bound else ""
            return Agreement(
                "machine-changed",
                True,
                False,
                "the verification and the re-measured step (later, at the machine's current speed)",
                f"{fig}: the machine {word} (the model-only step re-measured at {recheck_sps:,.1f} "
                f"samples/s: other load or thermal throttling){extra}; the batch comparison ran at "
                f"another speed, so this answer is not cached",
            )
    why = []
    if loader_share is not None:
        why.append(f"the loader trial ran at {loader_share:.0%} of the model-only step")
    if recheck_sps is not None:
        why.append(f"the model-only step re-measured at {recheck_sps:,.1f}")
    return Agreement(
        "disagrees",
        False,
        False,
        "neither: measure again on a quieter machine",
        f"{fig}: beyond the noise (±{m:.0%}) and unexplained" + (f" ({'; '.join(why)})" if why else ""),
    )
