"""Loader tuning: each setting judged end to end (the real loader feeding the real step at the planned
micro-batch) against the model-only step, the config's own setting first.

A loader alone that delivers 1.9x the step's rate can still leave the step waiting (its workers compete with
the training process for the CPU, its copies with the step for the device), so a setting is judged by what
training sees: end-to-end samples/s over a window long enough to drain the prefetch queue filled while the
workers started (warm-up: the queue's depth plus two batches; then at least three queues' worth of timed
steps), as a share of the model-only step (a synthetic batch already on the device) measured right before and
right after that window: the same machine state, so a machine whose speed changes (other jobs, clocks) between
trials or since the search cannot decide. A setting keeps up when the model-only step does not beat it beyond
the noise.

The file pre-check and the cache's decode run once per autotune, not per setting: :func:`reuse_file_checks`
remembers the pre-check's answer for a file list, and the last setting measured hands its open loader to the
verification. The memory a DALI loader holds outside torch's allocator is read with NVML while it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fasttrain import memory
from fasttrain.config import Config, DataConfig
from fasttrain.data import loaders
from fasttrain.data.progressive import train_sizes
from fasttrain.timing import cycle_batches, time_steps, time_window, train_step_fn
from fasttrain.tuning.search import choose_loader, loader_share, spread_of

log = logging.getLogger("fasttrain.tuning")

__all__ = [
    "LoaderTrial",
    "LoaderResult",
    "loader_ladder",
    "queue_depth",
    "resident_bytes",
    "reuse_file_checks",
    "tune_loader",
]


@dataclass
class LoaderTrial:
    setting: dict[str, Any]
    """The data.* values tried."""
    samples_per_s: float | None
    """End to end: the loader feeding the train step."""
    spread: float = 0.0
    rates: list[float] = field(default_factory=list)
    model_samples_per_s: float | None = None
    """The model-only step (synthetic batch), measured right before and after the end-to-end window."""
    model_spread: float = 0.0
    model_rates: list[float] = field(default_factory=list)
    share: float | None = None
    """End-to-end samples/s as a share of the model-only step's."""
    keeps_up: bool = False
    given: bool = False
    """The config's own setting."""
    seconds: float = 0.0
    outside_torch_bytes: int | None = None
    """Device memory the loader holds outside torch's allocator (NVML, CUDA only)."""
    reliable: bool = True
    """False when the spread stayed above tune.max_spread after a second measurement."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderTrial:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LoaderResult:
    backend: str
    trials: list[LoaderTrial]
    setting: dict[str, Any]
    """What the tuned config gets: data.loader (the backend measured, so `auto` cannot pick another) and knobs."""
    samples_per_s: float | None
    """The kept setting's end-to-end samples/s."""
    spread: float
    model_samples_per_s: float | None
    """The model-only step measured alongside the kept setting."""
    model_spread: float
    keeps_up: bool
    note: str
    outside_torch_bytes: int | None = None
    loader: Any = field(default=None, repr=False, compare=False)
    """The kept setting's loader, still open, when it was the last one measured (handed to the verification)."""

    @property
    def input_bound(self) -> bool:
        return not self.keeps_up

    @property
    def reliable(self) -> bool:
        return all(t.reliable for t in self.trials)

    @property
    def share(self) -> float | None:
        if not (self.samples_per_s and self.model_samples_per_s):
            return None
        return self.samples_per_s / self.model_samples_per_s

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loader"}
        d["trials"] = [t.to_dict() for t in self.trials]
        d["input_bound"], d["share"], d["reliable"] = self.input_bound, self.share, self.reliable
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"loader"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["trials"] = [LoaderTrial.from_dict(t) for t in d.get("trials", [])]
        return cls(**kw)


def loader_ladder(backend: str, data: DataConfig, device_type: str = "cuda") -> list[dict[str, Any]]:
    """Settings to try: the backend's knobs (:meth:`~fasttrain.data.base.Backend.knobs`), the config's own first,
    then the others cheapest first; at most 4 in all. ``[{}]``: nothing to tune, the one setting is measured."""
    return loaders.backend(backend).knobs(data, device_type)[:4] or [{}]


def queue_depth(backend: str, data: DataConfig) -> int:
    """Batches the backend's loader prepares ahead (:meth:`~fasttrain.data.base.Backend.queue_depth`)."""
    return loaders.backend(backend).queue_depth(data)


