"""Batch-size and loader autotuning: the best samples/s that fits a memory budget, backed by measurements, written
to a new config.

The layers, one module each:

- :mod:`~fasttrain.tuning.search` (pure, no torch): noise-aware comparison, the batch-size search, the
  choice, batch plans, the loader choice, the verification verdict;
- :mod:`~fasttrain.tuning.probe`: the budget, the step probe, the compiled check, the verification run;
- :mod:`~fasttrain.tuning.loader`: loader settings judged end to end against the model-only step;
- :mod:`~fasttrain.tuning.report`: the typed report, its table, JSON, PNG and the tuned TOML;
- :mod:`~fasttrain.tuning.cache`: answers keyed by the whole resolved config minus an explicit ignore list;
- here, :func:`autotune`: the entry point that runs them in order inside ``runtime.flags()``.

Order and time: the config's own micro-batch is probed first (the baseline every change must beat beyond the
noise), then the search, then (compile on) one compiled check at the planned micro-batch, then the loader
settings at that micro-batch, then the verification. ``tune.time_budget_s`` bounds the whole call, compile
excluded: the search may use the first 60 % of it, the loader trials up to 80 %, the verification the rest (at
least a short window: an answer is never handed out unverified because time ran short).

Compile: the search probes **eagerly** and compiles **once**, at the planned micro-batch. Compiling per
candidate costs a compile per batch size, and a dynamic batch dimension is not the static program training
runs. Eager memory bounds compiled memory for the step (inductor fuses and saves fewer activations), so an
eager fit is a safe fit; the compiled check measures what training will run and its state is reused by the
loader trials and the verification.

On CPU there is no memory budget: the batch is chosen by samples/s, accumulation is never proposed, and the
config's own batch and loader setting are measured too, so the tuned config is never slower than the given one
beyond the noise.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fasttrain.config import Config
from fasttrain.tuning.search import (
    Agreement,
    BatchPlan,
    Candidate,
    SearchResult,
    Skipped,
    choose_batch,
    judge_verification,
    mark_usable,
    plan_batches,
    search_batch_size,
)

if TYPE_CHECKING:
    from fasttrain.timing import TimeBudget
    from fasttrain.tuning.loader import LoaderResult
    from fasttrain.tuning.probe import Budget, ProbeSettings
    from fasttrain.tuning.report import AutotuneReport

log = logging.getLogger("fasttrain.tuning")

__all__ = [
    "autotune",
    "AutotuneReport",
    "Candidate",
    "SearchResult",
    "Skipped",
    "BatchPlan",
    "Budget",
    "Agreement",
    "Verification",
    "LoaderTrial",
    "LoaderResult",
    "StepProbe",
    "search_batch_size",
    "choose_batch",
    "plan_batches",
    "judge_verification",
    "loader_ladder",
    "tune_loader",
    "setup_budget",
    "release_budget",
    "is_oom_error",
    "plot_report",
    "tuned_config",
]

# Names from the modules that need torch, loaded on first use: the pure search imports without torch.
_LAZY = {
    "AutotuneReport": "report",
    "plot_report": "report",
    "tuned_config": "report",
    "Budget": "probe",
    "StepProbe": "probe",
    "Verification": "probe",
    "setup_budget": "probe",
    "release_budget": "probe",
    "LoaderTrial": "loader",
    "LoaderResult": "loader",
    "loader_ladder": "loader",
    "tune_loader": "loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"fasttrain.tuning.{_LAZY[name]}"), name)
    if name == "is_oom_error":
        from fasttrain.memory import is_oom_error

        return is_oom_error
    raise AttributeError(f"module 'fasttrain.tuning' has no attribute {name!r}")


SEARCH_SHARE = 0.6
"""The search stops probing once this share of tune.time_budget_s is spent."""
LOADER_SHARE = 0.8
"""Loader settings are tried until this share is spent; the verification gets the rest."""
_FAILURE_TEXT = {
    "oom": "out of memory",
    "retries": "allocator retries",
    "headroom": "over the headroom",
    "budget": "over the budget",
}


def autotune(
    cfg: Config,
    *,
    memory_budget_gib: float | None = None,
    out_dir: str | os.PathLike | None = None,
    verify: bool = True,
    use_cache: bool = True,
    time_budget_s: float | None = None,
    model: Any = None,
    dataset: Any = None,
    val_dataset: Any = None,
) -> AutotuneReport:
    """Find the batch size with the best train-step samples/s that fits the budget and the loader setting that
    keeps up, verify them end to end, and write a tuned config (table, JSON, PNG) into ``out_dir`` (default:
    ``train.runs_dir/autotune-<name>-<time>``). The input config file is never touched.

    ``memory_budget_gib`` defaults to ``tune.memory_budget_gib`` and ``time_budget_s`` to
    ``tune.time_budget_s``. Reliable, ok answers are cached under ``tune.cache_dir`` (default
    ``~/.cache/fasttrain/autotune``, or ``$FASTTRAIN_CACHE/autotune``); ``use_cache=False`` ignores the cache
    (and refreshes it). ``verify`` runs about ``tune.verify_s`` seconds of training plus evaluation batches on
    the real data at the tuned settings, under the same budget. ``model``, ``dataset``, ``val_dataset``: your
    own, as :func:`fasttrain.train` takes them (answers for them are not cached: the config cannot name them).
    """
    from fasttrain.runtime import environment, runtime_for
    from fasttrain.timing import TimeBudget
    from fasttrain.tuning import cache
    from fasttrain.tuning.report import write_outputs

    t_start = time.perf_counter()
    budget_gib = float(memory_budget_gib if memory_budget_gib is not None else cfg.tune.memory_budget_gib)
    if budget_gib <= 0:
        raise ValueError(f"--memory-budget: must be > 0 GiB, got {budget_gib:g}")
    seconds = float(time_budget_s if time_budget_s is not None else cfg.tune.time_budget_s)
    if seconds <= 0:
        raise ValueError(f"--time-budget / tune.time_budget_s: must be > 0 seconds, got {seconds:g}")
    clock = TimeBudget(seconds)
    from fasttrain.distributed import dist_info
    from fasttrain.io import check_writable

    if dist_info().is_main:  # the outputs are written after a search of minutes: a read-only folder fails now
        check_writable(out_dir if out_dir is not None else cfg.train.runs_dir, "autotune --out")
    python_args = dict(model=model, dataset=dataset, val_dataset=val_dataset)
    from_python = any(v is not None for v in python_args.values())
    use_cache = use_cache and not from_python
    runtime = runtime_for(cfg)
    fields = cache.key_fields(cfg, budget_gib=budget_gib, machine_info=cache.machine(runtime))
    cache_path = cache.cache_dir_for(cfg) / f"{cache.cache_key(fields)}.json"
    if use_cache:
        report = _cached(cache, cache_path, fields, cfg.dist.timeout_s)
        if report is not None:
            from fasttrain.distributed import dist_info

            report.cached, report.cache_path, report.files = True, str(cache_path), {}
            report.config_name = cfg.name
            report.world_size = dist_info().world_size
            if not dist_info().is_main:
                return report  # every rank read the same answer; rank 0 writes the files
            report.elapsed_s = time.perf_counter() - t_start  # before the files, so the JSON holds it
            write_outputs(cfg, report, _out_dir(cfg, out_dir))
            report.elapsed_s = time.perf_counter() - t_start
            log.info("autotune: answered from the cache %s", cache_path)
            return report

    with runtime.flags():
        report = _tune(cfg, budget_gib, verify=verify, clock=clock, python_args=python_args)
    report = _agree(report)
    from fasttrain import distributed  # imports torch: not at module level (the search must not)

    if not distributed.current().is_main:
        return report  # rank 0 writes the files and the cache
    report.environment = environment(runtime.device)
    report.elapsed_s = time.perf_counter() - t_start
    if report.ok and not report.reliable:
        report.notes.append("not cached: the answer is unreliable (see below); ask again on a quieter machine")
    write_outputs(cfg, report, _out_dir(cfg, out_dir))
    report.elapsed_s = time.perf_counter() - t_start
    if from_python:
        report.notes.append("not cached: the model or dataset came from Python, which the config cannot name")
    elif report.ok and report.reliable:
        try:
            cache.store(cache_path, fields, report)
            report.cache_path = str(cache_path)
        except OSError as e:
            report.notes.append(f"cache not written ({cache_path}: {e})")
    return report


def _cached(cache: Any, path: Path, fields: dict[str, Any], timeout_s: float) -> AutotuneReport | None:
    """The cached answer, rank 0's under torchrun (sent to all): a rank that found one and left while another,
    whose node keeps no cache, searched alone used to hang the job."""
    from fasttrain import distributed
    from fasttrain.tuning.report import AutotuneReport

    def rank0() -> dict[str, Any] | None:
        found = cache.load(path, fields)
        return found.to_dict() if found is not None else None

    found = distributed.decide("autotune-cache", rank0, timeout_s)
    return AutotuneReport.from_dict(found) if found is not None else None


def _agree(report: AutotuneReport) -> AutotuneReport:
    """Under torchrun every process tuned its own GPU for its share of the global batch; all of them take rank 0's
    answer (sent as its JSON form: open loaders stay where they are)."""
    from fasttrain import distributed
    from fasttrain.tuning.report import AutotuneReport

    info = distributed.current()
    if not info.enabled:
        return report
    if report.loader is not None and report.loader.loader is not None:
        report.loader.loader.close()
        report.loader.loader = None
    agreed = AutotuneReport.from_dict(distributed.broadcast_object(report.to_dict()))
    agreed.world_size = info.world_size
    return agreed


def _out_dir(cfg: Config, out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else runs_dir/autotune-<config name>-<date>-<time>, created now (a suffix where it exists)."""
    if out_dir is not None:
        return Path(out_dir).expanduser()
    from fasttrain.rundir import new_run_dir, run_name

    return new_run_dir(cfg.train.runs_dir, run_name(cfg.name, prefix="autotune-"))


