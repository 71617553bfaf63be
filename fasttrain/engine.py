"""The training loop: epochs, steps, accumulation, evaluation, schedules, checkpoints, metrics, progress.

The engine owns time, order and files; the task owns what a batch means. Values are read back from the
device only every ``train.log_every`` steps and once per evaluation (each read is a CPU-GPU sync point).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fasttrain.checkpoint import (
    CheckpointError,
    check_resume_config,
    checkpoint_config,
    finite_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fasttrain.config import Config, ConfigError, config_to_dict, dump_config
from fasttrain.data.base import Loader
from fasttrain.data.sources import DataSource, discover
from fasttrain.io import WriteError, append_jsonl, atomic_write_text, check_writable, os_reason
from fasttrain.optim import make_scheduler
from fasttrain.rundir import RunError, RunLock, clean_temp_files, trim_metrics, write_run_config
from fasttrain.runtime import Runtime, environment, runtime_for, seed_everything
from fasttrain.tasks import Task, TrainState, make_task

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "prepare", "Prepared", "evaluate", "new_run_dir", "Diverged"]


class Diverged(RunError):
    """The training loss stayed non-finite (``train.max_nonfinite_logs`` logged steps in a row)."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    """One record per epoch (what metrics.jsonl holds)."""
    best_metric: str
    best_value: float | None
    test_metrics: dict[str, float] | None = None
    backend: str = ""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(file, reason) of every file or record the run left out (unreadable images, unusable manifest rows)."""

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


@dataclass
class Prepared:
    """Everything a loop needs, built once from a config (shared with autotune and bench)."""

    cfg: Config
    runtime: Runtime
    source: DataSource
    task: Task
    backend: str
    backend_reason: str


def resolve_data_root(cfg: Config) -> Config:
    """An empty data.root means the demo dataset, written on first use; the resolved path goes in the config."""
    if cfg.data.root:
        return cfg
    from fasttrain.data.synthetic import demo_dataset

    root = demo_dataset()
    log.info("data.root is empty: using the demo dataset in %s", root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))


def prepare(cfg: Config, *, memory_limit: int | None = None) -> Prepared:
    """Resolve the data root, discover files, fix the output count, decide the runtime and the backend.
    ``memory_limit``: device bytes the run may use when smaller than the card (the GPU cache must fit it)."""
    cfg = resolve_data_root(cfg)
    source = discover(cfg.data)
    if not cfg.model.num_outputs and source.num_outputs:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_outputs=source.num_outputs))
    runtime = runtime_for(cfg)
    task = make_task(cfg, runtime, source)
    if cfg.task.name == "classify":
        from fasttrain.data.loaders import choose_backend

        backend, reason = choose_backend(cfg.data.loader, device_type=runtime.device.type,
                                         num_images=len(source.train) + len(source.val or []), cfg=cfg,
                                         device=runtime.device, memory_limit=memory_limit)
    else:
        backend, reason = "torch", f"task {cfg.task.name} decodes with its own torch loader"
    return Prepared(cfg, runtime, source, task, backend, reason)


def new_run_dir(cfg: Config, prefix: str = "") -> Path:
    """A fresh folder in train.runs_dir, created here (so two runs cannot share it); an existing one is never
    reused: a suffix is added instead. ``prefix`` names other kinds of output (``autotune-``)."""
    base = Path(cfg.train.runs_dir).expanduser()
    name = (cfg.train.run_name if not prefix else "") or f"{prefix}{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            d = base / (name if i == 0 else f"{name}-{i + 1}")
            try:
                d.mkdir()
                return d
            except FileExistsError:
                continue
    except OSError as e:
        raise WriteError(f"train.runs_dir: cannot create a run folder in {base}: {os_reason(e)}", e.errno,
                         path=base, reason=os_reason(e)) from None
    raise FileExistsError(f"train.runs_dir: could not find a free run folder name for {name!r} in {base}")


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


def evaluate(task: Task, state: TrainState, loader: Loader) -> dict[str, float]:
    state.train(False)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in loader:
            _add_sums(sums, task.eval_step(state, batch))
    state.train(True)
    return task.eval_metrics(_read(sums))