@contextlib.contextmanager
def reuse_file_checks() -> Iterator[dict]:
    """Within the block, the file pre-check every loader runs over its whole split when it is built (reading each
    file's header: minutes on 1.28 M files) answers each file list once, whichever backend and loader setting asks
    (:func:`fasttrain.data.checks.remembered_prechecks`)."""
    from fasttrain.data.checks import remembered_prechecks

    with remembered_prechecks() as memo:
        yield memo


def _same(x: Any) -> Any:
    return x


def _measure_trial(
    model_step: Callable[[], int],
    e2e_step: Callable[[], int],
    *,
    depth: int,
    repeats: int,
    repeat_s: float,
    accumulation: int,
    device,
) -> tuple[list[float], list[float], int | None]:
    """(model-only rates, end-to-end rates, memory outside torch while the loader ran): model-only windows right
    before and after the end-to-end ones, so both see the same machine. The queue the loader fills meanwhile is
    drained by the end-to-end warm-up (its depth plus two batches); then at least three queues' worth of steps."""
    half, cap = max(1, -(-repeats // 2)), 4 * repeat_s
    m1 = time_window(
        model_step,
        warmup=1,
        repeats=half,
        seconds=repeat_s,
        step_multiple=accumulation,
        device=device,
        reset_peak=False,
        max_repeat_s=cap,
    )
    e2e = time_window(
        e2e_step,
        warmup=depth + 2,
        repeats=repeats,
        seconds=repeat_s,
        min_steps=max(1, math.ceil(3 * depth / repeats)),
        step_multiple=accumulation,
        device=device,
        clock="wall",
        reset_peak=False,
        max_repeat_s=max(cap, 2 * repeat_s),
    )
    outside = memory.outside_torch_bytes(device)  # while the loader is alive
    m2 = time_steps(
        model_step, warmup=1, steps=m1.steps, repeats=half, device=device, reset_peak=False, max_repeat_s=cap
    )
    return [*m1.per_repeat_samples_per_s, *m2.per_repeat_samples_per_s], list(e2e.per_repeat_samples_per_s), outside


def tune_loader(
    cfg: Config,
    runtime,
    source,
    backend: str,
    *,
    micro: int,
    accumulation: int,
    state,
    noise: float,
    warmup: int,
    repeats: int,
    repeat_s: float,
    max_spread: float = float("inf"),
    time_left: Callable[[], float] | None = None,
    stamp: Callable[[], str] = lambda: "",
    make_task: Callable | None = None,
) -> LoaderResult:
    """Measure the config's own loader setting end to end at ``micro`` with ``state`` (the probe's or the
    compiled check's), then the ladder's others (the backend's knobs), cheapest first, until one keeps up with
    the model-only step or time runs out; keep the highest share of the model-only step (ties: the given setting,
    else the cheaper). A trial whose spread exceeds ``max_spread`` is measured once more, then marked unreliable."""
    if make_task is None:
        from fasttrain.tasks import make_task as make_task_
    else:
        make_task_ = make_task
    trials: list[LoaderTrial] = []
    open_loader, open_index = None, None
    ladder = loader_ladder(backend, cfg.data, runtime.device.type)
    window = dict(repeats=repeats, repeat_s=repeat_s, accumulation=accumulation, device=runtime.device)
    try:
        for i, setting in enumerate(ladder):
            if i and time_left is not None and time_left() < trials[-1].seconds:
                log.info("autotune [%s] loader: %d setting(s) not tried (time budget)", stamp(), len(ladder) - i)
                break
            if open_loader is not None:
                open_loader.close()
                open_loader = open_index = None
            data = dataclasses.replace(cfg.data, **setting)
            task = make_task_(dataclasses.replace(cfg, data=data), runtime, source)
            t0 = time.perf_counter()
            memory.release_dali_pools()  # what an earlier trial's pipeline left in DALI's pools is not this one's
            before = memory.outside_torch_bytes(runtime.device)
            loader = task.make_loader(source.train, train=True, batch_size=micro, backend=backend)
            open_loader, open_index = loader, i
            window["depth"] = queue_depth(backend, data)
            trial = _trial(task, loader, state, setting, micro, window, max_spread, time_left, t0, before)
            trial.given = i == 0
            _, trial.keeps_up = choose_loader([trial], noise)
            trials.append(trial)
            _log_trial(stamp(), backend, trial)
            if trial.keeps_up:
                break
        pick, keeps_up = choose_loader(trials, noise, given=0)
    except BaseException:
        if open_loader is not None:
            open_loader.close()
        raise
    if open_index != pick and open_loader is not None:
        open_loader.close()
        open_loader = None
    return _result(backend, trials, pick, keeps_up, open_loader)


def _trial(
    task,
    loader,
    state,
    setting: dict[str, Any],
    micro: int,
    window: dict[str, Any],
    max_spread: float,
    time_left: Callable[[], float] | None,
    t0: float,
    before: int | None,
) -> LoaderTrial:
    """One setting measured end to end (:func:`_measure_trial`), once more when its spread is over
    ``max_spread`` and there is time; ``t0`` and ``before``: the clock and the memory outside torch before the
    loader was built."""
    first = train_sizes(task.cfg).first_largest_epoch  # progressive: time the largest size
    loader.set_epoch(first)
    it = cycle_batches(loader, first)
    batch = task.synthetic_batch(micro, task.input_spec(), train=True)
    accumulation = window["accumulation"]
    model_step = train_step_fn(task, state, functools.partial(_same, batch), accumulation)
    e2e_step = train_step_fn(task, state, functools.partial(next, it), accumulation)
    model_rates, e2e_rates, after = _measure_trial(model_step, e2e_step, **window)
    outside = after - before if after is not None and before is not None else None
    reliable = max(spread_of(model_rates), spread_of(e2e_rates)) <= max_spread
    if not reliable and (time_left is None or time_left() > time.perf_counter() - t0):
        # A burst of other load in one window: once more, kept when steady, else both and unreliable.
        model_b, e2e_b, _ = _measure_trial(model_step, e2e_step, **window)
        reliable = max(spread_of(model_b), spread_of(e2e_b)) <= max_spread
        model_rates, e2e_rates = (model_b, e2e_b) if reliable else (model_rates + model_b, e2e_rates + e2e_b)
    trial = LoaderTrial(
        setting,
        statistics.median(e2e_rates),
        spread_of(e2e_rates),
        e2e_rates,
        seconds=time.perf_counter() - t0,
        outside_torch_bytes=outside,
        reliable=reliable,
    )
    trial.model_rates = model_rates
    trial.model_samples_per_s = statistics.median(model_rates)
    trial.model_spread = spread_of(model_rates)
    trial.share = loader_share(trial)[0]
    return trial


def _log_trial(stamp: str, backend: str, trial: LoaderTrial) -> None:
    log.info(
        "autotune [%s] loader %s %s: %s samples/s end to end ±%.0f%%, %.0f%% of the model-only step "
        "measured alongside (%s)%s%s",
        stamp,
        backend,
        trial.setting or "(no knobs)",
        f"{trial.samples_per_s:,.1f}",
        100 * trial.spread / 2,
        100 * (trial.share or 0.0),
        f"{trial.model_samples_per_s:,.1f}",
        ", keeps up" if trial.keeps_up else "",
        "" if trial.reliable else " UNRELIABLE",
    )


def _result(backend: str, trials: list[LoaderTrial], pick: int, keeps_up: bool, loader: Any) -> LoaderResult:
    """The kept setting as the tuned config gets it, with its figures and a note in words."""
    kept = trials[pick]
    name = kept.setting or "no knobs"
    fig = (
        f"{name} delivers {kept.samples_per_s:,.1f} samples/s end to end, {kept.share:.0%} of the model-only "
        f"step's {kept.model_samples_per_s:,.1f}"
    )
    note = f"keeps up: {fig} (within the noise)" if keeps_up else f"input-bound: {fig}; expect about that in training"
    if not kept.given:
        note += f" (the config's own {trials[0].setting}: {trials[0].share:.0%})"
    return LoaderResult(
        backend,
        trials,
        {"loader": backend, **kept.setting},
        kept.samples_per_s,
        kept.spread,
        kept.model_samples_per_s,
        kept.model_spread,
        keeps_up,
        note,
        kept.outside_torch_bytes,
        loader,
    )


def resident_bytes(backend: str, cfg: Config, prep) -> int:
    """Device bytes ``backend`` holds for the whole run, beside the batches, over the samples ``prep``'s task
    reads (:meth:`~fasttrain.data.base.Backend.resident_bytes`: the GPU cache's decoded dataset, sized as the
    backend choice sized it); 0 for a backend that streams."""
    return loaders.backend(backend).resident_bytes(prep.task.run_samples(), cfg)
