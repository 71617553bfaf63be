"""The training loop: epochs, micro-batches and accumulation, evaluation, schedules, when to checkpoint and log.

The engine owns time, order and files; the task owns what a batch means (:mod:`fasttrain.tasks`), one step's
backward / synchronisation / optimizer work is :mod:`fasttrain.step`, what a checkpoint holds is
:class:`~fasttrain.checkpoint.CheckpointManager`, what gets recorded and shown is :mod:`fasttrain.metrics`, and
how a config becomes a runnable set-up is :mod:`fasttrain.prepare`. Values are read back from the device only
every ``train.log_every`` steps and once per evaluation (each read is a CPU-GPU sync point).

Under torchrun every process runs this loop on its shard of each batch; gradients are all-reduced by DDP,
evaluation sums and logged values once per read; rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fasttrain import distributed, memory
from fasttrain.agree import check_loaders
from fasttrain.budget import StepCosts
from fasttrain.checkpoint import (
    CheckpointManager,
    alternatives,
    check_resume_config,
    checkpoint_config,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from fasttrain.config import Config, ConfigError, apply_overrides, dump_config
from fasttrain.data.base import Batch, Loader
from fasttrain.data.progressive import TrainSizes, train_sizes
from fasttrain.io import WriteError, atomic_write_text, check_writable, os_reason, read_jsonl
from fasttrain.metrics import PROGRESS, MetricsLog, Progress, fmt_metrics, step_line, summary_line, trim_metrics
from fasttrain.monitor import monitors, use_best
from fasttrain.optim import make_scheduler
from fasttrain.prepare import Prepared, prepare
from fasttrain.rundir import (
    RunError,
    RunLock,
    clean_temp_files,
    elastic_run_dir,
    forget_elastic_run,
    holds_checkpoints,
    new_run_dir,
    remember_elastic_run,
    resume_target,
    run_name,
    write_run_config,
)
from fasttrain.runtime import environment, rank_seed, seed_everything
from fasttrain.stop import Stopped, StopRequest, stop_on_signals
from fasttrain.tasks import Task, TrainState

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "evaluate", "Diverged"]


class Diverged(RunError):
    """The training loss stayed non-finite (``train.max_nonfinite_logs`` logged steps in a row)."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    """One record per epoch (the epoch records of metrics.jsonl)."""
    best_metric: str
    best_value: float | None
    test_metrics: dict[str, float] | None = None
    backend: str = ""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(file, reason) of every file or record the run left out (unreadable images, unusable manifest rows)."""
    test_weights: str = ""
    """Which weights test_metrics (and confusion.json) were measured with: best.pt and its epoch, or the final
    weights."""
    stopped_early: str = ""
    """Why early stopping ended the run (empty when it ran all train.epochs)."""

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# -- entry point -------------------------------------------------------------------------------------------------
def train(
    cfg: Config | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    overrides: list[str] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, Any]], None] | None = None,
    model: Any = None,
    dataset: Any = None,
    val_dataset: Any = None,
    quiet: bool = False,
    started: float | None = None,
) -> TrainResult:
    """Train ``cfg`` in a new run folder, or continue the run in ``resume`` from its last checkpoint.

    ``model``: your own ``nn.Module`` (or a function returning one) instead of ``model.name``'s; the run then
    records ``model.name = custom``, and resuming or predicting needs the same ``model=`` again.
    ``dataset`` / ``val_dataset``: your own map-style datasets of ``(image tensor, label)`` instead of
    ``data.root``'s files (see :mod:`fasttrain.data.user`); resuming needs them again.

    ``overrides`` (``section.key=value``) apply on top of a resumed run's config (e.g. more epochs; what may
    change is :data:`fasttrain.checkpoint.RESUME_MAY_CHANGE`). ``on_epoch_end(state, record)`` is called after
    each epoch's checkpoint is written. One process at a time trains in a run folder (a lock); temp files of
    interrupted checkpoint writes are removed when a run resumes and when it ends. Under torchrun a restarted
    job (``--max-restarts``) finds its run folder again and resumes from its last checkpoint.

    ``started``: the ``time.perf_counter()`` reading ``train.time_budget_s`` counts from (the command line gives
    its process's start); default: this call.

    Called from Python with no logging configured, the console shows what ``fasttrain train`` shows (the run's
    lines and epoch summaries on stderr; ``quiet=True``: warnings only and no progress bar); configure logging
    (the ``fasttrain`` logger) to decide yourself.
    """
    if resume is None and cfg is None:
        raise ValueError("train() needs a config or resume=RUN_DIR")
    entered = time.perf_counter()  # the start-up's first phase ends here: the process's start, imports, config
    started = entered if started is None else started
    info = distributed.dist_info()
    lock: RunLock | None = None
    run_dir: Path | None = None
    console = _api_console(quiet)
    progress = progress and not quiet
    held: dict[str, Any] = {}  # rank 0's lock and checkpoint, from the decision below
    try:
        timeout = cfg.dist.timeout_s if cfg is not None else 1800.0
        # Rank 0 decides which run folder this is (a resume, a torchrun restart, a new run) and reads the
        # checkpoint; every rank takes its decision (the others may not see the runs folder at all).
        given = {"model": model is not None, "dataset": dataset is not None}
        plan = distributed.decide("run", lambda: _plan_run(cfg, resume, overrides, info, held, **given), timeout)
        lock, ckpt = held.get("lock"), held.get("ckpt")
        run_dir = Path(plan.run_dir) if plan.run_dir else None
        cfg = plan.cfg or cfg
        assert cfg is not None
        prep = prepare(
            cfg,
            model=model,
            dataset=dataset,
            val_dataset=val_dataset,
            restoring=bool(plan.start) or ckpt is not None,
        )
        if plan.start:
            ckpt = _share_checkpoint(ckpt, Path(plan.start), plan.start_size, plan.start_mark)
        _check_prepared(prep)
        with prep.runtime.flags():
            # Loaders (they check the files), model and optimizers first: what cannot train is refused before
            # a new run folder exists.
            prep.marks.insert(0, ("imports", entered))  # the start-up's phases before the Trainer, in order
            trainer = Trainer(
                prep, ckpt, progress=progress, on_epoch_end=on_epoch_end, started=started, marks=prep.marks
            )
            trainer.finished = plan.finished
            try:
                if run_dir is None:
                    run_dir, lock = _new_run(prep, Path(plan.reuse) if plan.reuse else None)
                handler = _attach_run_log(run_dir / "train.log") if prep.dist.is_main else None
                try:
                    # SIGINT, SIGTERM, SIGUSR1: saved at the next step (under torchrun, the step its processes
                    # agree on: distributed.StopVote)
                    with stop_on_signals() as trainer.stop:
                        result = trainer.run(run_dir)
                    if prep.dist.is_main and info.run_id:  # the job is done: a restart has nothing to find
                        forget_elastic_run(prep.cfg.train.runs_dir, info.run_id, run_dir)
                    return result
                except BaseException as e:
                    try:
                        e.run_dir = run_dir  # type: ignore[attr-defined]  # the CLI says how to resume it
                    except AttributeError:
                        pass
                    raise
                finally:
                    _detach_run_log(handler)
            finally:
                trainer.close()
    finally:
        lock = lock or held.get("lock")
        if lock is not None:
            clean_temp_files(lock.path.parent)
            lock.release()
        _detach_run_log(console)


def _check_prepared(prep: Prepared) -> None:
    """What is refused after preparing, before the loaders: metrics that do not exist, and ranks that would not
    train on the same data and config (:mod:`fasttrain.agree`). Then the seed and, on CPU, the heap setting."""
    from fasttrain.agree import check_nodes

    _check_best_metric(prep.task, prep.cfg.train.best_metric, bool(prep.source.val))
    if prep.cfg.train.save_top_k:
        _check_best_metric(prep.task, prep.cfg.train.best_metric, bool(prep.source.val), "train.save_top_k", True)
    if prep.cfg.train.early_stop_patience:
        _check_best_metric(
            prep.task, prep.cfg.train.early_stop_metric, bool(prep.source.val), "train.early_stop_metric", True
        )
    check_nodes(prep.source, prep.cfg)
    seed_everything(prep.cfg.runtime.seed)
    if not prep.runtime.is_cuda:
        kept = memory.keep_host_heap()
        if kept:
            log.debug("%s", kept)


@dataclass
class _RunPlan:
    """Rank 0's decision, taken by every rank: the run folder to resume (and its config and checkpoint), or a
    folder of this job's earlier start to train in afresh, or a new folder (all empty)."""

    run_dir: str = ""
    cfg: Config | None = None
    start: str = ""
    """The checkpoint resumed from."""
    start_size: int = 0
    start_mark: tuple[int, int] = (0, 0)
    """The checkpoint's epoch and step: a rank that reads its own copy checks that it is rank 0's."""
    reuse: str = ""
    finished: dict[str, Any] | None = None
    """The resumed checkpoint is the one the run finished on, and its end was reported: the end's record
    (:func:`_finished_record`), and nothing is trained or reported again unless the config asks for more."""


def _plan_run(
    cfg: Config | None,
    resume: str | Path | None,
    overrides: list[str] | None,
    info: Any,
    held: dict[str, Any],
    *,
    model: bool = False,
    dataset: bool = False,
) -> _RunPlan:
    """On rank 0 (or the only process): which run this is. A torchrun restart finds its job's folder by the
    job's token and config (:func:`_elastic_plan`); a resume takes the folder's lock and reads the checkpoint
    (kept in ``held`` with the lock). ``model`` / ``dataset``: given from Python (what :func:`prepare` then
    fills into the config is not the job's config differing)."""
    reuse = None
    if resume is None and info.enabled and info.run_id and cfg is not None:
        resume, overrides, reuse = _elastic_plan(cfg, info, model=model, dataset=dataset)
    if resume is None:
        if cfg is not None and info.is_main and reuse is None:  # fail now, not after the data is decoded
            check_writable(cfg.train.runs_dir, "train.runs_dir")
        return _RunPlan(reuse=str(reuse or ""))
    run_dir, start = resume_target(Path(resume))
    if info.is_main:
        held["lock"] = RunLock(run_dir).acquire()  # before reading anything a running process may be rewriting
        clean_temp_files(run_dir)
        check_writable(run_dir / "checkpoints", "--resume")  # read-only: fail now, not after an epoch
    cfg, held["ckpt"] = _resumed_config(run_dir, overrides, start)
    mark = _mark(held["ckpt"])
    return _RunPlan(str(run_dir), cfg, str(start), start.stat().st_size, mark, finished=_finished_record(run_dir, mark))