def _tune(
    cfg: Config, budget_gib: float, *, verify: bool, clock: TimeBudget, python_args: dict[str, Any] | None = None
) -> AutotuneReport:
    from fasttrain.memory import GIB, free_device_memory
    from fasttrain.prepare import prepare
    from fasttrain.runtime import seed_everything
    from fasttrain.tuning.loader import reuse_file_checks
    from fasttrain.tuning.probe import release_budget, setup_budget
    from fasttrain.tuning.report import AutotuneReport

    # The GPU cache is chosen against the budget, not the whole (maybe larger) card.
    prep = prepare(cfg, memory_limit=int(budget_gib * GIB), host_check=False, **(python_args or {}))
    if prep.dist.enabled:
        # Under torchrun each process tunes its own GPU for its share of the global batch (prepare checked that it
        # divides); the answer is per GPU, and the tuned config multiplies it back.
        share = dataclasses.replace(prep.cfg.train, batch_size=prep.cfg.train.batch_size // prep.dist.world_size)
        prep = dataclasses.replace(prep, cfg=dataclasses.replace(prep.cfg, train=share))
    pcfg, source, runtime = prep.cfg, prep.source, prep.runtime
    tune = pcfg.tune
    seed_everything(pcfg.runtime.seed)
    device = runtime.device
    budget = setup_budget(device, budget_gib)
    notes: list[str] = []
    n_train = len(source.train)
    max_batch, cap_reason = tune.max_batch, "tune.max_batch"
    if n_train < max_batch:
        max_batch = max(min(n_train, max_batch), tune.min_batch)
        cap_reason = f"the training set's size, {n_train} images"
        notes.append(f"batch sizes capped at the training set's {n_train} images")
    if device.type == "cpu":
        # On CPU host memory is the budget: sizes whose step would not fit the memory available are not probed.
        from fasttrain import memory
        from fasttrain.runtime import host_batch_limit, model_profile

        available, profile = memory.available_host_bytes(), model_profile(pcfg)
        if available is not None and profile is not None:
            fits = host_batch_limit(profile, runtime.precision.name, available)
            if fits < max_batch:
                max_batch = max(fits, 1)
                cap_reason = f"the host's free memory ({memory.format_bytes(available, 'GiB')})"
                notes.append(f"batch sizes capped at {max_batch}: the most that fits {cap_reason}")
    given: int | None = pcfg.train.micro_batch
    if pcfg.train.micro_batch > n_train:
        notes.append(
            f"the config's micro-batch {pcfg.train.micro_batch} is larger than the training set "
            f"({n_train} images): not measured"
        )
        given = None
    elif cap_reason.startswith("the host's") and pcfg.train.micro_batch > max_batch:
        notes.append(f"the config's micro-batch {pcfg.train.micro_batch} would not fit {cap_reason}: not measured")
        given = None
    report = AutotuneReport(
        config_name=cfg.name,
        model=pcfg.model.name,
        task=pcfg.task.name,
        device=str(device),
        runtime=runtime.describe(),
        input_shape=[pcfg.data.channels, pcfg.data.train_size_max, pcfg.data.train_size_max],  # the largest
        budget=budget,
        headroom=tune.headroom,
        noise=tune.noise,
        multiple=tune.multiple,
        max_batch=max_batch,
        time_budget_s=clock.seconds,
        given_batch=given,
        notes=notes,
    )
    try:
        with reuse_file_checks():
            _run(report, prep, budget, clock, verify=verify, max_batch=max_batch, cap_reason=cap_reason, given=given)
    finally:
        free_device_memory(device)
        release_budget(budget, device)
    return report


def _eval_batch(cfg: Config) -> Callable[[int], int]:
    return (lambda b: cfg.train.eval_batch_size) if cfg.train.eval_batch_size else (lambda b: 2 * b)


def _plan(cfg: Config, chosen: int, fails: Candidate | None, device) -> BatchPlan:
    return plan_batches(
        cfg.train.batch_size,
        chosen,
        multiple=cfg.tune.multiple,
        accumulation=cfg.train.accumulation,
        fails_at=fails.batch_size if fails else None,
        fail_reason=_FAILURE_TEXT.get(fails.failure, "") if fails else "",
        allow_accumulation=device.type == "cuda",
    )


def _first_failure(cands: list[Candidate]) -> Candidate | None:
    bad = [c for c in cands if c.memory_failure]
    return min(bad, key=lambda c: c.batch_size) if bad else None


def _run(
    report: AutotuneReport,
    prep,
    budget: Budget,
    clock: TimeBudget,
    *,
    verify: bool,
    max_batch: int,
    cap_reason: str,
    given: int | None,
) -> None:
    """The stages, in order; ``report`` is filled as they go (an exception leaves what was found so far)."""
    from fasttrain.memory import format_bytes, free_device_memory
    from fasttrain.runtime import runtime_for
    from fasttrain.tuning.loader import tune_loader
    from fasttrain.tuning.probe import ProbeSettings, StepProbe

    pcfg, source, runtime, backend = prep.cfg, prep.source, prep.runtime, prep.backend
    tune, device = pcfg.tune, runtime.device
    stamp = clock.stamp
    eval_batch = _eval_batch(pcfg)
    settings = ProbeSettings(
        warmup=tune.warmup_steps,
        repeats=tune.repeats,
        repeat_s=tune.repeat_s,
        min_steps=tune.measure_steps,
        max_spread=tune.max_spread,
        with_eval=budget.budget_bytes is not None,
    )
    # Eager probes with everything else as configured; compile comes once, at the planned micro-batch.
    eager_task = prep.new_task(pcfg, runtime_for(pcfg, compile="off"))
    probe = StepProbe(
        eager_task,
        budget=budget,
        settings=settings,
        eval_batch=eval_batch,
        stamp=stamp,
        time_left=lambda: clock.left(SEARCH_SHARE),
    )
    log.info(
        "autotune %s: %s; %s; time budget %g s (compile excluded)",
        pcfg.name,
        runtime.describe(),
        budget.describe(),
        clock.seconds,
    )
    resident = _hold_resident_dataset(pcfg, prep, backend, device, budget, report.notes)
    state: Any = None
    loader_result: LoaderResult | None = None
    measure: Callable[..., Candidate] = probe
    if device.type == "cpu":
        measure = _capped_on_cpu(probe, report, pcfg, len(source.train), clock)
    try:
        result = search_batch_size(
            measure,
            min_batch=tune.min_batch,
            max_batch=max_batch,
            multiple=tune.multiple,
            noise=tune.noise,
            budget_bytes=budget.budget_bytes,
            headroom=tune.headroom,
            given=given,
            time_left=lambda: clock.left(SEARCH_SHARE),
            remeasure=probe.remeasure,
            cap_reason=cap_reason,
        )
        report.candidates, report.stop_reason, report.limit = result.candidates, result.stop_reason, result.limit
        report.chosen_batch, report.best_batch, report.not_probed = result.chosen, result.best, result.not_probed
        shaky = [c.batch_size for c in result.candidates if not c.reliable]
        if shaky:
            report.unreliable.append(
                f"batch {', '.join(map(str, shaky))}: repeats spread beyond tune.max_spread "
                f"({tune.max_spread:.0%}) twice (a busy machine?)"
            )
        if result.chosen is None:
            report.error = (
                f"{result.stop_reason}; lower tune.min_batch / tune.multiple, the image size or the "
                f"model, or raise --memory-budget"
            )
            report.probe_mode = "eager probes; nothing fit, so nothing was compiled"
            return
        plan = _plan(pcfg, result.chosen, _first_failure(result.candidates), device)
        by_size = result.by_size()
        log.info(
            "autotune [%s] search: %s; chosen %s (best %s, the config's own %s)",
            stamp(),
            result.stop_reason,
            result.chosen,
            result.best,
            given,
        )
        if plan.micro_batch not in by_size:  # a split of the global batch: measure the micro-batch it runs
            c = mark_usable(probe(plan.micro_batch, "plan"), budget.budget_bytes, tune.headroom)
            report.candidates.append(c)
            by_size[c.batch_size] = c
        reference: Candidate | None = by_size[plan.micro_batch]
        assert reference is not None
        if not reference.usable:
            report.error = f"the planned micro-batch {plan.micro_batch} is not usable: {reference.error}"
            return
        # The probe's state is handed over (or dropped): a failed stage must not leave it holding memory.
        state, probe.state = (None if runtime.compile else probe.state), None
        probe.close()
        if runtime.compile:
            report.probe_mode = (
                "eager search (a compile per candidate would cost a compile per size; a dynamic "
                "batch dimension is not the static program training runs); compiled once at the "
                "planned micro-batch, its state reused by the loader trials and the verification"
            )
            state, compiled, plan = _compile(report, prep, budget, settings, clock, plan, by_size)
            if compiled is None:
                report.error = "the compiled step does not fit at any usable batch size tried"
                return
            reference = compiled
        else:
            report.probe_mode = "runtime.compile is off: the eager probes are the step training runs"
        resident = None  # the loader trials and the verification build the real cache
        free_device_memory(device)
        if state is None:
            state = prep.task.build_state()
        loader_result = tune_loader(
            pcfg,
            runtime,
            source,
            backend,
            micro=plan.micro_batch,
            accumulation=plan.accumulation,
            state=state,
            noise=tune.noise,
            warmup=tune.warmup_steps,
            repeats=tune.repeats,
            repeat_s=tune.repeat_s,
            max_spread=tune.max_spread,
            time_left=lambda: clock.left(LOADER_SHARE),
            stamp=stamp,
            make_task=lambda c, r, _source: prep.new_task(c, r),
        )
        report.loader, report.plan = loader_result, plan
        if not loader_result.reliable:
            report.unreliable.append("a loader trial's repeats spread beyond tune.max_spread twice (a busy machine?)")
        if _charge_loader_memory(report, budget, device):
            # The loader's own memory pushed the plan's micro-batch over the headroom: a smaller one, measured.
            report.chosen_batch, _ = choose_batch(report.candidates, tune.noise, prefer=given)
            if report.chosen_batch is None:
                report.error = (
                    f"with the loader's {format_bytes(budget.outside_torch_bytes, 'GiB')} outside torch, "
                    f"no batch size probed leaves {tune.headroom:.0%} headroom"
                )
                return
            report.notes.append(
                f"micro-batch {plan.micro_batch} no longer leaves the headroom once the loader's "
                f"{format_bytes(budget.outside_torch_bytes, 'GiB')} are charged: "
                f"{report.chosen_batch} instead"
            )
            if loader_result.loader is not None:
                loader_result.loader.close()
            loader_result.loader = state = None
            free_device_memory(device)
            plan = _plan(pcfg, report.chosen_batch, _first_failure(report.candidates), device)
            reference = by_size.get(plan.micro_batch)
            if runtime.compile:
                state, reference, plan = _compile(report, prep, budget, settings, clock, plan, by_size)
                if reference is None:
                    report.error = "the compiled step does not fit at any usable batch size tried"
                    return
            report.plan = plan
        if reference is not None and reference.batch_size != plan.micro_batch:
            reference = None  # the verification measures the model-only step at its micro-batch itself
        if not (verify and tune.verify_s > 0):
            report.notes.append("verification skipped (--no-verify or tune.verify_s = 0)")
            return
        _verify(report, prep, budget, settings, clock, plan, state, reference, given)
        state = None
    finally:
        if loader_result is not None and loader_result.loader is not None:
            loader_result.loader.close()
            loader_result.loader = None
        state = resident = None  # noqa: F841 - drop the last references before handing memory back
        probe.close()


def _capped_on_cpu(probe, report: AutotuneReport, cfg: Config, n_train: int, clock: TimeBudget):
    """``probe``, which after its first measurement (the config's own batch) caps ``clock`` at half the training
    run it tunes (:func:`~fasttrain.tuning.search.cpu_time_cap`)."""
    from fasttrain.tuning.search import CPU_TUNE_SHARE, cpu_time_cap

    tc = cfg.train
    job = tc.epochs * (n_train // max(tc.batch_size, 1)) * tc.batch_size
    if tc.max_steps:
        job = min(job, tc.max_steps * tc.batch_size)
    setup_s = clock.elapsed()
    done = False

    def measure(b: int, phase: str = "") -> Candidate:
        nonlocal done
        c = probe(b, phase)
        if not done and c.samples_per_s:
            done = True
            cap = cpu_time_cap(clock.seconds, job_samples=job, samples_per_s=c.samples_per_s, setup_s=setup_s)
            if cap < clock.seconds:
                report.notes.append(
                    f"time budget {cap:.0f} s on CPU: {CPU_TUNE_SHARE:.0%} of the training it tunes (about "
                    f"{setup_s:.0f} s of set-up + {job} samples at {c.samples_per_s:,.0f} samples/s)"
                )
                log.info("autotune [%s] %s", clock.stamp(), report.notes[-1])
                clock.seconds = cap
                report.time_budget_s = cap
        return c

    return measure


def _compile(
    report: AutotuneReport,
    prep,
    budget: Budget,
    settings: ProbeSettings,
    clock: TimeBudget,
    plan: BatchPlan,
    by_size: dict[int, Candidate],
):
    """The compiled check at the plan's micro-batch, else the next usable sizes below; (state, compiled
    candidate or None, plan). The compile (the checks' warm-up) is not charged to the time budget."""
    from fasttrain.tuning.probe import compiled_check

    pcfg, tune, device = prep.cfg, prep.cfg.tune, prep.runtime.device
    smaller = sorted((b for b, c in by_size.items() if c.usable and b < plan.micro_batch), reverse=True)
    state, got, tried = compiled_check(
        prep.task,
        budget=budget,
        settings=settings,
        eval_batch=_eval_batch(pcfg),
        sizes=[plan.micro_batch, *smaller],
        headroom=tune.headroom,
        stamp=clock.stamp,
    )
    for c in tried:
        clock.exclude(c.untimed_s)
        report.compile_s += c.untimed_s
    report.compiled_tried += tried
    report.compiled = got
    if got is None:
        return None, None, plan
    if got.batch_size != plan.micro_batch:
        report.notes.append(
            f"micro-batch lowered from {plan.micro_batch} to {got.batch_size}: the compiled step did "
            f"not fit at the larger size"
        )
        report.chosen_batch = min(report.chosen_batch or got.batch_size, got.batch_size)
        plan = _plan(pcfg, got.batch_size, _first_failure([*report.candidates, *tried]), device)
        if plan.micro_batch != got.batch_size:
            report.notes.append(
                f"the plan's micro-batch {plan.micro_batch} was not compiled here: the loader trials "
                f"and the verification compile it once more"
            )
    return state, got, plan


def _charge_loader_memory(report: AutotuneReport, budget: Budget, device) -> bool:
    """Charge what the loader holds outside torch (measured with NVML while it ran) to the budget and mark every
    candidate again; True when the plan's micro-batch no longer leaves the headroom."""
    from fasttrain.tuning.probe import charge_outside

    lr, plan = report.loader, report.plan
    if lr is None or plan is None or budget.budget_bytes is None or not lr.outside_torch_bytes:
        return False
    charge_outside(budget, device, lr.outside_torch_bytes)
    for c in [*report.candidates, *report.compiled_tried]:
        if c.fits:
            mark_usable(c, budget.budget_bytes, report.headroom, budget.outside_torch_bytes)
    ref = (
        report.compiled
        if report.compiled is not None
        else next((c for c in report.candidates if c.batch_size == plan.micro_batch), None)
    )
    return ref is not None and not ref.usable


def _verify(
    report: AutotuneReport,
    prep,
    budget: Budget,
    settings: ProbeSettings,
    clock: TimeBudget,
    plan: BatchPlan,
    state,
    reference: Candidate | None,
    given: int | None,
) -> None:
    """The verification; after memory evidence against the micro-batch (out of memory, retries, over the
    budget) the next smaller usable size, at most twice more. A disagreement with the probe without memory
    evidence is measured again twice as long; if it stays, the answer stands marked unreliable, and a change
    of the config's own batch gives way to it. On CPU a changed batch is run against the config's own end to
    end and kept only when faster beyond the noise: a tuned config is never slower than the original."""
    from fasttrain.memory import free_device_memory
    from fasttrain.tuning.probe import verify
    from fasttrain.tuning.report import tuned_config

    pcfg, source, runtime = prep.cfg, prep.source, prep.runtime
    tune, device = pcfg.tune, runtime.device
    lr = report.loader
    assert lr is not None  # the loader trials ran before
    loader = lr.loader
    lr.loader = None

    def run(plan: BatchPlan, state, reference: Candidate | None, loader, seconds: float):
        tuned, _ = tuned_config(pcfg, plan, lr.setting)
        return verify(
            prep.new_task(tuned, runtime),
            source,
            backend=lr.backend,
            state=state,
            plan=plan,
            budget=budget,
            seconds=seconds,
            noise=tune.noise,
            settings=settings,
            reference=reference,
            loader=loader,
            loader_share=lr.share,
            loader_spread=lr.spread + lr.model_spread,
            eval_batch_size=tuned.train.eval_batch,
            stamp=clock.stamp,
        )

    failed_sizes: set[int] = set()  # memory evidence against these: the config's own is not returned to
    for attempt in range(3):
        own = None if given in failed_sizes else given
        seconds = max(min(tune.verify_s, clock.left()), min(1.0, tune.verify_s))
        v, state = run(plan, state, reference, loader, seconds)
        loader = None
        if not v.ok and not v.failure and clock.left() >= seconds:
            # Unexplained disagreement, no memory evidence: noise until shown otherwise. Measure longer once.
            log.info("autotune [%s] verification disagrees with the probe: measuring twice as long", clock.stamp())
            v, state = run(plan, state, reference, None, 2 * seconds)
        report.verify, report.plan = v, plan
        if v.agreement is not None and not v.agreement.reliable:
            report.unreliable.append(v.agreement.text)
        if not v.ok and not v.failure:
            # Still unexplained: the answer stands, marked less sure (and not cached); a change of batch it
            # cannot confirm end to end gives way to the config's own.
            v.ok, v.error = True, ""
            report.notes.append(
                "the verification disagrees with the probe beyond the noise (measured twice as long as well): "
                "the answer stands, marked unreliable and not cached"
            )
            _keep_given(report, prep, clock, plan, own, run, why="unconfirmed")
            return
        if v.ok:
            report.error = ""
            if not runtime.is_cuda:
                _keep_given(report, prep, clock, plan, own, run, why="compare")
            return
        report.error = f"verification failed: {v.error}"
        failed = Candidate(plan.micro_batch, False, failure=v.failure, error=v.error, phase="verify")
        failed_sizes.add(plan.micro_batch)
        smaller = [c for c in report.candidates if c.usable and c.batch_size < plan.micro_batch]
        if attempt == 2 or not smaller:
            return
        chosen, _ = choose_batch(smaller, tune.noise, prefer=given)
        assert chosen is not None  # smaller holds usable candidates
        report.notes.append(f"verification at micro-batch {plan.micro_batch} failed ({v.error}); trying {chosen}")
        report.chosen_batch = chosen
        state = None
        free_device_memory(device)
        plan = _plan(pcfg, chosen, _first_failure([*report.candidates, failed]), device)
        by_size = {c.batch_size: c for c in report.candidates}
        reference = by_size.get(plan.micro_batch)  # None: the verification measures the step itself
        if runtime.compile:
            state, compiled, plan = _compile(report, prep, budget, settings, clock, plan, by_size)
            if compiled is None:
                report.error = "the compiled step does not fit at any smaller usable batch size"
                return
            reference = compiled if compiled.batch_size == plan.micro_batch else None


def _keep_given(
    report: AutotuneReport, prep, clock: TimeBudget, plan: BatchPlan, given: int | None, run, *, why: str
) -> BatchPlan:
    """Where the plan changes the config's own micro-batch: ``why = "compare"`` (CPU) runs the config's own end
    to end as well and keeps the change only when it is faster beyond the noise; ``why = "unconfirmed"`` keeps
    the config's own outright (the verification could not confirm the change). Returns the plan kept."""
    from fasttrain.tuning.search import beats

    pcfg, tune, device = prep.cfg, prep.cfg.tune, prep.runtime.device
    by_size = {c.batch_size: c for c in report.candidates}
    if given is None or plan.micro_batch == given:
        return plan
    own = by_size.get(given)
    if own is None or not own.usable:
        return plan
    own_plan = _plan(pcfg, given, None, device)
    if own_plan.micro_batch != given or own_plan.accumulation != pcfg.train.accumulation:
        return plan
    changed = report.verify
    if why == "compare":
        seconds = changed.window_s if changed is not None and changed.window_s else tune.verify_s
        mine, _ = run(own_plan, None, own, None, seconds)
        if mine.samples_per_s is None or changed is None or changed.samples_per_s is None:
            return plan
        if beats(changed, mine, tune.noise):
            report.notes.append(
                f"end to end, micro-batch {plan.micro_batch} ran at {changed.samples_per_s:,.1f} samples/s "
                f"against the config's own {given} at {mine.samples_per_s:,.1f}: faster beyond the noise"
            )
            return plan
        text = (
            f"end to end, micro-batch {plan.micro_batch} ran at {changed.samples_per_s:,.1f} samples/s against "
            f"the config's own {given} at {mine.samples_per_s:,.1f}: not faster beyond the noise"
        )
        mine.ok, mine.error = True, ""
        report.verify = mine
    else:
        text = f"the verification could not confirm micro-batch {plan.micro_batch} end to end"
    report.notes.append(f"{text}; keeping the config's own micro-batch {given}")
    log.info("autotune [%s] %s; keeping the config's own micro-batch %s", clock.stamp(), text, given)
    report.chosen_batch, report.plan = given, own_plan
    return own_plan


def _hold_resident_dataset(cfg: Config, prep, backend: str, device, budget: Budget, notes: list[str]):
    """A backend that keeps the decoded dataset on the device for the whole run (the GPU cache): hold a
    placeholder of its size during the probes so it counts against the budget as it will in training
    (:func:`fasttrain.tuning.loader.resident_bytes`)."""
    from fasttrain.tuning.loader import resident_bytes

    if device.type != "cuda":
        return None
    nbytes = resident_bytes(backend, cfg, prep)
    if nbytes <= 0:
        return None
    import torch

    from fasttrain.memory import format_bytes

    if budget.budget_bytes and nbytes > 0.5 * budget.budget_bytes:
        notes.append(
            f"the GPU cache of the dataset takes {format_bytes(nbytes, 'GiB')}, over half the budget: "
            f"data.loader = dali or torch may allow larger batches"
        )
    return torch.empty(nbytes, dtype=torch.uint8, device=device)