def _better(mode: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new > old if mode == "max" else new < old


def train(cfg: Config | None = None, *, resume: str | Path | None = None, progress: bool = True,
          overrides: list[str] | None = None,
          on_epoch_end: Callable[[TrainState, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg`` in a new run folder, or continue the run in ``resume`` from its last checkpoint.

    ``overrides`` (``section.key=value``) apply on top of a resumed run's config (e.g. more epochs; what may
    change is :data:`fasttrain.checkpoint.RESUME_MAY_CHANGE`). ``on_epoch_end(state, record)`` is called after
    each epoch's checkpoint is written. One process at a time trains in a run folder (a lock); temp files of
    interrupted checkpoint writes are removed when a run resumes and when it ends.
    """
    ckpt = None
    lock = None
    try:
        if resume is not None:
            run_dir = Path(resume)
            if not run_dir.is_dir():
                raise FileNotFoundError(f"--resume: {run_dir} is not a run folder")
            lock = RunLock(run_dir).acquire()  # before reading anything a running process may be rewriting
            clean_temp_files(run_dir)
            check_writable(run_dir / "checkpoints", "--resume")  # a read-only copy fails now, not after an epoch
            last = run_dir / "checkpoints" / "last.pt"
            ckpt = load_checkpoint(last, resume=True)
            saved = checkpoint_config(ckpt, last)
            cfg = saved
            if overrides:
                from fasttrain.config import apply_overrides

                cfg = apply_overrides(cfg, overrides)
                check_resume_config(saved, cfg, run_dir)
        elif cfg is None:
            raise ValueError("train() needs a config or resume=RUN_DIR")

        prep = prepare(cfg)
        if prep.cfg.train.best_metric:  # before anything is written or trained
            _check_best_metric(prep.task, prep.cfg.train.best_metric, bool(prep.source.val))
        seed_everything(prep.cfg.runtime.seed)
        if resume is None:
            run_dir = new_run_dir(prep.cfg)
            lock = RunLock(run_dir).acquire()
        handler = _run_log_handler(run_dir / "train.log")
        pkg_log = logging.getLogger("fasttrain")
        pkg_log.addHandler(handler)
        try:
            with prep.runtime.flags():
                return _train(prep, run_dir, ckpt, progress, on_epoch_end)
        finally:
            pkg_log.removeHandler(handler)
            handler.close()
    finally:
        if lock is not None:
            clean_temp_files(run_dir)
            lock.release()


class _RunLogHandler(logging.FileHandler):
    """train.log. A failed write (disk full) is said once on stderr, not as a traceback per log record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"fasttrain: warning: cannot write {self.baseFilename}: {os_reason(err) if err else 'error'}; "
                  f"logging to the terminal only", file=sys.stderr)


def _run_log_handler(path: Path) -> logging.Handler:
    try:
        handler = _RunLogHandler(path, encoding="utf-8")  # this run's log, beside its metrics
    except OSError as e:
        raise WriteError(f"cannot write {path}: {os_reason(e)}", e.errno, path=path, reason=os_reason(e)) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


_TASK_METRICS = {  # what each task's records hold: (train metrics, eval metrics), without the prefix
    "classify": (("loss", "acc"), ("loss", "acc", "acc5")),
    "regress": (("loss",), ("loss", "mse", "point_px", "color_err")),
    "pix2pix": (("loss", "d_loss", "g_gan", "g_l1"), ("l1", "psnr")),
}


def _record_metrics(task: Task, has_val: bool) -> list[str] | None:
    """The metric names an epoch record of ``task`` holds; None for a task this table does not know."""
    known = _TASK_METRICS.get(task.name)
    if known is None:
        return None
    train_m, eval_m = known
    if task.name == "classify" and task.num_outputs <= 5:
        eval_m = tuple(m for m in eval_m if m != "acc5")  # top-5 of five or fewer classes says nothing
    if task.name == "regress" and not getattr(task, "is_drawing", False):
        eval_m = tuple(m for m in eval_m if m not in ("point_px", "color_err"))
    return [f"train_{m}" for m in train_m] + ([f"val_{m}" for m in eval_m] if has_val else [])


def _check_best_metric(task: Task, metric: str, has_val: bool) -> None:
    """A typo in train.best_metric would silently write no best.pt: refuse it before training."""
    names = _record_metrics(task, has_val)
    if names is None:
        return
    if metric not in names:
        where = "" if has_val or not metric.startswith("val_") else " (there is no validation split)"
        raise ConfigError(f"train.best_metric: {metric!r} is not a metric of task {task.name}{where}; choose one "
                          f"of {', '.join(names)} (empty means {task.best_metric})")


def _check_same_outputs(task: Task, ckpt: dict[str, Any], run_dir: Path) -> None:
    """A resumed run on moved data (data.root) must see the classes / targets the run was trained on."""
    saved, now = ckpt.get("meta") or {}, task.checkpoint_meta()
    for key in ("class_names", "target_names"):
        if saved.get(key) and now.get(key) and list(saved[key]) != list(now[key]):
            raise ConfigError(f"data.root: the data's {key.replace('_', ' ')} ({', '.join(now[key])}) differ from "
                              f"those the run in {run_dir} was trained on ({', '.join(saved[key])})")


def _skipped_files(source: DataSource, *loaders: Loader | None) -> list[tuple[str, str]]:
    """Files and records left out: at discovery, and by the loaders (unreadable images), each named once."""
    seen: dict[str, str] = {}
    for f, why in [*source.skipped, *(x for ld in loaders if ld is not None for x in getattr(ld, "skipped", []))]:
        seen.setdefault(str(f), str(why))
    return list(seen.items())


@dataclass
class _Running:
    """The epoch in progress: its summed training values (on the device) and counts, and the run of
    consecutive non-finite logged steps. Mid-epoch checkpoints hold it, so that a resumed epoch's record
    averages all the epoch's steps exactly as an uninterrupted run's does."""

    epoch_sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    window: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    n_summed: int = 0
    n_window: int = 0
    nonfinite_logs: int = 0

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch_sums": {k: v.detach().cpu() for k, v in self.epoch_sums.items()},
                "window": {k: v.detach().cpu() for k, v in self.window.items()},
                "n_summed": self.n_summed, "n_window": self.n_window, "nonfinite_logs": self.nonfinite_logs}

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any] | None, device: torch.device) -> _Running:
        if not d:
            return cls()
        return cls({k: v.to(device) for k, v in d.get("epoch_sums", {}).items()},
                   {k: v.to(device) for k, v in d.get("window", {}).items()},
                   int(d.get("n_summed", 0)), int(d.get("n_window", 0)), int(d.get("nonfinite_logs", 0)))


