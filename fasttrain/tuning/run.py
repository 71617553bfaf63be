"""The autotune run: :func:`autotune`, its stages in one loop, and the report built from what they return.

Order: the cache; on CPU, whether the job is long enough to repay any tuning (:func:`_untuned_if_short`); then
the search (eager probes, the config's own micro-batch first), and one loop over plans, each a smaller one than
the last: **plan -> compile -> loader trials -> verify -> smaller plan**. A plan gives way to a smaller one only
on memory evidence (the loader's memory outside torch pushes it over the headroom, or the verification ran out
of memory); the loader trials run once, for the first plan, and their setting serves the smaller plans. The
phases return what they found into one :class:`_Outcome`, and :func:`_report` builds the
:class:`~fasttrain.tuning.report.AutotuneReport` from it and the search once, at the end.

On CPU, autotune costs at most :data:`~fasttrain.tuning.search.CPU_TUNE_SHARE` of the training it tunes: a job
too short to repay the least tuning that could change its config is not tuned (the config is written as it
is); once the time cap from the job's length is spent with the config's own batch standing, the loader trials
and the verification are skipped; a change that time no longer allows to confirm end to end gives way to the
config's own. Answers shaped by the job's length are not cached (the cache key leaves the length out).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttrain import distributed, memory, registry
from fasttrain.config import Config
from fasttrain.data.progressive import train_sizes
from fasttrain.data.sources import discover
from fasttrain.distributed import dist_info
from fasttrain.io import check_writable
from fasttrain.memory import GIB, format_bytes, free_device_memory
from fasttrain.prepare import Prepared, prepare, resolve_data_root
from fasttrain.rundir import new_run_dir, run_name
from fasttrain.runtime import (
    CPU_EAGER_FLOPS_PER_THREAD,
    Runtime,
    cpu_job,
    environment,
    host_batch_limit,
    model_profile,
    runtime_for,
    seed_everything,
    trained_samples,
)
from fasttrain.timing import TimeBudget
from fasttrain.tuning import cache, probe
from fasttrain.tuning import loader as tuning_loader
from fasttrain.tuning.loader import LoaderResult
from fasttrain.tuning.probe import Budget, ProbeSettings, SizeRate, StepProbe, Verification
from fasttrain.tuning.report import AutotuneReport, tuned_config, write_outputs
from fasttrain.tuning.search import (
    CPU_TUNE_SHARE,
    BatchPlan,
    Candidate,
    SearchResult,
    beats,
    choose_batch,
    cpu_shortcut,
    cpu_time_cap,
    cpu_tuning_pays,
    least_cpu_tuning_s,
    mark_usable,
    plan_batches,
    search_batch_size,
)

log = logging.getLogger("fasttrain.tuning")

__all__ = ["autotune", "SEARCH_SHARE", "LOADER_SHARE"]

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
    t_start = time.perf_counter()
    budget_gib = float(memory_budget_gib if memory_budget_gib is not None else cfg.tune.memory_budget_gib)
    if budget_gib <= 0:
        raise ValueError(f"--memory-budget: must be > 0 GiB, got {budget_gib:g}")
    seconds = float(time_budget_s if time_budget_s is not None else cfg.tune.time_budget_s)
    if seconds <= 0:
        raise ValueError(f"--time-budget / tune.time_budget_s: must be > 0 seconds, got {seconds:g}")
    clock = TimeBudget(seconds)
    # The outputs are written after a search of minutes: a read-only folder fails now, on every rank (rank 0
    # checks, the others raise its error instead of waiting dist.timeout_s for an answer it never sends).
    target = out_dir if out_dir is not None else cfg.train.runs_dir
    distributed.decide("autotune-writable", lambda: check_writable(target, "autotune --out"), cfg.dist.timeout_s)
    python_args = dict(model=model, dataset=dataset, val_dataset=val_dataset)
    from_python = any(v is not None for v in python_args.values())
    runtime = runtime_for(cfg)
    fields = cache.key_fields(cfg, budget_gib=budget_gib, machine_info=cache.machine(runtime))
    cache_path = cache.cache_dir_for(cfg) / f"{cache.cache_key(fields)}.json"
    if use_cache and not from_python:
        cached = _cached(cache_path, fields, cfg.dist.timeout_s)
        if cached is not None:
            return _answer_from_cache(cfg, cached, cache_path, out_dir, t_start)
    report = None
    if not from_python and not dist_info().enabled and runtime.device.type == "cpu":
        report = _untuned_if_short(cfg, runtime, budget_gib, clock, verify=verify)
    if report is None:
        with runtime.flags():
            report = _tune(cfg, budget_gib, verify=verify, clock=clock, python_args=python_args)
        report = _agree(report)

    def write() -> None:
        report.environment = environment(runtime.device)
        report.elapsed_s = time.perf_counter() - t_start
        if report.ok and not report.reliable:
            report.notes.append("not cached: the answer is unreliable (see below); ask again on a quieter machine")
        elif report.ok and report.job_bound:
            report.notes.append("not cached: the answer depends on the job's length, which the cache key leaves out")
        write_outputs(cfg, report, _out_dir(cfg, out_dir))
        report.elapsed_s = time.perf_counter() - t_start
        if from_python:
            report.notes.append("not cached: the model or dataset came from Python, which the config cannot name")
        elif report.ok and report.reliable and not report.job_bound:
            try:
                cache.store(cache_path, fields, report)
                report.cache_path = str(cache_path)
            except OSError as e:
                report.notes.append(f"cache not written ({cache_path}: {e})")

    _on_rank_0(write, cfg.dist.timeout_s)
    return report


def _on_rank_0(write: Callable[[], None], timeout_s: float) -> None:
    """``write()`` (the files and the cache) on rank 0 alone; under torchrun the other ranks wait for it and end
    with its error if it fails. A rank that returned at once used to leave its node's agent in torchrun's exit
    barrier for 300 s while rank 0's node failed, instead of the job ending with rank 0's error."""
    distributed.decide("autotune-written", write, timeout_s)


def _answer_from_cache(
    cfg: Config, report: AutotuneReport, cache_path: Path, out_dir: str | os.PathLike | None, t_start: float
) -> AutotuneReport:
    report.cached, report.cache_path, report.files = True, str(cache_path), {}
    report.config_name = cfg.name
    report.world_size = dist_info().world_size

    def write() -> None:  # every rank read the same answer; rank 0 writes the files
        report.elapsed_s = time.perf_counter() - t_start  # before the files, so the JSON holds it
        write_outputs(cfg, report, _out_dir(cfg, out_dir))
        report.elapsed_s = time.perf_counter() - t_start
        log.info("autotune: answered from the cache %s", cache_path)

    _on_rank_0(write, cfg.dist.timeout_s)
    return report


def _cached(path: Path, fields: dict[str, Any], timeout_s: float) -> AutotuneReport | None:
    """The cached answer, rank 0's under torchrun (sent to all): a rank that found one and left while another,
    whose node keeps no cache, searched alone used to hang the job."""

    def rank0() -> dict[str, Any] | None:
        found = cache.load(path, fields)
        return found.to_dict() if found is not None else None

    found = distributed.decide("autotune-cache", rank0, timeout_s)
    return AutotuneReport.from_dict(found) if found is not None else None


def _agree(report: AutotuneReport) -> AutotuneReport:
    """Under torchrun every process tuned its own GPU for its share of the global batch; all of them take rank 0's
    answer (sent as its JSON form: open loaders stay where they are)."""
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
    return new_run_dir(cfg.train.runs_dir, run_name(cfg.name, prefix="autotune-"))


# -- what the stages return ---------------------------------------------------------------------------------------
@dataclass
class _Outcome:
    """What the stages found, in the order they ran; :func:`_report` reads it once."""

    chosen: int | None = None
    plan: BatchPlan | None = None
    probe_mode: str = ""
    compiled: Candidate | None = None
    compiled_tried: list[Candidate] = field(default_factory=list)
    compile_s: float = 0.0
    loader: LoaderResult | None = None
    verify: Verification | None = None
    error: str = ""
    shortcut: str = ""
    notes: list[str] = field(default_factory=list)
    unreliable: list[str] = field(default_factory=list)
    cpu_cap_s: float | None = None
    size_rates: list[SizeRate] = field(default_factory=list)


@dataclass
class _Run:
    """What every stage reads: the prepared run, the budget, the clock, the probe settings, the config's own
    micro-batch (None when it cannot be measured) and whether to verify."""

    prep: Prepared
    budget: Budget
    clock: TimeBudget
    settings: ProbeSettings
    given: int | None
    verify: bool
    resident: torch.Tensor | None = None
    """A placeholder of the GPU cache's size, held from the probes to the compiled check (the loader trials and
    the verification build the real cache)."""

    @property
    def cfg(self) -> Config:
        return self.prep.cfg

    @property
    def runtime(self) -> Runtime:
        return self.prep.runtime

    @property
    def device(self) -> torch.device:
        return self.prep.runtime.device

    def eval_batch(self, b: int) -> int:
        return self.cfg.train.eval_batch_size or 2 * b

    def plan(self, chosen: int, evidence: list[Candidate]) -> BatchPlan:
        """The plan for micro-batch ``chosen``; ``evidence``: candidates whose memory failures bound it."""
        bad = [c for c in evidence if c.memory_failure]
        fails = min(bad, key=lambda c: c.batch_size) if bad else None
        return plan_batches(
            self.cfg.train.batch_size,
            chosen,
            multiple=self.cfg.tune.multiple,
            accumulation=self.cfg.train.accumulation,
            fails_at=fails.batch_size if fails else None,
            fail_reason=_FAILURE_TEXT.get(fails.failure, "") if fails else "",
            # CUDA graphs overwrite gradients kept across micro-batches (prepare.check_cuda_graphs)
            allow_accumulation=self.device.type == "cuda" and not self.prep.runtime.cuda_graphs,
        )

    def own_plan(self, candidates: list[Candidate], given: int | None) -> BatchPlan | None:
        """The config's own plan when ``given`` was measured usable and the config's plan runs it as it is."""
        own = next((c for c in candidates if c.batch_size == given), None)
        if given is None or own is None or not own.usable:
            return None
        plan = self.plan(given, [])
        if plan.micro_batch != given or plan.accumulation != self.cfg.train.accumulation:
            return None
        return plan


def _report(
    cfg: Config,
    pcfg: Config,
    runtime: Runtime,
    budget: Budget,
    clock: TimeBudget,
    *,
    max_batch: int,
    given: int | None,
    search: SearchResult | None,
    out: _Outcome,
    notes: list[str],
) -> AutotuneReport:
    """The report, built once from the limits, the search and what the later stages returned."""
    tune = pcfg.tune
    shaky = [c.batch_size for c in search.candidates if not c.reliable] if search else []
    unreliable = (
        [
            f"batch {', '.join(map(str, shaky))}: repeats spread beyond tune.max_spread ({tune.max_spread:.0%}) twice "
            f"(a busy machine?)"
        ]
        if shaky
        else []
    )
    return AutotuneReport(
        config_name=cfg.name,
        model=pcfg.model.name,
        task=pcfg.task.name,
        device=str(runtime.device),
        runtime=runtime.describe(),
        input_shape=[pcfg.data.channels, pcfg.data.train_size_max, pcfg.data.train_size_max],  # the largest
        budget=budget,
        headroom=tune.headroom,
        noise=tune.noise,
        multiple=tune.multiple,
        max_batch=max_batch,
        time_budget_s=clock.seconds,
        candidates=search.candidates if search else [],
        chosen_batch=out.chosen,
        best_batch=search.best if search else None,
        given_batch=given,
        stop_reason=search.stop_reason if search else "",
        limit=search.limit if search else "",
        not_probed=search.not_probed if search else [],
        probe_mode=out.probe_mode,
        compiled=out.compiled,
        compiled_tried=out.compiled_tried,
        plan=out.plan,
        loader=out.loader,
        verify=out.verify,
        compile_s=out.compile_s,
        error=out.error,
        notes=[*notes, *out.notes],
        unreliable=[*unreliable, *out.unreliable, *([budget.short] if budget.short else [])],
        shortcut=out.shortcut,
        cpu_cap_s=out.cpu_cap_s,
        size_rates=out.size_rates,
    )


# -- a job too short to tune ---------------------------------------------------------------------------------------
def _untuned_if_short(
    cfg: Config, runtime: Runtime, budget_gib: float, clock: TimeBudget, *, verify: bool
) -> AutotuneReport | None:
    """On CPU, before anything is prepared: the report "not tuned" when the job's estimated training time
    (its samples at the model's forward FLOPs, :func:`~fasttrain.runtime.model_profile`) cannot repay the least
    tuning that could change its config (:func:`~fasttrain.tuning.search.cpu_tuning_pays`); None otherwise."""
    tune = cfg.tune
    rcfg = resolve_data_root(cfg)
    job = cpu_job(rcfg, len(discover(rcfg.data).train))
    flops = job.forward_flops
    if flops is None:
        return None
    job_s = 3 * flops * job.samples / (CPU_EAGER_FLOPS_PER_THREAD * max(job.threads, 1))
    least = least_cpu_tuning_s(repeats=tune.repeats, repeat_s=tune.repeat_s, verify_s=tune.verify_s if verify else 0)
    if cpu_tuning_pays(job_s, least):
        return None
    own = cfg.train.micro_batch
    plan = plan_batches(cfg.train.batch_size, own, multiple=tune.multiple, accumulation=cfg.train.accumulation)
    out = _Outcome(chosen=own, shortcut="too-short")
    out.plan = dataclasses.replace(plan, note=f"train.batch_size {plan.global_batch} is kept: not tuned (see the note)")
    out.notes.append(
        f"not tuned: the job is about {job_s:.1f} s of training steps ({job.samples} samples at the model's "
        f"{flops / 1e6:,.1f} MFLOPs a sample), of which autotune may take {CPU_TUNE_SHARE:.0%}: less "
        f"than the least tuning that could change the config costs (about {least:.1f} s: two probes and "
        f"two end-to-end windows); the config is written as it is"
    )
    log.info("autotune: %s", out.notes[-1])
    return _report(
        cfg,
        rcfg,
        runtime,
        Budget("cpu", budget_gib),
        clock,
        max_batch=tune.max_batch,
        given=own,
        search=None,
        out=out,
        notes=[],
    )


# -- the run ---------------------------------------------------------------------------------------------------
def _tune(
    cfg: Config, budget_gib: float, *, verify: bool, clock: TimeBudget, python_args: dict[str, Any] | None = None
) -> AutotuneReport:
    # The GPU cache is chosen against the budget, not the whole (maybe larger) card.
    prep = prepare(cfg, memory_limit=int(budget_gib * GIB), host_check=False, **(python_args or {}))
    if prep.dist.enabled:
        # Under torchrun each process tunes its own GPU for its share of the global batch (prepare checked that it
        # divides); the answer is per GPU, and the tuned config multiplies it back.
        share = dataclasses.replace(prep.cfg.train, batch_size=prep.cfg.train.batch_size // prep.dist.world_size)
        prep = dataclasses.replace(prep, cfg=dataclasses.replace(prep.cfg, train=share))
    pcfg, device = prep.cfg, prep.runtime.device
    seed_everything(pcfg.runtime.seed)
    max_batch, cap_reason, given, notes = _batch_limits(prep)  # before the cap: an error here leaves none set
    budget = probe.setup_budget(device, budget_gib)
    tune = pcfg.tune
    settings = ProbeSettings(
        warmup=tune.warmup_steps,
        repeats=tune.repeats,
        repeat_s=tune.repeat_s,
        min_steps=tune.measure_steps,
        max_spread=tune.max_spread,
        with_eval=budget.budget_bytes is not None,
    )
    run = _Run(prep, budget, clock, settings, given, verify)
    out = _Outcome()
    search = None
    try:
        with tuning_loader.reuse_file_checks():
            search = _search_and_plan(run, out, max_batch=max_batch, cap_reason=cap_reason)
    finally:
        if prep.runtime.compile and prep.runtime.is_cuda:  # the plans' graphs and CUDA-graph pools: a train()
            probe.reset_compiler(device)  # after autotune in this process compiles its own
        free_device_memory(device)
        probe.release_budget(budget, device)
    report = _report(
        cfg,
        pcfg,
        prep.runtime,
        budget,
        clock,
        max_batch=max_batch,
        given=given,
        search=search,
        out=out,
        notes=notes,
    )
    report.loader_by_length = _loader_by_length(prep, int(budget_gib * GIB))
    return report


def _loader_by_length(prep: Prepared, memory_limit: int) -> bool:
    """Whether ``data.loader = auto`` chose by the job's length: the backend a job of unbounded length would get
    differs (the GPU cache passed over for a job that reads fewer images than it decodes,
    :meth:`~fasttrain.data.gpu_cache.CacheBackend.fits`). Such an answer is not cached: its key leaves the
    length out, and a long run of the same config would be handed the short job's loader."""
    from fasttrain.data.loaders import choose_backend

    cfg = prep.cfg
    if cfg.data.loader != registry.AUTO:
        return False
    unbounded = dataclasses.replace(cfg.train, epochs=10**9, max_steps=0, total_steps=0, time_budget_s=0.0)
    long_cfg = dataclasses.replace(cfg, train=unbounded)
    other, _ = choose_backend(registry.AUTO, prep.task.run_samples(), long_cfg, prep.runtime.device, memory_limit)
    return other != prep.backend


def _batch_limits(prep: Prepared) -> tuple[int, str, int | None, list[str]]:
    """(the largest batch the search may probe, what caps it, the config's own micro-batch or None when it
    cannot be measured, notes)."""
    pcfg, tune = prep.cfg, prep.cfg.tune
    notes: list[str] = []
    n_train = len(prep.source.train)
    max_batch, cap_reason = tune.max_batch, "tune.max_batch"
    if n_train < max_batch:
        max_batch = max(min(n_train, max_batch), tune.min_batch)
        cap_reason = f"the training set's size, {n_train} images"
        notes.append(f"batch sizes capped at the training set's {n_train} images")
    if prep.runtime.device.type == "cpu":
        # On CPU host memory is the budget: sizes whose step would not fit the memory available are not probed.
        available, profile = memory.available_host_bytes(), model_profile(pcfg)
        if available is not None and profile is not None:
            fits = host_batch_limit(profile, prep.runtime.precision.name, available)
            if fits < max_batch:
                max_batch = max(fits, 1)
                cap_reason = f"the host's free memory ({format_bytes(available, 'GiB')})"
                notes.append(f"batch sizes capped at {max_batch}: the most that fits {cap_reason}")
    own = pcfg.train.micro_batch
    given: int | None = own
    if own > n_train:
        notes.append(
            f"the config's micro-batch {given} is larger than the training set ({n_train} images): not measured"
        )
        given = None
    elif cap_reason.startswith("the host's") and own > max_batch:
        notes.append(f"the config's micro-batch {given} would not fit {cap_reason}: not measured")
        given = None
    return max_batch, cap_reason, given, notes


def _search_and_plan(run: _Run, out: _Outcome, *, max_batch: int, cap_reason: str) -> SearchResult:
    """The eager search, the plan it leads to, then :func:`_plans` (or, on CPU with the time cap spent, the
    config's own as it is); ``out`` holds what they found."""
    pcfg, runtime, tune, clock = run.cfg, run.runtime, run.cfg.tune, run.clock
    # Eager probes with everything else as configured; compile comes once, at the planned micro-batch.
    eager = StepProbe(
        run.prep.new_task(pcfg, runtime_for(pcfg, compile="off")),
        budget=run.budget,
        settings=run.settings,
        eval_batch=run.eval_batch,
        stamp=clock.stamp,
        time_left=lambda: clock.left(SEARCH_SHARE),
    )
    log.info(
        "autotune %s: %s; %s; time budget %g s (compile excluded)",
        pcfg.name,
        runtime.describe(),
        run.budget.describe(),
        clock.seconds,
    )
    run.resident = _hold_resident_dataset(run, out.notes)
    measure = _capped_on_cpu(eager, run, out) if run.device.type == "cpu" else eager
    try:
        search = search_batch_size(
            measure,
            min_batch=tune.min_batch,
            max_batch=max_batch,
            multiple=tune.multiple,
            noise=tune.noise,
            budget_bytes=run.budget.budget_bytes,
            headroom=tune.headroom,
            given=run.given,
            time_left=lambda: clock.left(SEARCH_SHARE),
            remeasure=eager.remeasure,
            cap_reason=cap_reason,
        )
        out.chosen = search.chosen
        if search.chosen is None:
            out.error = (
                f"{search.stop_reason}; lower tune.min_batch / tune.multiple, the image size or the "
                f"model, or raise --memory-budget"
            )
            out.probe_mode = "eager probes; nothing fit, so nothing was compiled"
            return search
        log.info(
            "autotune [%s] search: %s; chosen %s (best %s, the config's own %s)",
            clock.stamp(),
            search.stop_reason,
            search.chosen,
            search.best,
            run.given,
        )
        plan = run.plan(search.chosen, search.candidates)
        if plan.micro_batch not in search.by_size():  # a split of the global batch: measure the micro-batch it runs
            search.candidates.append(
                mark_usable(eager(plan.micro_batch, "plan"), run.budget.budget_bytes, tune.headroom)
            )
        reference = search.by_size()[plan.micro_batch]
        if not reference.usable:
            out.error = f"the planned micro-batch {plan.micro_batch} is not usable: {reference.error}"
            return search
        out.probe_mode = (
            "eager search (a compile per candidate would cost a compile per size; a dynamic batch dimension is "
            "not the static program training runs); compiled once at the planned micro-batch, its state reused "
            "by the loader trials and the verification"
            if runtime.compile
            else "runtime.compile is off: the eager probes are the step training runs"
        )
        out.size_rates = _size_rates(run, eager, plan.micro_batch)
        if not _cpu_shortcut(run, out, search, plan):
            # The probe's state is handed over (or dropped), held by nothing here: a failed stage must not leave
            # it holding memory.
            _plans(run, out, search, plan, _take_state(eager, keep=not runtime.compile))
    finally:
        run.resident = None
        eager.close()
    return search


def _size_rates(run: _Run, eager: StepProbe, micro: int) -> list[SizeRate]:
    """Progressive resizing: samples/s at each training size at the planned micro-batch (eager, a few steps
    each, one on CPU where a step is slow); nothing without progressive resizing."""
    sizes = train_sizes(run.cfg)
    if not sizes.progressive:
        return []
    return eager.size_rates(micro, sizes.distinct(), steps=1 if run.device.type == "cpu" else 5)


def _take_state(eager: StepProbe, *, keep: bool) -> Any:
    """The probe's training state (None unless ``keep``), the probe closed."""
    state, eager.state = (eager.state if keep else None), None
    eager.close()
    return state


def _capped_on_cpu(probe_fn: StepProbe, run: _Run, out: _Outcome):
    """``probe_fn``, which after its first measurement (the config's own batch) caps the clock at
    :data:`~fasttrain.tuning.search.CPU_TUNE_SHARE` of the training run it tunes
    (:func:`~fasttrain.tuning.search.cpu_time_cap`)."""
    tc, clock = run.cfg.train, run.clock
    job = trained_samples(tc, len(run.prep.source.train))
    setup_s = clock.elapsed()
    done = False

    def measure(b: int, phase: str = "") -> Candidate:
        nonlocal done
        c = probe_fn(b, phase)
        if not done and c.samples_per_s:
            done = True
            cap = cpu_time_cap(clock.seconds, job_samples=job, samples_per_s=c.samples_per_s, setup_s=setup_s)
            if cap < clock.seconds:
                out.notes.append(
                    f"time budget {cap:.1f} s on CPU: {CPU_TUNE_SHARE:.0%} of the training it tunes (about "
                    f"{setup_s:.1f} s of set-up + {job} samples at {c.samples_per_s:,.0f} samples/s)"
                )
                log.info("autotune [%s] %s", clock.stamp(), out.notes[-1])
                clock.seconds = out.cpu_cap_s = cap
        return c

    return measure


def _cpu_shortcut(run: _Run, out: _Outcome, search: SearchResult, plan: BatchPlan) -> bool:
    """On CPU with the time cap from the job's length spent: the config's own as it is, without loader trials
    or verification (:func:`~fasttrain.tuning.search.cpu_shortcut`); True when taken."""
    own = run.own_plan(search.candidates, run.given)
    stands = own is not None and plan.micro_batch == own.micro_batch and plan.accumulation == own.accumulation
    verify_s = run.cfg.tune.verify_s if run.verify else 0.0
    which = cpu_shortcut(
        capped=out.cpu_cap_s is not None,
        own_stands=stands,
        own_known=own is not None,
        loader_left_s=run.clock.left(LOADER_SHARE),
        left_s=run.clock.left(),
        confirm_s=2 * min(1.0, verify_s),
    )
    if not which or own is None:
        return False
    spent = f"the CPU time budget ({run.clock.seconds:.1f} s, from the job's length) is spent"
    if which == "cap-spent":
        out.notes.append(
            f"{spent} and the config's own micro-batch {own.micro_batch} stands: loader trials and "
            f"verification skipped, the config is written as it is"
        )
    else:
        out.notes.append(
            f"{spent}: micro-batch {plan.micro_batch} cannot be confirmed end to end against the "
            f"config's own {own.micro_batch}, which is kept as it is"
        )
    log.info("autotune [%s] %s", run.clock.stamp(), out.notes[-1])
    kept = f"train.batch_size {own.global_batch} is kept: the CPU time budget is spent (see the note)"
    out.chosen, out.plan, out.shortcut = own.micro_batch, dataclasses.replace(own, note=kept), which
    return True


# -- plan -> compile -> loader trials -> verify -> smaller plan ----------------------------------------------------
def _plans(run: _Run, out: _Outcome, search: SearchResult, plan: BatchPlan, state: Any) -> None:
    """One loop over plans, each smaller than the last, until one is verified (or nothing smaller is left): the
    compiled check (compile on), the loader trials (the first plan only), the verification; memory evidence
    against a plan (the loader's memory outside torch over the headroom, an out-of-memory verification, at most
    three) moves to the next smaller measured size."""
    failed: list[Candidate] = []  # the verifications' memory evidence
    trial_loader = None
    try:
        for _ in range(len(search.candidates) + 1):  # each turn moves to a strictly smaller micro-batch
            reference = search.by_size().get(plan.micro_batch)
            if run.runtime.compile:
                state, reference, plan = _compile(run, out, search, plan)
                if reference is None:
                    smaller = "smaller " if failed else ""
                    out.error = f"the compiled step does not fit at any {smaller}usable batch size tried"
                    return
            out.plan, run.resident = plan, None
            if reference is not None and reference.batch_size != plan.micro_batch:
                reference = None  # the verification measures the model-only step at its micro-batch itself
            free_device_memory(run.device)
            if state is None:
                state = run.prep.task.build_state()
            if out.loader is None:
                oom = _trial_loaders_or_oom(run, out, plan, state)
                if oom:  # the real loader beside the step (a GPU cache's whole set, DALI's buffers): no probe's
                    state = None
                    failed.append(Candidate(plan.micro_batch, False, failure="oom", error=oom, phase="loader"))
                    why = f"the loader trials at micro-batch {plan.micro_batch} ran out of memory ({oom})"
                    smaller_plan = None if len(failed) == 3 else _smaller(run, out, search, plan, failed, why)
                    if smaller_plan is None:
                        out.error = why
                        return
                    plan = smaller_plan
                    continue
                assert out.loader is not None
                trial_loader, out.loader.loader = out.loader.loader, None
                if _over_headroom_with_loader(run, out, search, out.compiled or reference):
                    _close(trial_loader)
                    trial_loader = state = None
                    smaller_plan = _smaller(run, out, search, plan, failed, _loader_memory_text(run, plan))
                    if smaller_plan is None:
                        out.error = _loader_memory_text(run, None)
                        return
                    plan = smaller_plan
                    continue
            if not (run.verify and run.cfg.tune.verify_s > 0):
                out.notes.append("verification skipped (--no-verify or tune.verify_s = 0)")
                return
            v, state = _verify_plan(run, out, plan, state, reference, trial_loader)
            trial_loader = None
            if not v.failure:
                own = None if run.given in {c.batch_size for c in failed} else run.given
                _keep_or_compare(run, out, search, plan, v, own)
                return
            out.error = f"verification failed: {v.error}"
            failed.append(Candidate(plan.micro_batch, False, failure=v.failure, error=v.error, phase="verify"))
            why = f"verification at micro-batch {plan.micro_batch} failed ({v.error})"
            smaller_plan = None if len(failed) == 3 else _smaller(run, out, search, plan, failed, why)
            if smaller_plan is None:
                return
            plan, state = smaller_plan, None
    finally:
        _close(trial_loader)


def _loader_memory_text(run: _Run, plan: BatchPlan | None) -> str:
    outside = format_bytes(run.budget.outside_torch_bytes, "GiB")
    if plan is None:
        headroom = run.cfg.tune.headroom
        return f"with the loader's {outside} outside torch, no batch size probed leaves {headroom:.0%} headroom"
    return f"micro-batch {plan.micro_batch} no longer leaves the headroom once the loader's {outside} are charged"


def _close(loader: Any) -> None:
    """Close ``loader`` when there is one."""
    if loader is not None:
        loader.close()


def _smaller(
    run: _Run, out: _Outcome, search: SearchResult, plan: BatchPlan, failed: list[Candidate], why: str
) -> BatchPlan | None:
    """The plan for the best usable measured size below ``plan``'s micro-batch (None: there is none)."""
    smaller = [c for c in search.candidates if c.usable and c.batch_size < plan.micro_batch]
    chosen, _ = choose_batch(smaller, run.cfg.tune.noise, prefer=run.given)
    if chosen is None:
        return None
    out.notes.append(f"{why}; trying {chosen}")
    log.info("autotune [%s] %s", run.clock.stamp(), out.notes[-1])
    out.chosen = chosen
    free_device_memory(run.device)
    return run.plan(chosen, [*search.candidates, *out.compiled_tried, *failed])


def _compile(
    run: _Run, out: _Outcome, search: SearchResult, plan: BatchPlan
) -> tuple[Any, Candidate | None, BatchPlan]:
    """The compiled check at the plan's micro-batch, else the next usable sizes below; (state, compiled
    candidate or None, plan). The compile (the checks' warm-up) is not charged to the time budget."""
    if out.compiled_tried:
        # A later plan: the earlier plans' graphs outlive their models in dynamo's cache (an entry per shape on the
        # model's forward; at recompile_limit, 8, new shapes run eager without a word) with any CUDA-graph pool.
        probe.reset_compiler(run.device)
    by_size = search.by_size()
    smaller = sorted((b for b, c in by_size.items() if c.usable and b < plan.micro_batch), reverse=True)
    state, got, tried = probe.compiled_check(
        run.prep.task,
        budget=run.budget,
        settings=run.settings,
        eval_batch=run.eval_batch,
        sizes=[plan.micro_batch, *smaller],
        headroom=run.cfg.tune.headroom,
        stamp=run.clock.stamp,
    )
    for c in tried:  # each compiled size builds its state afresh: set-up excluded with the compile, as before
        run.clock.exclude(c.untimed_s + c.setup_s)
        out.compile_s += c.untimed_s + c.setup_s
    out.compiled_tried += tried
    out.compiled = got
    if got is None:
        return None, None, plan
    if got.batch_size != plan.micro_batch:
        out.notes.append(
            f"micro-batch lowered from {plan.micro_batch} to {got.batch_size}: the compiled step did "
            f"not fit at the larger size"
        )
        out.chosen = min(out.chosen or got.batch_size, got.batch_size)
        plan = run.plan(got.batch_size, [*search.candidates, *tried])
        if plan.micro_batch != got.batch_size:
            out.notes.append(
                f"the plan's micro-batch {plan.micro_batch} was not compiled here: the loader trials "
                f"and the verification compile it once more"
            )
    return state, got, plan


def _trial_loaders_or_oom(run: _Run, out: _Outcome, plan: BatchPlan, state: Any) -> str:
    """:func:`_trial_loaders` into ``out.loader``; an out-of-memory error's summary instead of raising it ('' when
    they ran). The trials run the real loader beside the compiled step, which no probe measured: the whole GPU
    cache, DALI's buffers, batches in flight. Raised, it ended autotune with a traceback."""
    try:
        out.loader = _trial_loaders(run, out, plan, state)
    except Exception as e:
        if not memory.is_oom_error(e):
            raise
        return memory.oom_summary(e)
    return ""


def _trial_loaders(run: _Run, out: _Outcome, plan: BatchPlan, state: Any) -> LoaderResult:
    tune, clock = run.cfg.tune, run.clock
    result = tuning_loader.tune_loader(
        run.cfg,
        run.runtime,
        run.prep.source,
        run.prep.backend,
        micro=plan.micro_batch,
        accumulation=plan.accumulation,
        state=state,
        noise=tune.noise,
        warmup=tune.warmup_steps,
        repeats=tune.repeats,
        repeat_s=tune.repeat_s,
        max_spread=tune.max_spread,
        time_left=lambda: clock.left(LOADER_SHARE),
        stamp=clock.stamp,
        make_task=lambda c, r, _source: run.prep.new_task(c, r),
    )
    if not result.reliable:
        out.unreliable.append("a loader trial's repeats spread beyond tune.max_spread twice (a busy machine?)")
    return result


def _over_headroom_with_loader(run: _Run, out: _Outcome, search: SearchResult, reference: Candidate | None) -> bool:
    assert out.loader is not None
    return _charge_loader_memory(
        out.loader, run.budget, run.device, run.cfg.tune.headroom, [*search.candidates, *out.compiled_tried], reference
    )


def _charge_loader_memory(
    loader: LoaderResult,
    budget: Budget,
    device: torch.device,
    headroom: float,
    candidates: list[Candidate],
    reference: Candidate | None,
) -> bool:
    """Charge what the loader holds outside torch (measured with NVML while it ran) to the budget and mark every
    candidate that fits again; True when ``reference`` (the plan's) no longer leaves the headroom."""
    if budget.budget_bytes is None or not loader.outside_torch_bytes:
        return False
    probe.charge_outside(budget, device, loader.outside_torch_bytes)
    for c in candidates:
        if c.fits:
            mark_usable(c, budget.budget_bytes, headroom, budget.outside_torch_bytes)
    return reference is not None and not reference.usable


def _verification(
    run: _Run, plan: BatchPlan, state: Any, reference: Candidate | None, loader: Any, seconds: float, lr: LoaderResult
) -> tuple[Verification, Any]:
    """One verification run at ``plan`` with the loader trials' setting ``lr`` (:func:`probe.verify`)."""
    tuned, _ = tuned_config(run.cfg, plan, lr.setting)
    return probe.verify(
        run.prep.new_task(tuned, run.runtime),
        run.prep.source,
        backend=lr.backend,
        state=state,
        plan=plan,
        budget=run.budget,
        seconds=seconds,
        noise=run.cfg.tune.noise,
        settings=run.settings,
        reference=reference,
        loader=loader,
        loader_share=lr.share,
        loader_spread=lr.spread + lr.model_spread,
        eval_batch_size=tuned.train.eval_batch,
        stamp=run.clock.stamp,
    )


def _verify_plan(
    run: _Run, out: _Outcome, plan: BatchPlan, state: Any, reference: Candidate | None, loader: Any
) -> tuple[Verification, Any]:
    """The verification of ``plan``; a disagreement with the probe without memory evidence is noise until shown
    otherwise: measured once more, twice as long, when time allows."""
    assert out.loader is not None  # the loader trials ran before
    clock, verify_s = run.clock, run.cfg.tune.verify_s
    seconds = max(min(verify_s, clock.left()), min(1.0, verify_s))
    v, state = _verification(run, plan, state, reference, loader, seconds, out.loader)
    if not v.ok and not v.failure and clock.left() >= seconds:
        log.info("autotune [%s] verification disagrees with the probe: measuring twice as long", clock.stamp())
        v, state = _verification(run, plan, state, reference, None, 2 * seconds, out.loader)
    out.verify, out.plan = v, plan
    if v.agreement is not None and not v.agreement.reliable:
        out.unreliable.append(v.agreement.text)
    return v, state


def _keep_or_compare(
    run: _Run, out: _Outcome, search: SearchResult, plan: BatchPlan, v: Verification, own: int | None
) -> None:
    """After a verification without memory evidence. Still unexplained: the answer stands, marked less sure (and
    not cached), and a change of the config's own micro-batch it cannot confirm end to end gives way to it. On
    CPU a changed micro-batch is run against the config's own end to end as well and kept only when faster
    beyond the noise: a tuned config is never slower than the original."""
    out.error = ""
    own_plan = run.own_plan(search.candidates, own)
    if not v.ok:
        v.ok, v.error = True, ""
        out.notes.append(
            "the verification disagrees with the probe beyond the noise (measured twice as long as well): "
            "the answer stands, marked unreliable and not cached"
        )
        if own_plan is not None and plan.micro_batch != own:
            _keep_own(
                run, out, own_plan, f"the verification could not confirm micro-batch {plan.micro_batch} end to end"
            )
        return
    if run.runtime.is_cuda or own_plan is None or plan.micro_batch == own:
        return
    assert out.loader is not None and own is not None
    by_size = search.by_size()
    mine, _ = _verification(
        run, own_plan, None, by_size.get(own), None, v.window_s or run.cfg.tune.verify_s, out.loader
    )
    if mine.samples_per_s is None or v.samples_per_s is None:
        return
    figures = (
        f"end to end, micro-batch {plan.micro_batch} ran at {v.samples_per_s:,.1f} samples/s against the "
        f"config's own {own} at {mine.samples_per_s:,.1f}"
    )
    if beats(v, mine, run.cfg.tune.noise):
        out.notes.append(f"{figures}: faster beyond the noise")
        return
    mine.ok, mine.error = True, ""
    out.verify = mine
    _keep_own(run, out, own_plan, f"{figures}: not faster beyond the noise")


def _keep_own(run: _Run, out: _Outcome, own_plan: BatchPlan, text: str) -> None:
    out.notes.append(f"{text}; keeping the config's own micro-batch {own_plan.micro_batch}")
    log.info("autotune [%s] %s", run.clock.stamp(), out.notes[-1])
    out.chosen, out.plan = own_plan.micro_batch, own_plan


def _hold_resident_dataset(run: _Run, notes: list[str]) -> torch.Tensor | None:
    """A backend that keeps the decoded dataset on the device for the whole run (the GPU cache): hold a
    placeholder of its size during the probes so it counts against the budget as it will in training
    (:func:`fasttrain.tuning.loader.resident_bytes`)."""
    if run.device.type != "cuda":
        return None
    nbytes = tuning_loader.resident_bytes(run.prep.backend, run.cfg, run.prep)
    if nbytes <= 0:
        return None
    budget = run.budget.budget_bytes
    if budget and nbytes > 0.5 * budget:
        notes.append(
            f"the GPU cache of the dataset takes {format_bytes(nbytes, 'GiB')}, over half the budget: "
            f"data.loader = dali or torch may allow larger batches"
        )
    return torch.empty(nbytes, dtype=torch.uint8, device=run.device)
