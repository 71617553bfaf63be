"""The training loop: epochs, steps, accumulation, evaluation, schedules, checkpoints, metrics, progress.

The engine owns time, order and files; the task owns what a batch means. Values are read back from the
device only every ``train.log_every`` steps and once per evaluation (each read is a CPU-GPU sync point).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fasttrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fasttrain.config import Config, config_from_dict, config_to_dict, dump_config
from fasttrain.data.base import Loader
from fasttrain.data.sources import DataSource, discover
from fasttrain.io import atomic_write_text
from fasttrain.optim import make_scheduler
from fasttrain.runtime import Runtime, environment, runtime_for, seed_everything
from fasttrain.tasks import Task, TrainState, make_task

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "prepare", "Prepared", "evaluate", "new_run_dir"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    """One record per epoch (what metrics.jsonl holds)."""
    best_metric: str
    best_value: float | None
    test_metrics: dict[str, float] | None = None
    backend: str = ""

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
    base.mkdir(parents=True, exist_ok=True)
    name = (cfg.train.run_name if not prefix else "") or f"{prefix}{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    for i in range(1000):
        d = base / (name if i == 0 else f"{name}-{i + 1}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
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


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _trim_metrics(path: Path, epochs_done: int) -> list[dict[str, Any]]:
    """On resume: drop records of epochs after the checkpoint (they will be run again); returns those kept."""
    if not path.is_file():
        return []
    keep = [r for r in map(json.loads, filter(str.strip, path.read_text(encoding="utf-8").splitlines()))
            if r.get("epoch", 0) <= epochs_done]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep


def train(cfg: Config | None = None, *, resume: str | Path | None = None, progress: bool = True,
          overrides: list[str] | None = None,
          on_epoch_end: Callable[[TrainState, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg`` in a new run folder, or continue the run in ``resume`` from its last checkpoint.

    ``overrides`` (``section.key=value``) apply on top of a resumed run's config (e.g. more epochs).
    ``on_epoch_end(state, record)`` is called after each epoch's checkpoint is written.
    """
    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        cfg = config_from_dict(ckpt["config"], source=f"{run_dir}/checkpoints/last.pt")
        if overrides:
            from fasttrain.config import apply_overrides

            cfg = apply_overrides(cfg, overrides)
    elif cfg is None:
        raise ValueError("train() needs a config or resume=RUN_DIR")

    prep = prepare(cfg)
    seed_everything(prep.cfg.runtime.seed)
    if resume is None:
        run_dir = new_run_dir(prep.cfg)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")  # this run's log, beside its metrics
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg_log = logging.getLogger("fasttrain")
    pkg_log.addHandler(handler)
    try:
        with prep.runtime.flags():
            return _train(prep, run_dir, ckpt, progress, on_epoch_end)
    finally:
        pkg_log.removeHandler(handler)
        handler.close()