def _finished_record(run_dir: Path, mark: tuple[int, int]) -> dict[str, Any] | None:
    """The ``finished`` event that ``run_dir``'s metrics.jsonl holds at ``mark`` (a checkpoint's epoch and
    step), with the weights and test metrics of that end; None when the run did not finish there (a run killed
    in its end reports makes them again)."""
    path = run_dir / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if (r.get("epoch"), r.get("step")) == mark] if path.is_file() else []
    ended = next((r for r in records if r.get("event") == "finished"), None)
    if ended is None:
        return None
    test = next((r for r in records if r.get("event") == "test"), None)
    ended["test"] = {k: v for k, v in test.items() if k not in ("epoch", "step", "event", "weights")} if test else None
    return ended


def _mark(ckpt: dict[str, Any] | None) -> tuple[int, int]:
    """A checkpoint's (epoch, step)."""
    state = (ckpt or {}).get("state") or {}
    return int(state.get("epoch", -1)), int(state.get("step", -1))


def _elastic_plan(
    cfg: Config, info: Any, *, model: bool = False, dataset: bool = False
) -> tuple[Path | None, list[str] | None, Path | None]:
    """(run folder to resume, its overrides, folder to train in afresh) for a torchrun job: the folder this job
    (its token: not an earlier job that used the same rendezvous id) created, resumed when it has a checkpoint
    and the config is the run's; trained in afresh when the start died before its first checkpoint."""
    token = distributed.job_token()
    found = elastic_run_dir(cfg.train.runs_dir, info.run_id, job=token, search=distributed.generation() > 1)
    if found is None:
        other = elastic_run_dir(cfg.train.runs_dir, info.run_id)
        if other is not None:
            log.warning(
                "torchrun job id %s named run %s of an earlier job: this job starts a new run (continue that one "
                "with fasttrain train --resume %s)",
                info.run_id,
                other,
                other,
            )
        return None, None, None
    if not (found / "checkpoints" / "last.pt").is_file():
        if holds_checkpoints(found):
            return None, None, None
        log.warning(
            "torchrun job %s: its start ended before the first checkpoint; training afresh in %s", info.run_id, found
        )
        return None, None, found
    try:
        saved = checkpoint_config(load_checkpoint(found / "checkpoints" / "last.pt"), found)
    except (OSError, ValueError):  # the resume names the damage (and the checkpoints that remain)
        return found, None, None
    differ = _job_config_differs(cfg, saved, found, model=model, dataset=dataset)
    if differ:
        log.warning(
            "torchrun job %s: run %s was trained with another config (%s): this job starts a new run",
            info.run_id,
            found,
            differ,
        )
        return None, None, None
    restart = distributed.generation() - 1
    log.warning("torchrun restart %d of job %s: resuming %s from its last checkpoint", restart, info.run_id, found)
    return found, _overrides_of(cfg, saved), None


def _job_config_differs(
    cfg: Config, saved: Config, run_dir: Path, *, model: bool = False, dataset: bool = False
) -> str:
    """The settings in which the job's config differs from the run's saved one, beyond what a resume may change
    (empty: the same run). The job's config is raw and the saved one went through :func:`prepare`: what prepare
    fills in is compared as prepare fills it (a ``model`` from Python: ``model.name = custom``; a ``dataset``:
    channels and sizes from its items, which the dataset's own check on resume compares)."""
    from fasttrain.models import CUSTOM

    root = str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else saved.data.root
    data = dataclasses.replace(cfg.data, root=root)
    if dataset:
        data = dataclasses.replace(
            data,
            root=saved.data.root,
            channels=saved.data.channels,
            image_size=saved.data.image_size,
            resize_size=saved.data.resize_size,
        )
    outputs = cfg.model.num_outputs or saved.model.num_outputs
    name = CUSTOM if model else cfg.model.name
    job = dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, name=name, num_outputs=outputs))
    try:
        check_resume_config(saved, job, run_dir)
    except ConfigError as e:
        return str(e).removeprefix("--resume: ").split(" cannot change on resume")[0]
    return ""


def _share_checkpoint(
    ckpt: dict[str, Any] | None, start: Path, size: int, mark: tuple[int, int]
) -> dict[str, Any] | None:
    """The resumed checkpoint on every rank: read from the shared runs folder, or, where a rank does not see
    rank 0's (a runs folder each node has for itself, or an older checkpoint there: its size is rank 0's, its
    epoch and step, ``mark``, are not), sent by rank 0 to all."""
    info = distributed.current()
    if not info.enabled:
        return ckpt
    mine = ckpt if info.is_main else _own_copy(start, size, mark)
    blind = [r for r, ok in enumerate(distributed.all_gather_object(mine is not None)) if not ok]
    if not blind:
        return mine
    log.warning(
        "train.runs_dir is not shared with rank%s %s (no %s there, or another one): rank 0 sends the checkpoint "
        "to every rank",
        "s" if len(blind) > 1 else "",
        ", ".join(map(str, blind)),
        start,
    )
    return distributed.broadcast_object(ckpt if info.is_main else None)


def _own_copy(start: Path, size: int, mark: tuple[int, int]) -> dict[str, Any] | None:
    """``start`` as this rank reads it, where it is rank 0's checkpoint (its size, epoch and step); else None."""
    if not start.is_file() or start.stat().st_size != size:
        return None
    try:
        ckpt = load_checkpoint(start, resume=True)
    except Exception:  # noqa: BLE001 - damaged or another kind of file here: rank 0 sends its own
        return None
    return ckpt if _mark(ckpt) == tuple(mark) else None


def _resumed_config(run_dir: Path, overrides: list[str] | None, last: Path | None = None) -> tuple[Config, dict]:
    last = last or run_dir / "checkpoints" / "last.pt"
    if not last.is_file() and not last.is_symlink():
        raise FileNotFoundError(
            f"--resume: {last} not found: the run stopped before its first checkpoint (written after each "
            f"epoch, and every train.checkpoint_every_steps steps when set) or the file was deleted"
            f"{alternatives(last, resume=True)}"
        )
    ckpt = load_checkpoint(last, resume=True)
    saved = checkpoint_config(ckpt, last)
    cfg = saved
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        check_resume_config(saved, cfg, run_dir)
        _check_not_behind(cfg, ckpt, run_dir)
        keys = {o.partition("=")[0].strip() for o in overrides}
        if "train.epochs" in keys and "train.total_steps" not in keys and cfg.train.total_steps:
            # the run's length was a step plan (a time budget's): the new epochs replace it, not the other way
            log.info(
                "--resume: train.epochs = %d replaces the run's plan of %d steps",
                cfg.train.epochs,
                cfg.train.total_steps,
            )
            cfg.train.total_steps = 0
    return cfg, ckpt


def _check_not_behind(cfg: Config, ckpt: dict[str, Any], run_dir: Path) -> None:
    """A resume continues a run: a length below what it has trained (it would end at once, and its config.toml
    would say fewer epochs than its checkpoints hold) is refused, naming what starts a shorter run."""
    epoch, step = _mark(ckpt)
    tc = cfg.train
    into_next = bool((ckpt.get("position") or {}).get("micro"))  # a step checkpoint inside epoch + 1
    if tc.epochs < epoch + into_next or (tc.total_steps and tc.total_steps < step):
        which = (
            f"train.total_steps = {tc.total_steps}" if tc.epochs >= epoch + into_next else f"train.epochs = {tc.epochs}"
        )
        done = f"{epoch} epochs{' and part of the next' if into_next else ''}, {step} steps"
        raise ConfigError(
            f"--resume: {which} is less than this run has trained ({done} in {run_dir}); "
            f"a resume continues a run. A new, shorter run: fasttrain train {run_dir / 'config.toml'} --set "
            f"{which.replace(' = ', '=')}"
        )