def _restore(state: TrainState, ckpt: dict[str, Any], run_dir: Path, device: torch.device
             ) -> tuple[float | None, int, _Running, list[dict[str, Any]]]:
    """Load a checkpoint into ``state`` and the RNGs; returns the best value so far, the micro-batches of the
    current epoch already trained, that epoch's running sums and the epoch records kept."""
    last = run_dir / "checkpoints" / "last.pt"
    try:
        state.load_state_dict(ckpt["state"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {last}: its state does not fit this run's model and optimizers "
                              f"({str(e).splitlines()[0]})") from None
    set_rng_state(ckpt["rng"])
    resume_micro, running = 0, _Running()
    position = ckpt.get("position")
    if position and position["epoch"] == state.epoch:
        resume_micro = int(position["micro"])
        running = _Running.from_checkpoint(ckpt.get("running"), device)
    # history is one record per epoch; a finished run's "test" event stays in the file only
    history = [r for r in trim_metrics(run_dir / "metrics.jsonl", state.epoch) if "event" not in r]
    log.info("resumed from %s at epoch %d, step %d%s", last, state.epoch, state.step,
             f" ({resume_micro} batches into epoch {state.epoch + 1})" if resume_micro else "")
    return ckpt.get("best_value"), resume_micro, running, history


def _train(prep: Prepared, run_dir: Path, ckpt: dict | None, progress: bool,
           on_epoch_end: Callable | None) -> TrainResult:
    cfg, runtime, task, source = prep.cfg, prep.runtime, prep.task, prep.source
    tc = cfg.train
    log.info("run folder %s", run_dir)
    log.info("%s | data %s: %d train, %d val%s images, %s | loader %s (%s)", runtime.describe(), source.root,
             len(source.train), len(source.val or []), f", {len(source.test)} test" if source.test else "",
             f"{len(source.class_names)} classes" if source.class_names else cfg.task.name, prep.backend,
             prep.backend_reason)
    best_metric = tc.best_metric or task.best_metric
    if not source.val and best_metric.startswith("val_"):
        log.warning("no validation split: best.pt is not written (only last.pt)")
    if ckpt is not None:
        _check_same_outputs(task, ckpt, run_dir)

    train_loader = task.make_loader(source.train, train=True, batch_size=tc.micro_batch, backend=prep.backend)
    val_loader = (task.make_loader(source.val, train=False, batch_size=tc.eval_batch, backend=prep.backend)
                  if source.val else None)
    micro_per_epoch = len(train_loader)
    if micro_per_epoch < tc.accumulation:
        raise ValueError(f"train.batch_size: {tc.batch_size} is larger than the training set "
                         f"({len(source.train)} images): no full step fits in an epoch")
    steps_per_epoch = micro_per_epoch // tc.accumulation
    if tc.max_steps:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps)
    total_steps = steps_per_epoch * tc.epochs

    task.restoring = ckpt is not None  # resume: the checkpoint's weights, not the starting ones
    state = task.build_state()
    state.schedulers = {k: make_scheduler(o, cfg.schedule, steps_per_epoch, total_steps)
                        for k, o in state.optimizers.items()}
    best_mode = task.best_mode if best_metric == task.best_metric else _direction(best_metric)
    best_value = None
    resume_micro = 0  # micro-batches of the current epoch already trained (a mid-epoch checkpoint)
    running = _Running()
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_dir = run_dir / "checkpoints"
    history: list[dict[str, Any]] = []
    saved_at = "none yet"  # what last.pt holds, for messages

    write_run_config(run_dir, dump_config(cfg))  # on resume: rewritten when --set changed it
    if ckpt is None:
        atomic_write_text(run_dir / "environment.json", json.dumps(environment(), indent=2))
    else:
        best_value, resume_micro, running, history = _restore(state, ckpt, run_dir, runtime.device)
        saved_at = f"epoch {state.epoch}, step {state.step}"

    def payload(position: dict[str, int] | None = None, run: _Running | None = None) -> dict[str, Any]:
        """``position``: where inside an unfinished epoch a mid-epoch checkpoint was taken; ``run``: that
        epoch's running sums."""
        return {"state": state.state_dict(), "rng": rng_state(), "config": config_to_dict(cfg),
                "meta": task.checkpoint_meta(), "best_metric": best_metric, "best_value": best_value,
                "position": position, "running": run.to_checkpoint() if run is not None else None}

    def save_last(position: dict[str, int] | None = None, run: _Running | None = None) -> bool:
        """Write last.pt unless the weights went non-finite (a diverged state must not replace a good one)."""
        nonlocal saved_at
        if not finite_weights(state.modules):
            log.warning("not writing %s at step %d: the weights are not finite; it keeps %s", ckpt_dir / "last.pt",
                        state.step, saved_at)
            return False
        save_checkpoint(ckpt_dir / "last.pt", payload(position, run))
        saved_at = f"epoch {state.epoch}, step {state.step}"
        return True

    def checkpoint_mid_epoch(epoch: int, micro: int, run: _Running) -> None:
        save_last({"epoch": epoch, "micro": micro}, run)

    def diverged(epoch: int, count: int) -> Diverged:
        return Diverged(f"training stopped at epoch {epoch + 1}, step {state.step}: the training loss was not "
                        f"finite (inf / nan) at {count} logged steps in a row (every {tc.log_every} steps); "
                        f"{ckpt_dir / 'last.pt'} keeps the last finite weights ({saved_at}). Lower optim.lr, or "
                        f"try optim.grad_clip / runtime.precision=fp32 (train.max_nonfinite_logs = 0 never stops)")

    state.train(True)
    try:
        t_run, first_epoch = time.perf_counter(), state.epoch
        for epoch in range(state.epoch, tc.epochs):
            record = _train_epoch(task, state, train_loader, epoch, steps_per_epoch, prep, run_dir, progress,
                                  start_micro=resume_micro, checkpoint=checkpoint_mid_epoch, running=running,
                                  diverged=diverged)
            resume_micro = 0
            running = _Running(nonfinite_logs=running.nonfinite_logs)
            last = epoch + 1 == tc.epochs
            if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or last):
                record.update({f"val_{k}": v for k, v in _timed_eval(task, state, val_loader, record).items()})
                task.on_epoch_end(state, run_dir, val_loader)
            state.epoch = epoch + 1
            finite = finite_weights(state.modules)
            value = record.get(best_metric)
            is_best = finite and value is not None and _better(best_mode, value, best_value)
            if is_best:
                best_value = value
            record["best"] = is_best
            append_jsonl(metrics_path, record)
            history.append(record)
            if is_best:
                save_checkpoint(ckpt_dir / "best.pt", payload())
            if (epoch + 1) % tc.checkpoint_every == 0 or last:
                save_last()
            skipped = _skipped_files(source, train_loader, val_loader)
            per_epoch = (time.perf_counter() - t_run) / (epoch + 1 - first_epoch)
            log.info(_summary_line(record, tc.epochs, eta_s=per_epoch * (tc.epochs - epoch - 1),
                                   skipped=len(skipped)))
            if on_epoch_end is not None:
                on_epoch_end(state, record)
        test_metrics = None
        test_loader = None
        if source.test:
            test_loader = task.make_loader(source.test, train=False, batch_size=tc.eval_batch, backend=prep.backend)
            try:
                test_metrics = {f"test_{k}": v for k, v in evaluate(task, state, test_loader).items()}
            finally:
                test_loader.close()
            append_jsonl(metrics_path, {"epoch": state.epoch, "event": "test", **test_metrics})
            log.info("test (final weights): %s", _fmt_metrics(test_metrics))
        skipped = _skipped_files(source, train_loader, val_loader, test_loader)
        _log_skipped(skipped)
        log.info("run finished: %d epochs, best %s %s, %d file%s skipped | %s", state.epoch, best_metric,
                 f"{best_value:.4f}" if best_value is not None else "none", len(skipped),
                 "s" if len(skipped) != 1 else "", run_dir)
    finally:
        train_loader.close()
        if val_loader is not None:
            val_loader.close()
    return TrainResult(run_dir, history, best_metric, best_value, test_metrics, prep.backend, skipped)