def _train(prep: Prepared, run_dir: Path, ckpt: dict | None, progress: bool,
           on_epoch_end: Callable | None) -> TrainResult:
    cfg, runtime, task, source = prep.cfg, prep.runtime, prep.task, prep.source
    tc = cfg.train
    log.info("run folder %s", run_dir)
    log.info("%s | data %s: %d train, %d val%s images, %s | loader %s (%s)", runtime.describe(), source.root,
             len(source.train), len(source.val or []), f", {len(source.test)} test" if source.test else "",
             f"{len(source.class_names)} classes" if source.class_names else cfg.task.name, prep.backend,
             prep.backend_reason)

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

    state = task.build_state()
    state.schedulers = {k: make_scheduler(o, cfg.schedule, steps_per_epoch, total_steps)
                        for k, o in state.optimizers.items()}
    best_metric = tc.best_metric or task.best_metric
    best_mode = task.best_mode if best_metric == task.best_metric else _direction(best_metric)
    best_value = None
    resume_micro = 0  # micro-batches of the current epoch already trained (a mid-epoch checkpoint)
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_dir = run_dir / "checkpoints"
    history: list[dict[str, Any]] = []

    if ckpt is None:
        atomic_write_text(run_dir / "config.toml", dump_config(cfg))
        atomic_write_text(run_dir / "environment.json", json.dumps(environment(), indent=2))
    else:
        state.load_state_dict(ckpt["state"])
        set_rng_state(ckpt["rng"])
        best_value = ckpt.get("best_value")
        position = ckpt.get("position")
        if position and position["epoch"] == state.epoch:
            resume_micro = int(position["micro"])
        # history is one record per epoch; a finished run's "test" event stays in the file only
        history = [r for r in _trim_metrics(metrics_path, state.epoch) if "event" not in r]
        log.info("resumed from %s at epoch %d, step %d%s", ckpt_dir / "last.pt", state.epoch, state.step,
                 f" ({resume_micro} batches into epoch {state.epoch + 1})" if resume_micro else "")

    def payload(position: dict[str, int] | None = None) -> dict[str, Any]:
        """``position``: where inside an unfinished epoch a mid-epoch checkpoint was taken."""
        return {"state": state.state_dict(), "rng": rng_state(), "config": config_to_dict(cfg),
                "meta": task.checkpoint_meta(), "best_metric": best_metric, "best_value": best_value,
                "position": position}

    def checkpoint_mid_epoch(epoch: int, micro: int) -> None:
        save_checkpoint(ckpt_dir / "last.pt", payload({"epoch": epoch, "micro": micro}))

    state.train(True)
    try:
        t_run, first_epoch = time.perf_counter(), state.epoch
        for epoch in range(state.epoch, tc.epochs):
            record = _train_epoch(task, state, train_loader, epoch, steps_per_epoch, prep, run_dir, progress,
                                  start_micro=resume_micro, checkpoint=checkpoint_mid_epoch)
            resume_micro = 0
            last = epoch + 1 == tc.epochs
            if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or last):
                record.update({f"val_{k}": v for k, v in _timed_eval(task, state, val_loader, record).items()})
                task.on_epoch_end(state, run_dir, val_loader)
            state.epoch = epoch + 1
            value = record.get(best_metric)
            is_best = value is not None and _better(best_mode, value, best_value)
            if is_best:
                best_value = value
            record["best"] = is_best
            _append_jsonl(metrics_path, record)
            history.append(record)
            if is_best:
                save_checkpoint(ckpt_dir / "best.pt", payload())
            if (epoch + 1) % tc.checkpoint_every == 0 or last:
                save_checkpoint(ckpt_dir / "last.pt", payload())
            per_epoch = (time.perf_counter() - t_run) / (epoch + 1 - first_epoch)
            log.info(_summary_line(record, tc.epochs, eta_s=per_epoch * (tc.epochs - epoch - 1)))
            if on_epoch_end is not None:
                on_epoch_end(state, record)
        test_metrics = None
        if source.test:
            test_loader = task.make_loader(source.test, train=False, batch_size=tc.eval_batch, backend=prep.backend)
            try:
                test_metrics = {f"test_{k}": v for k, v in evaluate(task, state, test_loader).items()}
            finally:
                test_loader.close()
            _append_jsonl(metrics_path, {"epoch": state.epoch, "event": "test", **test_metrics})
            log.info("test (final weights): %s", _fmt_metrics(test_metrics))
    finally:
        train_loader.close()
        if val_loader is not None:
            val_loader.close()
    return TrainResult(run_dir, history, best_metric, best_value, test_metrics, prep.backend)


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
                 checkpoint: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    cfg, runtime = prep.cfg, prep.runtime
    tc = cfg.train
    accum = tc.accumulation
    micro_total = steps_per_epoch * accum
    bar = tqdm(total=micro_total * tc.micro_batch, initial=start_micro * tc.micro_batch, unit="img",
               unit_scale=False, dynamic_ncols=True, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
               leave=False, mininterval=0.5)
    epoch_sums: dict[str, torch.Tensor] = {}  # sums of per-step means, on the device
    window: dict[str, torch.Tensor] = {}
    n_micro, n_window, n_summed, samples = start_micro, 0, 0, 0
    every = tc.checkpoint_every_steps
    warned_nonfinite = False
    runtime.synchronize()
    if runtime.is_cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)  # max_memory_gib: this epoch's training peak
    t0 = time.perf_counter()
    for batch in _epoch_batches(loader, epoch, start_micro):
        update = (n_micro + 1) % accum == 0
        metrics = task.train_step(state, batch, update=update, loss_scale=1.0 / accum)
        _add_sums(window, metrics)
        n_micro += 1
        n_window += 1
        samples += len(batch)
        bar.update(len(batch))
        if update:
            state.step += 1
            for s in state.schedulers.values():
                s.step()
            task.on_step_end(state, batch, run_dir)
            if state.step % tc.log_every == 0:
                # A sync point, on purpose only every log_every steps.
                means = {k: v / n_window for k, v in _read(window).items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
                if not warned_nonfinite and not all(math.isfinite(v) for v in means.values()):
                    warned_nonfinite = True  # once per epoch: fp16 overflow steps are skipped by the scaler
                    log.warning("epoch %d step %d: non-finite training values %s (learning rate too high? try "
                                "runtime.precision=bf16/fp32 or optim.grad_clip)", epoch + 1, state.step, means)
                _add_sums(epoch_sums, window)
                n_summed += n_window
                window, n_window = {}, 0
            if every and checkpoint is not None and state.step % every == 0 and n_micro < micro_total:
                checkpoint(epoch, n_micro)
        if n_micro >= micro_total:
            break
    _add_sums(epoch_sums, window)
    n_summed += n_window
    runtime.synchronize()
    elapsed = time.perf_counter() - t0
    bar.close()
    totals = _read(epoch_sums)
    count = max(n_summed, 1)
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


def _summary_line(r: dict[str, Any], epochs: int, eta_s: float | None = None) -> str:
    keys = [k for k in r if k.startswith(("train_", "val_"))]
    parts = [f"epoch {r['epoch']}/{epochs}"] + [f"{k} {r[k]:.4f}" for k in keys]
    if r.get("samples_per_s"):
        parts.append(f"{r['samples_per_s']:.0f} img/s")
    parts.append(f"{r['epoch_time_s']:.1f}s")
    if r.get("best"):
        parts.append("*best*")
    if eta_s:
        parts.append(f"ETA {_fmt_duration(eta_s)}")
    return " | ".join(parts)