def _late_replan_epoch(total: int, steps_per_epoch: int) -> int:
    """After how many epochs a plan of ``total`` steps re-plans a second time: the epoch that passes half its
    steps, when at least 3 epochs since the first re-plan and 3 after it are left to measure and to correct
    (0: no second re-plan). Derived from the plan alone, so every rank agrees."""
    epochs = -(-total // max(1, steps_per_epoch))
    late = (total // 2) // max(1, steps_per_epoch)
    return late if late >= 4 and epochs - late >= 3 else 0


def _overrides_of(cfg: Config, saved: Config) -> list[str]:
    """A torchrun restart resumes with the settings the job was started with (those a resume may change); a run
    whose length is a step plan (``train.total_steps``, a time budget's) keeps its plan."""
    if saved.train.total_steps or saved.train.epochs == cfg.train.epochs:
        return []
    return [f"train.epochs={cfg.train.epochs}"]


def _new_run(prep: Prepared, reuse: Path | None = None) -> tuple[Path, RunLock | None]:
    """Rank 0 creates the run folder and takes its lock (or trains in ``reuse``, the folder of this torchrun
    job's start that ended before its first checkpoint: no empty folder is left behind); the other ranks
    learn its name."""
    cfg, info = prep.cfg, prep.dist
    run_dir = lock = None
    if info.is_main:
        if reuse is not None:
            run_dir = reuse
            lock = RunLock(run_dir).acquire()
            clean_temp_files(run_dir)
            trim_metrics(run_dir / "metrics.jsonl", 0, 0)  # the dead start's step records: trained again
        else:
            run_dir = new_run_dir(cfg.train.runs_dir, run_name(cfg.name, cfg.train.run_name))
            lock = RunLock(run_dir).acquire()
        if info.enabled and info.run_id:
            remember_elastic_run(cfg.train.runs_dir, info.run_id, run_dir, distributed.job_token())
    run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    return run_dir, lock


class _RunLogHandler(logging.FileHandler):
    """train.log. A failed write (disk full) is said once on stderr, not as a traceback per log record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        self._warn(sys.exc_info()[1])

    def _warn(self, err: BaseException | None) -> None:
        if not self.failed:
            import sys

            self.failed = True
            print(
                f"fasttrain: warning: cannot write {self.baseFilename}: {os_reason(err) if err else 'error'}; "
                f"logging to the terminal only",
                file=sys.stderr,
            )

    def close(self) -> None:
        """Closing flushes what a full disk did not take: a bare "[Errno 28]" from here, raised in the engine's
        ``finally``, used to replace the run's own error (or fail a finished run). Said once, never raised."""
        try:
            super().close()
        except OSError as e:
            self._warn(e)


def _run_log_handler(path: Path) -> logging.Handler:
    try:
        handler = _RunLogHandler(path, encoding="utf-8")  # this run's log, beside its metrics
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}", e.errno, path=path, reason=os_reason(e)) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


def _attach_run_log(path: Path) -> logging.Handler:
    """train.log records INFO whatever the console shows (-q, or a Python caller that configured nothing):
    the package logger passes INFO on; what reaches the console is the console handler's own level."""
    handler = _run_log_handler(path)
    pkg = logging.getLogger("fasttrain")
    handler._level_before = pkg.level  # type: ignore[attr-defined]
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    return handler


def _api_console(quiet: bool) -> logging.Handler | None:
    """train() called from Python where nothing configured logging (no handler on the package logger or above):
    a console handler as the command line's (``quiet``: as ``-q``) for the call, detached by _detach_run_log."""
    from fasttrain.metrics import console_handler

    pkg = logging.getLogger("fasttrain")
    if pkg.hasHandlers():
        return None
    handler = console_handler(logging.WARNING if quiet else logging.INFO, bar_on_terminal=not quiet)
    handler._level_before = pkg.level  # type: ignore[attr-defined]
    if pkg.getEffectiveLevel() > handler.level:
        pkg.setLevel(handler.level)
    pkg.addHandler(handler)
    return handler


def _detach_run_log(handler: logging.Handler | None) -> None:
    if handler is None:
        return
    pkg = logging.getLogger("fasttrain")
    pkg.removeHandler(handler)
    pkg.setLevel(handler._level_before)  # type: ignore[attr-defined]
    handler.close()


# -- checks made before anything is written ------------------------------------------------------------------------
def _check_best_metric(
    task: Task, metric: str, has_val: bool, key: str = "train.best_metric", needed: bool = False
) -> None:
    """A typo in train.best_metric would silently write no best.pt (in early_stop_metric, never stop): refuse
    it before training. ``needed``: a validation metric must be there (early stopping watches it)."""
    if needed and not has_val and (metric or task.cfg.train.best_metric or task.best_metric).startswith("val_"):
        raise ConfigError(
            f"{key}: {metric or task.cfg.train.best_metric or task.best_metric} needs a validation split, and the "
            f"data has none (add data.val_dir or data.val_fraction > 0, or watch a train_ metric)"
        )
    if not metric:
        return
    names = [f"train_{m}" for m in task.train_metric_names]
    if has_val:
        evals = task.eval_metric_names()
        names += [f"val_{m}" for m in evals]
        if task.cfg.train.ema_decay > 0:
            names += [f"val_ema_{m}" for m in evals]
    if metric not in names:
        where = "" if has_val or not metric.startswith("val_") else " (there is no validation split)"
        raise ConfigError(
            f"{key}: {metric!r} is not a metric of task {task.name}{where}; choose one "
            f"of {', '.join(names)} (empty means {task.best_metric})"
        )


def _check_same_outputs(task: Task, ckpt: dict[str, Any], run_dir: Path) -> None:
    """A resumed run on moved data (data.root) must see the classes / targets the run was trained on; data with
    more or fewer samples than the checkpoint's is warned of."""
    saved, now = ckpt.get("meta") or {}, task.checkpoint_meta()
    for key in ("class_names", "target_names"):
        if saved.get(key) and now.get(key) and list(saved[key]) != list(now[key]):
            raise ConfigError(
                f"data.root: the data's {key.replace('_', ' ')} ({', '.join(now[key])}) differ from "
                f"those the run in {run_dir} was trained on ({', '.join(saved[key])})"
            )
    before, after = saved.get("samples"), now.get("samples")
    if before and after and before != after and distributed.current().is_main:
        log.warning(
            "the data changed since the checkpoint (%s samples): the run goes on with the data as it is now, no "
            "longer the run it would have been; a validation split held out by data.val_fraction is drawn again, "
            "so images it trained on may now validate",
            ", ".join(f"{k} {before.get(k, 0)} -> {after.get(k, 0)}" for k in sorted({*before, *after})),
        )


# -- device values ---------------------------------------------------------------------------------------------------
def _add_sums(acc: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        v = v.detach().float()
        acc[k] = acc[k] + v if k in acc else v.clone()


def _read(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device -> host transfer for all values (a single sync point)."""
    if not tensors:
        return {}
    keys = list(tensors)
    vals = torch.stack([tensors[k].reshape(()) for k in keys]).cpu().tolist()
    return dict(zip(keys, vals))


def evaluate(task: Task, state: TrainState, loader: Loader, *, ema: bool = False) -> dict[str, float]:
    """The task's metrics over ``loader`` (summed on the device, over all processes, read once). ``ema``:
    with the weights' moving average in place of the weights."""
    name = task.predict_module
    swapped = state.local.get(name)
    if ema:
        state.local[name] = state.ema[name].module
    state.train(False)
    sums: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for batch in loader:
                _add_sums(sums, task.eval_step(state, batch))
    finally:
        state.train(True)
        if ema and swapped is not None:
            state.local[name] = swapped
    # device=: a process whose shard had no samples (or only unreadable ones) still joins the all-reduce.
    return task.eval_metrics(_read(distributed.all_reduce_sums(sums, device=task.runtime.device)))


def _head(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of ``batch`` (views, no copy)."""
    return dataclasses.replace(batch, inputs=batch.inputs[:n], targets=batch.targets[:n])


def _test_metrics(task: Task, state: TrainState, loader: Loader, weights: str) -> dict[str, float]:
    """The test split's metrics with the weights in ``state`` (``weights`` says which, in the log)."""
    metrics = {f"test_{k}": v for k, v in evaluate(task, state, loader).items()}
    if state.ema:
        metrics.update({f"test_ema_{k}": v for k, v in evaluate(task, state, loader, ema=True).items()})
    log.info("test (%s): %s", weights, fmt_metrics(metrics))
    return metrics


def best_candidate(record: dict[str, Any], metric: str, mode: str, ema: bool) -> tuple[float | None, str | None]:
    """The epoch's value of ``metric`` for best.pt and which weights it belongs to (``raw`` | ``ema``; None
    without an EMA). With an EMA, a ``val_<m>`` metric is the better of ``val_<m>`` and ``val_ema_<m>``: best.pt
    keeps whichever weights validated better. ``val_ema_<m>`` asks for the average alone."""
    if not ema:
        return record.get(metric), None
    if metric.startswith("val_ema_"):
        return record.get(metric), "ema"
    if metric.startswith("val_"):
        raw, avg = record.get(metric), record.get("val_ema_" + metric[len("val_") :])
        if avg is not None and (raw is None or _better(mode, avg, raw)):
            return avg, "ema"
        return raw, "raw" if raw is not None else None
    return record.get(metric), "raw"  # a training metric: measured on the raw weights


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.4f}"


def _better(mode: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new > old if mode == "max" else new < old


@dataclass
class Running:
    """The epoch in progress: its summed training values (over all processes, on the device) and counts, the
    window since the last read, and the run of consecutive non-finite logged steps. Mid-epoch checkpoints hold
    it, so that a resumed epoch's record averages all the epoch's steps exactly as an uninterrupted run's.

    The epoch's sums are kept per global micro-batch (each process's values summed, divided by the number of
    processes), so an epoch that straddles a resume on another number of processes weighs every step alike."""

    epoch_sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    window: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    n_summed: int = 0
    """Global micro-batches in epoch_sums."""
    n_window: int = 0
    nonfinite_logs: int = 0

    def flush(self) -> dict[str, float]:
        """Move the window into the epoch's sums (summed over processes first); returns the window's means."""
        window = distributed.all_reduce_sums(self.window)
        world = distributed.current().world_size
        means = {k: v / (self.n_window * world) for k, v in _read(window).items()} if self.n_window else {}
        _add_sums(self.epoch_sums, {k: v / world for k, v in window.items()} if world > 1 else window)
        self.n_summed += self.n_window
        self.window, self.n_window = {}, 0
        return means

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch_sums": {k: v.detach().cpu() for k, v in self.epoch_sums.items()},
            "window": {k: v.detach().cpu() for k, v in self.window.items()},
            "n_summed": self.n_summed,
            "n_window": self.n_window,
            "nonfinite_logs": self.nonfinite_logs,
            "per_global_micro_batch": True,
        }

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any] | None, device: torch.device, micro: int = 0) -> Running:
        """``micro``: the micro-batches of the epoch done, which tells the processes an older checkpoint (sums
        over every process's micro-batches) was written with."""
        if not d:
            return cls()
        sums = {k: v.to(device) for k, v in d.get("epoch_sums", {}).items()}
        n_summed = int(d.get("n_summed", 0))
        if not d.get("per_global_micro_batch") and micro > 0 and n_summed > micro:
            world = max(round(n_summed / micro), 1)
            sums, n_summed = {k: v / world for k, v in sums.items()}, n_summed // world
        return cls(
            sums,
            {k: v.to(device) for k, v in d.get("window", {}).items()},
            n_summed,
            int(d.get("n_window", 0)),
            int(d.get("nonfinite_logs", 0)),
        )


def _init_from_data(module: Any, loader: Loader, images: int = 5000) -> None:
    """A model with ``init_from_data(x)`` (speednet's whitening layer) gets up to ``images`` of the first
    epoch's training images, normalized as the model sees them, before training starts (under torchrun every
    rank computes it from its shard; the data-parallel wrapper then gives every rank rank 0's weights)."""
    init = getattr(module, "init_from_data", None)
    if init is None:
        return
    got: list[torch.Tensor] = []
    n = 0
    for batch in _epoch_batches(loader, 0, 0):
        got.append(batch.inputs.float())
        n += len(batch)
        if n >= images:
            break
    x = torch.cat(got)[:images]
    init(x)
    log.info("%s initialised from the patches of %d training images", type(module).__name__, len(x))


def _epoch_numbers(first: int, tc: Any):
    """``first``, ``first + 1``, ... while below ``tc.epochs``, read afresh each time (a time budget re-plans it)."""
    epoch = first
    while epoch < tc.epochs:
        yield epoch
        epoch += 1


_MEASURE_SHARE = 0.03
"""A time budget's first measurement ends once it has spent this share of the budget (and timed one step)."""
_FINISH_S = 0.5
"""A time budget's allowance for the end of a run beyond its evaluations: the report files and the process's
exit. With confusion.png drawn by matplotlib they took 0.5-2 s on a 2-core machine under load (1.0 s allowed);
drawn by Pillow, the quickstart's last epoch line to its exit is 0.22-0.25 s on a quiet one. With 0.5 s the
quickstart's 15 s budget ended at 0.958-0.963 of it, its 60 s at 0.995 (2026-12-04, load 1.1-1.8)."""


def _plan_words(total: int, per_epoch: int) -> str:
    """A run's length for the log: ``120 steps = 6 epochs of 20`` or ``130 steps = 7 epochs (6 of 20, the last
    of 10)``."""
    whole, rest = divmod(total, max(per_epoch, 1))
    if not rest:
        return f"{total} steps = {whole} epoch{'s' if whole != 1 else ''} of {per_epoch}"
    if not whole:
        return f"{total} steps = 1 partial epoch (of {per_epoch})"
    return f"{total} steps = {whole + 1} epochs ({whole} of {per_epoch}, the last of {rest})"


def _announce_sizes(sizes: TrainSizes, prep: Prepared) -> None:
    """Progressive resizing: the sizes the run trains at, and what torch.compile makes of them."""
    distinct = sizes.distinct()
    compiled = ""
    if prep.runtime.compile:
        # One static graph per size (dynamic=False), plus evaluation's shapes: bounded by the distinct sizes.
        prep.runtime.allow_shapes(len(distinct) + 4)
        compiled = f"; torch.compile: one recompile per new size ({len(distinct)} training graphs, dynamic=False)"
    log.info(
        "progressive resizing: training at %s px (epochs %g-%g of %d, step %d px), evaluation at %d px%s",
        ", ".join(str(s) for s in distinct),
        sizes.start + 1,
        sizes.end + 1,
        sizes.epochs,
        sizes.step,
        prep.cfg.data.eval_crop,
        compiled,
    )


def _epoch_batches(loader: Loader, epoch: int, skip: int):
    """The epoch's batches, starting ``skip`` batches in: every loader skips without decoding, and yields from
    there what a full pass yields (augmentation is drawn per sample)."""
    loader.set_epoch(epoch)
    if skip:
        loader.skip_batches(skip)
    return iter(loader)


def _skipped_files(
    discovered: Sequence[tuple[Any, Any]], *loaders: Loader | None, root: Any = None
) -> list[tuple[str, str]]:
    """Files and records left out: at discovery (``discovered``: a source's ``skipped``), and by the loaders
    (unreadable images), each named once; under torchrun those of every rank (each loader meets the bad files of
    its own shard). A collective: every rank calls it at the same points. ``root``: this rank's data.root; a
    file under it is one file on every node wherever each mounts the data (named under this rank's root), not
    one per node (7 counted for 5 where the nodes' roots differed)."""
    mine = [*discovered, *(x for ld in loaders if ld is not None for x in ld.skipped)]
    base = str(root).rstrip("/") + "/" if root is not None else None

    def key(f: Any) -> str:  # "\0" + the path under the root, or the path as it is
        f = str(f)
        return "\0" + f[len(base) :] if base and f.startswith(base) else f

    seen: dict[str, str] = {}
    for part in distributed.all_gather_object([(key(f), str(why)) for f, why in mine]):
        for f, why in part:
            seen.setdefault(f, why)
    return [(f"{base}{f[1:]}" if f.startswith("\0") else f, why) for f, why in seen.items()]


def _log_skipped(skipped: list[tuple[str, str]], run_dir: Path | None, fmt: str, show: int = 20) -> None:
    """The files the run left out, in train.log (and on the terminal), at most ``show`` of them by name; all of
    them in ``run_dir``/skipped.txt when there are more (None writes nothing)."""
    if not skipped:
        return
    readable = ("folder", "shards", "paired", "manifest")  # the layouts check-data reads (not drawing, not Python's)
    check = "; `fasttrain check-data` on the data decodes every image" if fmt in readable else ""
    log.warning(
        "%d %s skipped (unreadable or unusable)%s:",
        len(skipped),
        "file was" if len(skipped) == 1 else "files were",
        check,
    )
    for f, why in skipped[:show]:
        log.warning("  skipped %s: %s", f, why)
    if len(skipped) > show:
        listed = ""
        if run_dir is not None:
            where = run_dir / "skipped.txt"
            atomic_write_text(where, "".join(f"{f}\t{why}\n" for f, why in skipped))
            listed = f" (all of them: {where})"
        log.warning("  ... and %d more%s", len(skipped) - show, listed)


# -- the loop ----------------------------------------------------------------------------------------------------
class Trainer:
    """One run: built from a prepared config and (on resume) a checkpoint, writing nothing; ``run(run_dir)``
    opens the run folder's files and trains; ``close()`` releases the loaders."""

    def __init__(
        self,
        prep: Prepared,
        ckpt: dict[str, Any] | None,
        *,
        progress: bool = True,
        on_epoch_end: Callable[[TrainState, dict[str, Any]], None] | None = None,
        started: float | None = None,
        marks: Sequence[tuple[str, float]] = (),
    ):
        """``started``: the ``time.perf_counter()`` reading a time budget counts from (default: now).
        ``marks``: the start-up's phases before this (name, ``time.perf_counter()`` at its end), in order, for its
        record; what is left up to now is ``prepare``."""
        self.prep, self.ckpt, self.progress, self.on_epoch_end = prep, ckpt, progress, on_epoch_end
        self._t_start = time.perf_counter()  # a time budget counts the set-up (loaders, a cache's decode) too
        began = self._t_start if started is None else started
        self._startup: list[tuple[str, float]] = [("start", began), *marks, ("prepare", self._t_start)]
        """Where the start-up went: (phase, perf_counter at its end), from the process's start (the command line)
        or the train() call; logged and recorded once the run folder is open."""
        cfg, task, source, info = prep.cfg, prep.task, prep.source, prep.dist
        if task.restoring != (ckpt is not None):  # resume: the checkpoint's weights, not the starting ones
            task = prep.new_task(restoring=ckpt is not None)
        self.cfg, self.task, self.source, self.tc = cfg, task, source, cfg.train
        self.is_main = info.is_main
        self.best_metric = self.tc.best_metric or task.best_metric
        self.best_mode = task.metric_mode(self.best_metric)
        self.train_loader = self._loader(source.train, train=True)
        self.val_loader = None
        try:
            self.val_loader = self._loader(source.val, train=False) if source.val else None
            self._startup.append(("loaders", time.perf_counter()))
            check_loaders(self.train_loader, cfg, self.val_loader)  # under torchrun: the same samples on every rank
            micro_per_epoch = len(self.train_loader)
            if micro_per_epoch < self.tc.accumulation:
                raise ConfigError(
                    f"train.batch_size: {self.tc.batch_size} is larger than the usable training set "
                    f"({self.train_loader.num_samples} images): no full step fits in an epoch"
                )
            self.steps_per_epoch = micro_per_epoch // self.tc.accumulation
            if self.tc.max_steps:
                self.steps_per_epoch = min(self.steps_per_epoch, self.tc.max_steps)
            self.total_steps = total_steps = self._run_length()
            self.sizes = train_sizes(cfg)
            if self.sizes.progressive:
                _announce_sizes(self.sizes, prep)
            self.state = state = task.build_state()
            if ckpt is None and not cfg.model.init_from:
                _init_from_data(state.modules.get(task.predict_module), self.train_loader)
            distributed.wrap_state(state, prep.runtime, sync_bn=prep.cfg.model.sync_bn)
            if ckpt is None and prep.dist.rank > 0:
                # Seeded alike up to here (the model's initialisation); from here each process draws its own
                # dropout masks, MixUp and random-erasing draws (timm seeds seed + rank), kept per rank by the
                # checkpoints. Rank 0 goes on as one process would.
                seed_everything(rank_seed(cfg.runtime.seed, prep.dist.rank))
            if self.tc.ema_decay > 0:
                _add_ema(state, task.predict_module, self.tc.ema_decay)
            state.schedulers = {
                k: make_scheduler(o, cfg.schedule, self.steps_per_epoch, total_steps)
                for k, o in state.optimizers.items()
            }
            self._startup.append(("model", time.perf_counter()))
        except BaseException:
            self.close()
            raise
        self.history: list[dict[str, Any]] = []
        self.finished: dict[str, Any] | None = None
        """The resumed run's end record when it finished at its checkpoint (:attr:`_RunPlan.finished`)."""
        self._stopped_recorded = False
        """A resumed run's metrics.jsonl holds its early stop's record."""
        self.resume_micro, self.running = 0, Running()
        self.stop = StopRequest()
        self.vote = distributed.StopVote(self.stop, prep.runtime.device)
        """Whether to stop at a step on the signal received (agreed by every process under torchrun)."""
        self.t_run, self.step_at_start = time.perf_counter(), 0  # set again when run() starts
        self._steady_rate: float | None = None
        """Training samples/s of the last epoch after its first step (a time budget's re-plan)."""
        self._global_batch = prep.micro_batch * self.tc.accumulation * prep.dist.world_size
        self._t_budget = self._t_start if started is None else started
        """When the time budget's clock started (perf_counter)."""
        self._eval_cost = (0.0, 0.0)
        """A time budget's measured evaluation: seconds per batch and per sample (the EMA's included)."""
        self._size_change_s = 0.0
        """A compiled step's first calls beyond the steady ones' (:attr:`fasttrain.budget.StepCosts.size_change_s`)."""
        self._replan_step = 0
        """A time budget whose first plan ends inside the first epoch re-plans at this step (0: after the first
        epoch, as a longer plan does; -1: done)."""
        self._late_epoch = 0
        """A plan of many epochs re-plans once more after this many epochs (about half of them; 0: none)."""
        self._epoch_walls: list[tuple[int, float, float | None, float]] = []
        """(epoch, training s, evaluation s or None, wall s) of the epochs since the first re-plan."""

    def _run_length(self) -> int:
        """The run's optimizer steps: ``train.total_steps`` when set (a time budget's plan; train.epochs becomes
        the epochs they start, the last one partial), else ``train.epochs`` whole epochs."""
        from fasttrain.budget import epochs_of

        tc, per_epoch = self.tc, self.steps_per_epoch
        if not tc.total_steps:
            return per_epoch * tc.epochs
        epochs = epochs_of(tc.total_steps, per_epoch)
        if epochs != tc.epochs:
            log.info(
                "train.total_steps = %d decides the run's length: %s (train.epochs = %d is replaced; "
                "train.total_steps = 0 trains whole epochs)",
                tc.total_steps,
                _plan_words(tc.total_steps, per_epoch),
                tc.epochs,
            )
            tc.epochs = epochs
        return tc.total_steps

    def _epoch_steps(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (0-based): whole epochs, and the rest of the run's steps in its last."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

    def _open(self, run_dir: Path) -> None:
        """The run folder's files: config, environment, checkpoint manager and metrics; on resume, the state."""
        prep, cfg, task, source, state, ckpt = self.prep, self.cfg, self.task, self.source, self.state, self.ckpt
        self.run_dir = run_dir
        log.info("run folder %s", run_dir)
        # The images the loaders use: files their pre-check left out are counted apart, not as used.
        used = [
            len(split or []) - len(_skipped_files((), loader, root=self.source.root) if split else [])
            for split, loader in ((source.train, self.train_loader), (source.val, self.val_loader))
        ]
        skipped = len(_skipped_files(source.skipped, self.train_loader, self.val_loader, root=source.root))
        log.info(
            "%s | data %s: %d train, %d val%s images%s, %s | loader %s (%s)%s",
            prep.runtime.describe(),
            cfg.data.root or source.root,  # a URL root as given (a Path keeps one slash of its "//")
            used[0],
            used[1],
            f", {len(source.test)} test" if source.test else "",
            f" ({skipped} file{'s' if skipped != 1 else ''} skipped)" if skipped else "",
            f"{len(source.class_names)} classes" if source.class_names else cfg.task.name,
            prep.backend,
            prep.backend_reason,
            f" | {prep.dist.world_size} processes, {prep.micro_batch} samples each per micro-batch"
            if prep.dist.enabled
            else "",
        )
        if prep.runtime.reasons:
            log.info("%s", prep.runtime.explain())
        if not source.val and self.best_metric.startswith("val_"):
            log.warning("no validation split: best.pt is not written (only last.pt)")
        self.ckpts = CheckpointManager(
            run_dir, cfg=cfg, task=task, state=state, best_metric=self.best_metric, enabled=self.is_main
        )
        mode_of, main = task.metric_mode, self.is_main
        self.early_stop, self.top_k = monitors(self.tc, self.ckpts.dir, self.best_metric, mode_of, main)
        self.ckpts.monitors = {"early_stop": self.early_stop, "top_k": self.top_k}
        self.metrics = MetricsLog(run_dir, self.tc.loggers, enabled=self.is_main)
        if self.is_main:
            write_run_config(run_dir, dump_config(cfg))  # on resume: rewritten when --set changed it
        if ckpt is None:
            if self.is_main:
                atomic_write_text(run_dir / "environment.json", json.dumps(environment(prep.runtime.device), indent=2))
            return
        _check_same_outputs(task, ckpt, run_dir)
        point = self.ckpts.restore(ckpt)
        if not point.own_rng and prep.dist.rank > 0:  # no stream of this rank in the checkpoint: one of its own
            seed_everything(rank_seed(cfg.runtime.seed, prep.dist.rank, state.step))
        self.resume_micro = point.micro
        if point.micro and point.order != self.train_loader.order:
            log.warning(
                "resuming %d batches into epoch %d, but its order depended on %s and now on %s: the rest of this "
                "epoch draws another order (some of its samples twice, some not at all); the next epochs are "
                "whole. Resume with the same processes and data.workers to continue the same order",
                point.micro,
                state.epoch + 1,
                point.order or "(seed, epoch) alone",
                self.train_loader.order or "(seed, epoch) alone",
            )
        self.running = Running.from_checkpoint(point.running, prep.runtime.device, point.micro)
        # A run killed in its end reports (no "finished" record yet) makes them again: its test record too.
        redone = ("test",) if self.finished is None else ()
        records = (
            trim_metrics(run_dir / "metrics.jsonl", state.epoch, state.step, redone=redone) if self.is_main else []
        )
        self.history = [r for r in records if "event" not in r]  # the test event stays in the file only
        mark = (state.epoch, state.step)
        self._stopped_recorded = any(
            r.get("event") == "early_stop" and (r["epoch"], r["step"]) == mark for r in records
        )
        log.info(
            "resumed from %s at step %d, %s",
            self.ckpts.last,
            state.step,
            f"{self.resume_micro} batches into epoch {state.epoch + 1}"
            if self.resume_micro
            else f"after epoch {state.epoch}",
        )
        self._say_replanned(ckpt)

    def _record_startup(self) -> None:
        """The start-up's phases in the log and as a ``startup`` event in metrics.jsonl. From :func:`train`:
        ``imports_s`` (from the process's start when the command line started the run: Python's start, the
        command line's imports and config; 0 for a call from Python), ``index_s`` (the run folder's decision,
        joining a torchrun job, the dataset's index, read, built or waited for; torch's imports go on meanwhile
        where another process builds it), ``device_s`` (the runtime's decisions, the device's first use);
        always: ``prepare_s`` (what is left before the loaders: the task, the backend's choice, the checks),
        ``loaders_s`` (building the loaders: the cache's decode), ``model_s`` (model, optimizer, a data-fitted
        first layer, EMA, schedules), ``open_s`` (a time budget's plan, the run folder, a resumed
        checkpoint)."""
        self._startup.append(("open", time.perf_counter()))
        marks = self._startup
        phases = {f"{name}_s": round(t - t_before, 3) for (_, t_before), (name, t) in zip(marks, marks[1:])}
        total = round(marks[-1][1] - marks[0][1], 3)
        log.info(
            "start-up %.1f s: %s",
            total,
            ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in phases.items()),
        )
        state = self.state
        self.metrics.event({"epoch": state.epoch, "step": state.step, "event": "startup", "startup_s": total, **phases})

    def _say_replanned(self, ckpt: dict[str, Any]) -> None:
        """A resume with another length (train.epochs, train.total_steps) re-plans a schedule that depends on the
        run's length (onecycle, cosine): the learning rate at this step changes, which is said with both values."""
        from fasttrain.optim import held_warmup, lr_factor

        saved = (ckpt.get("config") or {}).get("train") or {}
        sched, step, per_epoch = self.cfg.schedule, self.state.step, self.steps_per_epoch
        saved_total = int(saved.get("total_steps") or 0) or int(saved.get("epochs") or 0) * per_epoch
        if (
            not saved_total
            or saved_total == self.total_steps
            or sched.name not in ("onecycle", "cosine")
            or not self.state.schedulers
        ):
            return
        first = next(iter(self.state.schedulers.values()))
        peak, held = first.base_lrs[0], held_warmup(first)  # a warm-up a time budget held travels in the checkpoint
        before = peak * lr_factor(sched, step, per_epoch, saved_total, warmup=held)
        after = peak * lr_factor(sched, step, per_epoch, self.total_steps, warmup=held)
        if saved.get("total_steps") or self.tc.total_steps:
            change = f"the run's length {saved_total} -> {self.total_steps} steps"
            over = _plan_words(self.total_steps, per_epoch)
        else:
            change, over = f"train.epochs {saved.get('epochs')} -> {self.tc.epochs}", f"{self.tc.epochs} epochs"
        log.warning(
            "%s: the %s schedule is re-planned over %s; the learning rate at step %d goes from %.3g to %.3g",
            change,
            sched.name,
            over,
            step,
            before,
            after,
        )

    def _loader(self, split, *, train: bool) -> Loader:
        """This process's shard of ``split``: the global order is (seed, epoch)'s whatever the world size."""
        p = self.prep
        return self.task.make_loader(
            split,
            train=train,
            batch_size=p.micro_batch if train else p.eval_batch,
            backend=p.backend,
            num_shards=p.dist.world_size,
            shard_id=p.dist.rank,
        )

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, run_dir: Path) -> TrainResult:
        if self.tc.time_budget_s and self.ckpt is None:
            self._plan_budget()  # before the run folder's config.toml is written: it records the plan
        self._open(run_dir)
        tc, state = self.tc, self.state
        self.vote = distributed.StopVote(self.stop, self.prep.runtime.device)
        done = self.finished is not None and (state.epoch >= tc.epochs or self.early_stop.stopped)
        if not done:  # a finished run resumed adds no record
            self._record_startup()
            for note in self.task.data_notes() if self.is_main and self.ckpt is None else ():
                log.warning("%s", note)
        test_metrics, tested = None, ""
        test_loader = None
        state.train(True)
        try:
            self.t_run, self.step_at_start = time.perf_counter(), state.step
            if done:
                assert self.finished is not None
                return self._finished_already(self.finished)
            if self.early_stop.stopped:  # a resumed run that had stopped early
                log.info(
                    "%s; nothing left to train (a larger train.early_stop_patience goes on)", self.early_stop.reason
                )
                if not self._stopped_recorded:  # killed between the stop's checkpoint and its record
                    self.metrics.event({"epoch": state.epoch, "step": state.step, "event": "early_stop"})
            for epoch in _epoch_numbers(state.epoch if not self.early_stop.stopped else tc.epochs, tc):
                t_epoch = time.perf_counter()
                record = self.train_epoch(epoch)
                self.resume_micro = 0
                self.running = Running(nonfinite_logs=self.running.nonfinite_logs)
                last = epoch + 1 == tc.epochs
                if self.val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or last):
                    self._evaluate_into(record)
                state.epoch = epoch + 1
                stop = self._finish_epoch(record, last)
                log.info(
                    summary_line(
                        record,
                        tc.epochs,
                        eta_s=self._eta(),
                        skipped=len(self._skipped()),
                    )
                )
                budgeted = self.tc.time_budget_s and self.ckpt is None and not self._replan_step
                if budgeted and not stop and not last:
                    wall = time.perf_counter() - t_epoch
                    if epoch == 0:
                        self._replan_budget(wall, record)
                    elif self._late_epoch:
                        self._epoch_walls.append(
                            (epoch, float(record.get("epoch_time_s") or 0.0), record.get("eval_time_s"), wall)
                        )
                        if epoch + 1 == self._late_epoch:
                            self._replan_late()
                if self.on_epoch_end is not None:
                    self.on_epoch_end(state, record)
                if stop:
                    log.info(self.early_stop.reason)
                    self.metrics.event({"epoch": state.epoch, "step": state.step, "event": "early_stop"})
                    break
                if not last and self.vote.now():  # the epoch's checkpoint was just written
                    raise self._stopped(epoch + 1, saved=True)
            if self.val_loader is not None or self.source.test:
                tested = use_best(self.task, state, self.ckpts)
            if self.val_loader is not None:
                ema = bool(state.ema) and self.ckpts.best_weights == "ema"  # best.pt's average validated better
                self.task.on_run_end(
                    state,
                    self.run_dir if self.is_main else None,
                    self.val_loader,
                    tested + (", EMA" if ema else ""),
                    ema,
                )
            if self.source.test:
                test_loader = self._loader(self.source.test, train=False)
                test_metrics = _test_metrics(self.task, state, test_loader, tested)
                self.metrics.event(
                    {"epoch": state.epoch, "step": state.step, "event": "test", "weights": tested, **test_metrics}
                )
            skipped = self._skipped(test_loader)
            if self.is_main:  # the list is every rank's: said once
                _log_skipped(skipped, self.run_dir, self.source.format)
            best = self.ckpts.best_value
            log.info(
                "run finished: %d epochs, best %s %s%s, %d file%s skipped | %s",
                state.epoch,
                self.best_metric,
                f"{best:.4f}" if best is not None else "none",
                f" ({self.ckpts.best_weights} weights)" if state.ema and best is not None else "",
                len(skipped),
                "s" if len(skipped) != 1 else "",
                self.run_dir,
            )
            self.metrics.event({"epoch": state.epoch, "step": state.step, "event": "finished", "weights": tested})
        finally:
            if test_loader is not None:
                test_loader.close()
            self.metrics.close()
        return self._result(test_metrics, skipped, tested)

    def _result(self, test_metrics: dict[str, float] | None, skipped: list, tested: str) -> TrainResult:
        return TrainResult(
            self.run_dir,
            self.history,
            self.best_metric,
            self.ckpts.best_value,
            test_metrics,
            self.prep.backend,
            skipped,
            tested,
            self.early_stop.reason,
        )

    def _finished_already(self, ended: dict[str, Any]) -> TrainResult:
        """A resumed run that finished at its checkpoint and wrote its end: nothing is trained, evaluated or
        written again (its test metrics are the ones it recorded)."""
        stopped = self.early_stop.stopped
        log.info(
            "run already finished at epoch %d, step %d%s: nothing is trained, and its reports stand (%s)",
            self.state.epoch,
            self.state.step,
            f" ({self.early_stop.reason})" if stopped else "",
            "a larger train.early_stop_patience goes on"
            if stopped
            else f"--set train.epochs=N with N > {self.state.epoch} trains on",
        )
        skipped = self._skipped()
        return self._result(ended.get("test"), skipped, str(ended.get("weights") or ""))

    # -- a time budget -------------------------------------------------------------------------------------------
    def _plan_budget(self) -> None:
        """The optimizer steps that fit ``train.time_budget_s``, from a short measurement of training steps and of
        evaluation (undone: the weights, optimizer and random state are put back), broadcast from rank 0 so every
        process agrees. The last epoch may be partial: the schedule ends exactly at the last step."""
        rate = self._measure_rate(max_s=_MEASURE_SHARE * self.tc.time_budget_s)
        self._eval_cost = self._measure_eval(max_s=_MEASURE_SHARE * self.tc.time_budget_s)
        eval_s = self._eval_s(len(self.source.val or []))
        total, elapsed, costs = self._planned(self._global_batch / rate, eval_s, final_s=self._final_s())
        self._set_plan(total)
        # A plan inside the first epoch has no epoch's end to re-plan at: halfway through its steps instead, from
        # the steps' own time (a few measured steps are a rough guide to a whole run).
        self._replan_step = total // 2 if total <= self.steps_per_epoch and total >= 4 else 0
        log.info(
            "time budget %.0f s: %.1f samples/s measured (%.3f s per step), ~%.1f s per evaluation, %.1f s spent "
            "before training: %s (the schedule is stretched to them; re-planned once after the first epoch)",
            self.tc.time_budget_s,
            rate,
            costs.step_s,
            eval_s,
            elapsed,
            _plan_words(total, self.steps_per_epoch),
        )
        over = elapsed + total * costs.step_s + eval_s + costs.final_s - self.tc.time_budget_s
        if over > 0.1 * self.tc.time_budget_s:  # the minimum run (one step, evaluated) does not fit
            log.warning(
                "time budget %.0f s: %.1f s went before training (start-up and the measurement), so even the "
                "shortest run (%d step%s, evaluated) ends about %.1f s past it; a larger budget trains",
                self.tc.time_budget_s,
                elapsed,
                total,
                "s" if total != 1 else "",
                over,
            )

    def _planned(
        self, step_s: float, eval_s: float, *, final_s: float, end_s: float = 0.0, done: int = 0
    ) -> tuple[int, float, StepCosts]:
        """The run's steps that fit what is left of the budget at these costs (rank 0's plan, sent to every rank),
        the seconds spent so far, and the costs."""
        from fasttrain.budget import plan_steps

        costs = StepCosts(
            step_s,
            self.steps_per_epoch,
            eval_s=eval_s,
            end_s=end_s,
            final_s=final_s,
            eval_every=self.tc.eval_every,
            scale=self._size_scale,
            size_change_s=self._size_change_s,
        )
        elapsed = time.perf_counter() - self._t_budget
        total = int(distributed.broadcast_object(plan_steps(self.tc.time_budget_s, elapsed, costs, done=done)))
        return total, elapsed, costs

    def _position(self, epoch: int, n_micro: int) -> dict[str, Any]:
        """A mid-epoch checkpoint's place: the epoch, the micro-batches done, and what the training loader's order
        depends on beyond (seed, epoch) where it says (:attr:`~fasttrain.data.base.Loader.order`)."""
        order = self.train_loader.order
        return {"epoch": epoch, "micro": n_micro, **({"order": order} if order else {})}

    def _replan_budget(self, wall_s: float, record: dict[str, Any]) -> None:
        """After the first epoch: its measured times decide the rest. Its training is counted at the rate after
        its first step (the first carries the loader's start and warm-up, which later epochs do not pay); its
        evaluation and the rest of its end (checkpoint, record) as they took. A changed plan rewrites
        config.toml and writes the epoch's last.pt (whatever train.checkpoint_every says), so that a resume
        follows the plan."""
        train_s = float(record.get("epoch_time_s") or 0.0)
        steps = max(self._epoch_steps(0), 1)
        if self._steady_rate:
            train_s = min(train_s, steps * self._global_batch / self._steady_rate)
        evaluated = record.get("eval_time_s")
        eval_s = float(evaluated) if evaluated is not None else self._eval_s(len(self.source.val or []))
        end_s = max(wall_s - float(record.get("epoch_time_s") or 0.0) - float(evaluated or 0.0), 0.0)
        total, elapsed, _ = self._planned(
            max(train_s / steps, 1e-6), eval_s, final_s=self._final_s(eval_s), end_s=end_s, done=self.state.step
        )
        self._late_epoch = _late_replan_epoch(total, self.steps_per_epoch)
        if total == self.total_steps:
            return
        log.info(
            "time budget: the first epoch took %.1f s to train, %.1f s to evaluate and %.1f s more (%.1f s spent "
            "so far): %s instead of %s",
            train_s,
            eval_s if evaluated is not None else 0.0,
            end_s,
            elapsed,
            _plan_words(total, self.steps_per_epoch),
            _plan_words(self.total_steps, self.steps_per_epoch),
        )
        self._take_plan(total)

    def _take_plan(self, total: int) -> None:
        """A re-plan at an epoch's end: the schedule stretched to ``total`` steps, config.toml rewritten, and the
        epoch's last.pt written (again, or, on an epoch train.checkpoint_every skips, a first one: the newest may
        be a step checkpoint of this epoch, which holds the old plan), so that a resume follows the new plan."""
        self._set_plan(total)
        if self.is_main:
            write_run_config(self.run_dir, dump_config(self.cfg))
        self.ckpts.save_last()

    def _replan_late(self) -> None:
        """The second and last re-plan of a plan of many epochs, about halfway: from the epochs trained since the
        first (their steps, evaluations and ends as they took). The first epoch's end carries what only it pays
        (the first checkpoint, a loader's start), and priced at that cost over every later epoch's end it left
        a tenth of a short budget unused (60 s of ~160 small epochs)."""
        seen = self._epoch_walls
        steps = sum(self._epoch_steps(e) for e, *_ in seen)
        costs = StepCosts(1.0, self.steps_per_epoch, scale=self._size_scale, size_change_s=self._size_change_s)
        # at the first epoch's image size, without the compiles of new sizes (the plan counts those apart)
        train_s = sum(max(t - costs.epoch_start(e), 0.0) / self._size_scale(e) for e, t, _, _ in seen)
        evals = [float(v) for _, _, v, _ in seen if v is not None]
        eval_s = sum(evals) / len(evals) if evals else self._eval_s(len(self.source.val or []))
        end_s = sum(max(w - t - float(v or 0.0), 0.0) for _, t, v, w in seen) / len(seen)
        total, elapsed, _ = self._planned(
            max(train_s / max(steps, 1), 1e-6),
            eval_s,
            final_s=self._final_s(eval_s if evals else None),
            end_s=end_s,
            done=self.state.step,
        )
        self._late_epoch = 0
        if total == self.total_steps:
            return
        log.info(
            "time budget: the last %d epochs took %.2f s per step, %.1f s per evaluation and %.2f s more each "
            "(%.1f s spent so far): %s instead of %s",
            len(seen),
            train_s / max(steps, 1),
            eval_s if evals else 0.0,
            end_s,
            elapsed,
            _plan_words(total, self.steps_per_epoch),
            _plan_words(self.total_steps, self.steps_per_epoch),
        )
        self._take_plan(total)

    def _replan_inside(self, epoch: int, n_micro: int, rate: float) -> int:
        """The one re-plan of a budget whose first plan ends inside the first epoch, halfway through it: from
        the training rate of its steps since the first (``rate``, samples/s) and the first measurement's
        evaluation. Returns this epoch's steps under the new plan. A changed plan rewrites config.toml and, with
        step checkpoints, writes one here, so that a resume follows the new plan."""
        self._replan_step = -1  # done: no second re-plan after the first epoch
        if rate <= 0:
            return self._epoch_steps(epoch)
        eval_s = self._eval_s(len(self.source.val or []))
        done = self.state.step
        total, elapsed, _ = self._planned(self._global_batch / rate, eval_s, final_s=self._final_s(), done=done)
        if total != self.total_steps:
            log.info(
                "time budget: %d steps trained at %.1f samples/s (%.1f s spent so far): %s instead of %s",
                done,
                rate,
                elapsed,
                _plan_words(total, self.steps_per_epoch),
                _plan_words(self.total_steps, self.steps_per_epoch),
            )
            self._set_plan(total)
            if self.is_main:
                write_run_config(self.run_dir, dump_config(self.cfg))
            if self.tc.checkpoint_every_steps:  # an earlier step checkpoint of this epoch holds the old plan
                self.running.flush()
                self.ckpts.save_last(self._position(epoch, n_micro), self.running.to_checkpoint())
        return self._epoch_steps(epoch)

    def _size_scale(self, epoch: int) -> float:
        """A training step's cost at ``epoch`` relative to the first epoch's: the pixels per image (progressive
        resizing), which is what a convolutional step's work grows with."""
        return (self.sizes.size(epoch) / self.sizes.size(0)) ** 2

    def _final_s(self, eval_s: float | None = None) -> float:
        """The run's end after its last epoch, estimated: the task's report over the validation split (one
        pass, of the best weights: with an EMA, the mean of its and the model's), the test split's evaluation,
        and the report files and the process's exit (:data:`_FINISH_S`). ``eval_s``: a measured evaluation of
        the validation split, scaling the estimate."""
        n_val, n_test = len(self.source.val or []), len(self.source.test or [])
        scale = eval_s / self._eval_s(n_val) if eval_s and n_val and self._eval_s(n_val) > 0 else 1.0
        one_pass = self._eval_s(n_val) / (2 if self.state.ema else 1)  # with an EMA, the mean of the two passes
        return scale * (one_pass + self._eval_s(n_test)) + _FINISH_S

    def _eval_s(self, samples: int) -> float:
        """Seconds an evaluation of ``samples`` takes by the measured cost (the EMA's included; under torchrun each
        process evaluates its share)."""
        per_batch, per_sample = self._eval_cost
        samples = math.ceil(samples / self.prep.dist.world_size)
        return math.ceil(samples / max(self.prep.eval_batch, 1)) * per_batch + samples * per_sample

    def _set_plan(self, total: int) -> None:
        """The run's length becomes ``total`` optimizer steps (``train.total_steps``; train.epochs the epochs they
        start): the schedule is rebuilt for it (continuing at the current step), so it ends complete at the last
        step rather than being cut off."""
        import warnings

        from fasttrain.budget import epochs_of
        from fasttrain.optim import held_warmup, warmup_steps

        step = self.state.step
        # A re-plan during the run keeps the warm-up the run has been following (its cap at half the run would
        # otherwise move with the run's length: a longer plan inside the warm-up cut the rate back, one after it
        # sent the rate back into a warm-up). Before the first step the plan sets it.
        first = next(iter(self.state.schedulers.values()), None)
        held = (
            warmup_steps(self.cfg.schedule, self.steps_per_epoch, self.total_steps, held_warmup(first))
            if step
            else None
        )
        self.tc.total_steps = self.total_steps = total
        self.tc.epochs = epochs_of(total, self.steps_per_epoch)
        warmup = round(self.cfg.schedule.warmup_epochs * self.steps_per_epoch)
        if step == 0 and warmup > total // 2 and self.cfg.schedule.name != "onecycle":  # onecycle's: a share
            log.info(
                "time budget: schedule.warmup_epochs = %g (%d steps) is more than half the plan's %d steps: the "
                "warm-up takes %d steps, so the rate still decays to its end",
                self.cfg.schedule.warmup_epochs,
                warmup,
                total,
                total // 2,
            )
        for k, opt in self.state.optimizers.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
                sched = make_scheduler(opt, self.cfg.schedule, self.steps_per_epoch, total, warmup=held)
                if step:
                    sched.last_epoch = step - 1
                    sched.step()
            self.state.schedulers[k] = sched

    def _measure_eval(self, small: int = 16, large: int = 128, max_s: float = math.inf) -> tuple[float, float]:
        """(seconds per batch, seconds per sample) of an evaluation (the EMA's included), from ``large`` samples of
        the first validation batch (after a warm-up call: a shape's first call sets up its kernels; with CUDA
        graphs a second, which records them) and ``small`` ones: a call's own cost (test-time augmentation's
        passes, a small model's overheads) apart from the samples'. A warm-up longer than ``max_s`` is taken as
        the cost of a batch, with no more calls. Zero without a validation split.

        A compiled evaluation (CUDA) compiles a graph at each new batch shape: its warm-up is a compile, never a
        batch's cost, and a second shape would compile inside the timed calls. It is measured at the whole first
        batch alone (the shape the run evaluates at, so that compile is not wasted), as a cost per sample, and
        the split's last, smaller batch is compiled here too, untimed (in the first epoch's evaluation, its
        compile was charged by the re-plan to every evaluation after). The EMA's weights are evaluated eagerly
        (:func:`evaluate`): where the model's evaluation is compiled, the EMA's is measured on its own, else it
        costs as much again."""
        if self.val_loader is None:
            return 0.0, 0.0
        task, state, runtime = self.task, self.state, self.prep.runtime
        batch = next(iter(self.val_loader), None)
        if batch is None:  # this process's shard is empty (a split smaller than the processes): rank 0 plans
            return 0.0, 0.0
        rng = torch.get_rng_state()
        compiled = runtime.compile and not runtime.eager_eval
        name = task.predict_module
        state.train(False)
        try:
            with torch.no_grad():
                cost = self._time_eval(batch, small, large, max_s, compiled)
                dist = self.prep.dist  # this process's shard of the split (every backend's epoch_order)
                shard = len(range(dist.rank, self.val_loader.num_samples, dist.world_size))
                last = shard % max(self.val_loader.batch_size, 1)
                if compiled and 0 < last < len(batch):  # the last batch's shape: compiled now, not in epoch 1
                    for _ in range(runtime.warmup_calls):
                        task.eval_step(state, _head(batch, last))
                if state.ema and compiled:
                    swapped, state.local[name] = state.local[name], state.ema[name].module
                    try:
                        ema = self._time_eval(batch, small, large, max_s, compiled=False)
                    finally:
                        state.local[name] = swapped
                    return cost[0] + ema[0], cost[1] + ema[1]
        finally:
            state.train(True)
            torch.set_rng_state(rng)  # the run's random numbers are those of a run without a budget
        twice = 2 if state.ema else 1
        return cost[0] * twice, cost[1] * twice

    def _time_eval(self, batch: Batch, small: int, large: int, max_s: float, compiled: bool) -> tuple[float, float]:
        """:meth:`_measure_eval`'s timing of one set of weights: (seconds per batch, seconds per sample)."""
        task, state, runtime = self.task, self.state, self.prep.runtime
        sizes = [len(batch)] if compiled else sorted({min(len(batch), small), min(len(batch), large)}, reverse=True)
        # compiled: the compile (with CUDA graphs a warm-up run, then the recording); eager: each size once, as
        # cudnn.benchmark searches its algorithms at each new shape
        warmups = [sizes[0]] * runtime.warmup_calls if compiled else sizes
        warm = len(warmups)
        seconds: list[float] = []
        for i, n in enumerate(warmups + sizes):
            part = _head(batch, n)
            runtime.synchronize()
            t = time.perf_counter()
            task.eval_step(state, part)
            runtime.synchronize()
            seconds.append(time.perf_counter() - t)
            if i == 0 and seconds[0] > max_s and not compiled:
                break
        timed = seconds[warm:]
        if not timed:
            return seconds[0], 0.0
        per_sample = timed[0] / sizes[0]
        if len(sizes) == 2:
            per_sample = max((timed[0] - timed[1]) / (sizes[0] - sizes[1]), 0.0)
        return max(timed[0] - per_sample * sizes[0], 0.0), per_sample

    def _measure_rate(self, steps: int = 5, max_s: float = math.inf) -> float:
        """Training samples/s over a few steps of the first epoch's batches, after one warm-up step (compile,
        allocator; two with CUDA graphs, whose second step records them), ending early once ``max_s`` seconds are
        spent and one step is timed (one process only: under torchrun every rank takes the same steps); the steps
        are undone: weights, optimizer, scalers, EMA and random state are put back. A compiled step's warm-up
        beyond the steady steps' (the loader's first batch left out) is kept as what each new size of progressive
        resizing costs again (``_size_change_s``)."""
        import copy

        state, task, accum = self.state, self.task, self.tc.accumulation
        saved = copy.deepcopy(state.state_dict())
        rng = rng_state()  # as a checkpoint keeps them (CUDA's only where this process started it)
        runtime = self.prep.runtime
        warm = runtime.warmup_calls  # steps before the steady state: the compile; with CUDA graphs, the recording
        # whole optimizer steps only: a measurement ending inside an accumulation left its gradients behind
        micro = max(accum, min(len(self.train_loader) // accum * accum, (steps + warm) * accum))
        if self.prep.dist.enabled:  # each rank's clock would stop it at its own step: one more DDP all-reduce on
            max_s = math.inf  # some ranks than on others, and the job hangs; every rank times all the steps
        try:
            times: list[tuple[float, int]] = []
            n = window = 0
            first_wait = 0.0
            runtime.synchronize()
            t = t_start = time.perf_counter()
            for batch in _epoch_batches(self.train_loader, 0, 0):
                if n == 0:  # the loader's start and first batch: no step's cost
                    first_wait = time.perf_counter() - t
                task.train_step(state, batch, update=(n + 1) % accum == 0, loss_scale=1.0 / accum)
                n += 1
                window += len(batch)
                if n % accum == 0 or n == micro:
                    runtime.synchronize()
                    now = time.perf_counter()
                    times.append((now - t, window))
                    t, window = now, 0
                if n >= micro or (len(times) > warm and n % accum == 0 and t - t_start > max_s):
                    break
        finally:
            state.load_state_dict(saved)
            for name, optimizer in state.optimizers.items():  # a step cut short (an error) leaves none either
                optimizer.zero_grad(set_to_none=name not in state.ddp)  # as optimizer_step clears them
            set_rng_state(rng)
        timed = times[warm:] or times[-1:]  # the first steps carry compile and warm-up
        seconds = sum(t for t, _ in timed)
        if runtime.compile and len(times) > warm:  # what each new size of progressive resizing compiles again
            warm_s = sum(t for t, _ in times[:warm]) - first_wait
            self._size_change_s = max(warm_s - warm * seconds / len(timed), 0.0)
        samples = sum(b for _, b in timed) * self.prep.dist.world_size
        return samples / max(seconds, 1e-6)

    def _evaluate_into(self, record: dict[str, Any]) -> None:
        assert self.val_loader is not None
        t0 = time.perf_counter()
        record.update({f"val_{k}": v for k, v in evaluate(self.task, self.state, self.val_loader).items()})
        if self.state.ema:
            record.update(
                {f"val_ema_{k}": v for k, v in evaluate(self.task, self.state, self.val_loader, ema=True).items()}
            )
        record["eval_time_s"] = round(time.perf_counter() - t0, 3)
        if self.is_main:
            self.task.on_epoch_end(self.state, self.run_dir, self.val_loader)

    def _finite_everywhere(self) -> bool:
        """Whether the weights are finite in every process. Under torchrun the BatchNorm statistics differ between
        ranks at an epoch's end (DDP syncs buffers at the start of a forward; each rank's last forward updates its
        own), so one rank's may overflow alone: decided per rank, that rank raised Diverged while the others waited
        in their next collective until torchrun's timeout."""
        from fasttrain import distributed
        from fasttrain.checkpoint import finite_weights

        finite = finite_weights(self.state.modules)
        if distributed.current().enabled:
            bad = torch.tensor(0.0 if finite else 1.0, device=self.prep.runtime.device)
            finite = float(distributed.all_reduce_sums({"bad": bad})["bad"]) == 0.0
        return finite

    def _finish_epoch(self, record: dict[str, Any], last: bool) -> bool:
        """The epoch's record and checkpoints: best.pt when the metric improved (and the weights are finite),
        a top-k checkpoint, early stopping's count. Returns whether early stopping ends the run here."""
        value, weights = best_candidate(record, self.best_metric, self.best_mode, bool(self.state.ema))
        finite = self._finite_everywhere()
        rngs = self.ckpts.rng_states()  # on every process, once: rank 0 alone decides the top-k copies
        if weights is not None:
            record["weights"] = weights
            self.ckpts.weights = weights  # what predict uses from this epoch's checkpoints
        is_best = value is not None and _better(self.best_mode, value, self.ckpts.best_value) and finite
        if is_best:
            self.ckpts.best_value = value
        record["best"] = is_best
        self.metrics.epoch(record)
        self.history.append(record)
        if is_best:
            if self.state.ema:
                m = self.best_metric.removeprefix("val_").removeprefix("ema_")
                log.info(
                    "best.pt: the %s weights (val_%s %s, val_ema_%s %s)",
                    "averaged (EMA)" if weights == "ema" else "raw",
                    m,
                    _fmt(record.get(f"val_{m}")),
                    m,
                    _fmt(record.get(f"val_ema_{m}")),
                )
            self.ckpts.save_best(rngs=rngs)
        if self.top_k.wants(value) and finite:
            assert value is not None
            name = self.top_k.name_for(record["epoch"], value)
            self.ckpts.save_best(name, rngs=rngs)
            self.top_k.add(name, record["epoch"], value)
        stop = self.early_stop.update(record)
        if (record["epoch"]) % self.tc.checkpoint_every == 0 or last or stop:
            self.ckpts.save_last(rngs=rngs)
        if self.tc.max_nonfinite_logs and not finite:
            # Short epochs end before max_nonfinite_logs bad steps in a row: a run whose weights went inf / nan
            # used to exit 0 with NaN losses and no checkpoint at all.
            raise Diverged(
                f"training stopped after epoch {record['epoch']}, step {self.state.step}: the weights are not "
                f"finite (inf / nan): the run diverged; {self._kept()}. Lower optim.lr, or try optim.grad_clip "
                f"/ runtime.precision=fp32"
            )
        return stop

    def _kept(self) -> str:
        if self.ckpts.saved_at == "none yet":
            return "no checkpoint was written (the weights were not finite at any checkpoint)"
        return f"{self.ckpts.last} keeps the last finite weights ({self.ckpts.saved_at})"

    def _diverged(self, epoch: int, count: int) -> Diverged:
        tc = self.tc
        return Diverged(
            f"training stopped at epoch {epoch + 1}, step {self.state.step}: the training loss was not "
            f"finite (inf / nan) at {count} logged steps in a row (every {tc.log_every} steps); "
            f"{self._kept()}. Lower optim.lr, or "
            f"try optim.grad_clip / runtime.precision=fp32 (train.max_nonfinite_logs = 0 never stops)"
        )

    def _skipped(self, *more: Loader | None) -> list[tuple[str, str]]:
        """The run's skipped files over every rank (:func:`_skipped_files`; a collective)."""
        return _skipped_files(self.source.skipped, self.train_loader, self.val_loader, *more, root=self.source.root)

    def _stopped(self, epoch: int, *, saved: bool) -> Stopped:
        assert self.vote.signum is not None
        e = Stopped(self.vote.signum, saved=saved)
        if self.is_main:
            log.warning("%s: stopped at epoch %d, step %d; %s saved", e, epoch, self.state.step, self.ckpts.last)
        # every process leaves once rank 0 has written the checkpoint: torchrun's agent, seeing the others end
        # first, would end rank 0 in the middle of it
        distributed.barrier()
        return e

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch from micro-batch ``resume_micro`` on, continuing ``running`` (a resumed epoch's sums)."""
        task, state, runtime, tc = self.task, self.state, self.prep.runtime, self.tc
        accum, world = tc.accumulation, self.prep.dist.world_size
        micro_total = self._epoch_steps(epoch) * accum
        global_micro = self.prep.micro_batch * world
        bar = Progress(
            micro_total * global_micro,
            self.resume_micro * global_micro,
            f"epoch {epoch + 1}/{tc.epochs}",
            enabled=self.progress and self.is_main,
        )
        run = self.running
        n_micro, samples = self.resume_micro, 0
        size = self.sizes.size(epoch)
        if self.sizes.progressive and (epoch == 0 or self.resume_micro or size != self.sizes.size(epoch - 1)):
            log.info("epoch %d: training images at %d px", epoch + 1, size)
        warned_nonfinite = False
        runtime.synchronize()
        memory.reset_peak_memory(runtime.device)  # max_memory_gib: this epoch's training peak
        t0 = t_log = time.perf_counter()
        samples_log = 0
        t_first = samples_first = None
        try:
            for batch in _epoch_batches(self.train_loader, epoch, self.resume_micro):
                update = (n_micro + 1) % accum == 0
                _add_sums(run.window, task.train_step(state, batch, update=update, loss_scale=1.0 / accum))
                n_micro += 1
                run.n_window += 1
                samples += len(batch) * world
                bar.update(len(batch) * world)
                if update:
                    if t_first is None:  # the first step done: the loader is started and the step warm
                        t_first, samples_first = time.perf_counter(), samples
                    state.step += 1
                    for s in state.schedulers.values():
                        s.step()
                    if self.is_main:
                        task.on_step_end(state, batch, self.run_dir)
                    if state.step == self._replan_step and t_first is not None:
                        steady = (samples - (samples_first or 0)) / max(time.perf_counter() - t_first, 1e-6)
                        micro_total = self._replan_inside(epoch, n_micro, steady) * accum
                    if state.step % tc.log_every == 0:
                        means = run.flush()  # a sync point, on purpose only every log_every steps
                        now = time.perf_counter()
                        rate = (samples - samples_log) / (now - t_log) if now > t_log else None
                        t_log, samples_log = now, samples
                        self._log_step(epoch, n_micro // accum, means, rate, now - t0, samples, bar)
                        if all(math.isfinite(v) for v in means.values()):
                            run.nonfinite_logs = 0
                        else:
                            run.nonfinite_logs += 1
                            if not warned_nonfinite:
                                warned_nonfinite = True  # once per epoch: fp16 overflow steps are skipped anyway
                                log.warning(
                                    "epoch %d step %d: non-finite training values %s (learning rate too "
                                    "high? try runtime.precision=bf16/fp32 or optim.grad_clip)",
                                    epoch + 1,
                                    state.step,
                                    means,
                                )
                            if tc.max_nonfinite_logs and run.nonfinite_logs >= tc.max_nonfinite_logs:
                                raise self._diverged(epoch, run.nonfinite_logs)
                    every = tc.checkpoint_every_steps
                    saved = bool(every and state.step % every == 0 and n_micro < micro_total)
                    stopping = n_micro < micro_total and self.vote.at_step(state.step)  # else the epoch's end
                    if saved or stopping:
                        if saved or world > 1:  # the checkpoint holds sums over every process (a step checkpoint's
                            run.flush()  # flush is the straight run's too; a stop's, one process, keeps its window)
                        self.ckpts.save_last(self._position(epoch, n_micro), run.to_checkpoint())
                    if stopping:
                        raise self._stopped(epoch + 1, saved=True)
                if n_micro >= micro_total:
                    break
            run.flush()
            runtime.synchronize()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        if t_first is not None and samples_first is not None and samples > samples_first:
            self._steady_rate = (samples - samples_first) / max(t0 + elapsed - t_first, 1e-6)
        totals = _read(run.epoch_sums)
        count = max(run.n_summed, 1)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step}
        record.update({f"train_{k}": v / count for k, v in totals.items()})
        record["lr"] = next(iter(state.optimizers.values())).param_groups[0]["lr"]
        record["samples_per_s"] = round(samples / elapsed, 3) if elapsed > 0 else None
        record["epoch_time_s"] = round(elapsed, 3)
        if self.sizes.progressive:
            record["image_size"] = size
        peak = memory.read_peak(runtime.device)
        if peak.peak_allocated_bytes is not None:
            record["max_memory_gib"] = round(peak.peak_allocated_bytes / memory.GIB, 3)
        if peak.peak_reserved_bytes is not None:  # what the card gave torch: autotune's budget counts this
            record["max_reserved_gib"] = round(peak.peak_reserved_bytes / memory.GIB, 3)
        return record

    def _eta(self) -> float | None:
        """Seconds left in the run, the one estimate every line and the bar show: the time per optimizer step
        since this process started the run (evaluations included), times the steps left."""
        done = self.state.step - self.step_at_start
        left = self.total_steps - self.state.step
        return (time.perf_counter() - self.t_run) / done * left if done > 0 else None

    def _log_step(
        self,
        epoch: int,
        step_in_epoch: int,
        means: dict[str, float],
        rate: float | None,
        elapsed: float,
        samples: int,
        bar: Progress,
    ) -> None:
        """Every log_every steps: a step record in the metrics files, the bar's values on a terminal, and a
        plain line in train.log (and on a console without a bar)."""
        tc, state = self.tc, self.state
        lr = next(iter(state.optimizers.values())).param_groups[0]["lr"]
        eta = self._eta()
        bar.show(means, eta)
        self.metrics.step(
            {
                "epoch": epoch + 1,
                "step": state.step,
                **means,
                "lr": lr,
                "samples_per_s": round(rate, 3) if rate else None,
            }
        )
        log.info(
            step_line(epoch + 1, tc.epochs, step_in_epoch, self._epoch_steps(epoch), means, lr, rate, eta),
            extra={PROGRESS: True},
        )


# -- weight averages --------------------------------------------------------------------------
def _add_ema(state: TrainState, name: str, decay: float) -> None:
    """An exponential moving average of ``name``'s weights and buffers (warmed up), updated on the device after
    every optimizer step (:class:`fasttrain.ema.ModelEma`)."""
    from fasttrain.ema import ModelEma

    state.ema[name] = ModelEma(state.modules[name], decay)