def _log_skipped(skipped: list[tuple[str, str]], show: int = 20) -> None:
    """The files the run left out, in train.log (and on the terminal), at most ``show`` of them by name."""
    if not skipped:
        return
    log.warning("%d files were skipped (unreadable or unusable); run `fasttrain check-data` on the data for "
                "the full report:", len(skipped))
    for f, why in skipped[:show]:
        log.warning("  skipped %s: %s", f, why)
    if len(skipped) > show:
        log.warning("  ... and %d more", len(skipped) - show)


def _timed_eval(task: Task, state: TrainState, loader: Loader, record: dict) -> dict[str, float]:
    t0 = time.perf_counter()
    out = evaluate(task, state, loader)
    record["eval_time_s"] = round(time.perf_counter() - t0, 3)
    return out


def _epoch_batches(loader: Loader, epoch: int, skip: int):
    """The epoch's batches, starting ``skip`` batches in (loaders that can skip without decoding do so)."""
    loader.set_epoch(epoch)
    if skip and hasattr(loader, "skip_batches"):
        loader.skip_batches(skip)
        return iter(loader)
    it = iter(loader)
    for _ in range(skip):  # draw and drop: keeps a loader's own random stream where a full pass has it
        next(it)
    return it


def _train_epoch(task: Task, state: TrainState, loader: Loader, epoch: int, steps_per_epoch: int,
                 prep: Prepared, run_dir: Path, progress: bool, *, start_micro: int = 0,
                 checkpoint: Callable[[int, int, _Running], None] | None = None, running: _Running | None = None,
                 diverged: Callable[[int, int], Exception] | None = None) -> dict[str, Any]:
    """One epoch from micro-batch ``start_micro`` on, continuing ``running`` (a resumed epoch's sums)."""
    cfg, runtime = prep.cfg, prep.runtime
    tc = cfg.train
    accum = tc.accumulation
    micro_total = steps_per_epoch * accum
    bar = tqdm(total=micro_total * tc.micro_batch, initial=start_micro * tc.micro_batch, unit="img",
               unit_scale=False, dynamic_ncols=True, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
               leave=False, mininterval=0.5)
    run = running if running is not None else _Running()  # sums of per-step means, on the device
    n_micro, samples = start_micro, 0
    every = tc.checkpoint_every_steps
    warned_nonfinite = False
    runtime.synchronize()
    if runtime.is_cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)  # max_memory_gib: this epoch's training peak
    t0 = time.perf_counter()
    for batch in _epoch_batches(loader, epoch, start_micro):
        update = (n_micro + 1) % accum == 0
        metrics = task.train_step(state, batch, update=update, loss_scale=1.0 / accum)
        _add_sums(run.window, metrics)
        n_micro += 1
        run.n_window += 1
        samples += len(batch)
        bar.update(len(batch))
        if update:
            state.step += 1
            for s in state.schedulers.values():
                s.step()
            task.on_step_end(state, batch, run_dir)
            if state.step % tc.log_every == 0:
                # A sync point, on purpose only every log_every steps.
                means = {k: v / run.n_window for k, v in _read(run.window).items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
                if all(math.isfinite(v) for v in means.values()):
                    run.nonfinite_logs = 0
                else:
                    run.nonfinite_logs += 1
                    if not warned_nonfinite:
                        warned_nonfinite = True  # once per epoch: fp16 overflow steps are skipped by the scaler
                        log.warning("epoch %d step %d: non-finite training values %s (learning rate too high? try "
                                    "runtime.precision=bf16/fp32 or optim.grad_clip)", epoch + 1, state.step, means)
                    if tc.max_nonfinite_logs and run.nonfinite_logs >= tc.max_nonfinite_logs and diverged:
                        bar.close()
                        raise diverged(epoch, run.nonfinite_logs)
                _add_sums(run.epoch_sums, run.window)
                run.n_summed += run.n_window
                run.window, run.n_window = {}, 0
            if every and checkpoint is not None and state.step % every == 0 and n_micro < micro_total:
                checkpoint(epoch, n_micro, run)
        if n_micro >= micro_total:
            break
    _add_sums(run.epoch_sums, run.window)
    run.n_summed += run.n_window
    runtime.synchronize()
    elapsed = time.perf_counter() - t0
    bar.close()
    totals = _read(run.epoch_sums)
    count = max(run.n_summed, 1)
    record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step}
    record.update({f"train_{k}": v / count for k, v in totals.items()})
    opt = next(iter(state.optimizers.values()))
    record["lr"] = opt.param_groups[0]["lr"]
    record["samples_per_s"] = round(samples / elapsed, 1) if elapsed > 0 else None
    record["epoch_time_s"] = round(elapsed, 3)
    if runtime.is_cuda:
        record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 3)
    return record


def _direction(metric: str) -> str:
    """Whether a higher (accuracy, PSNR) or lower (losses, errors) value of a metric is better."""
    return "max" if any(k in metric for k in ("acc", "psnr")) else "min"


def _fmt_metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _fmt_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _summary_line(r: dict[str, Any], epochs: int, eta_s: float | None = None, skipped: int = 0) -> str:
    keys = [k for k in r if k.startswith(("train_", "val_"))]
    parts = [f"epoch {r['epoch']}/{epochs}"] + [f"{k} {r[k]:.4f}" for k in keys]
    if r.get("samples_per_s"):
        parts.append(f"{r['samples_per_s']:.0f} img/s")
    parts.append(f"{r['epoch_time_s']:.1f}s")
    if skipped:
        parts.append(f"{skipped} file{'s' if skipped != 1 else ''} skipped")
    if r.get("best"):
        parts.append("*best*")
    if eta_s:
        parts.append(f"ETA {_fmt_duration(eta_s)}")
    return " | ".join(parts)
