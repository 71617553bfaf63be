"""``fasttrain lr-find CONFIG``: the learning-rate range test (Leslie Smith, 2015; Lightning's ``lr_find``).

The config's model, optimizer and data train for up to ``steps`` optimizer steps while the learning rate grows
exponentially from ``start_lr`` to ``end_lr``; the loss is smoothed (an exponential moving average, debiased)
and the sweep stops early once it exceeds ``diverge`` times its lowest value. The suggestion is the rate where
the smoothed loss falls fastest (the steepest descent against log(lr), the first ``skip_begin`` and last
``skip_end`` points left out, as Lightning does). ``lr_find.json`` and ``lr_find.png`` go into a new folder;
the sweep trains a throw-away copy of the model: no run folder, checkpoint or config of the user's is read or
written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.config import Config, ConfigError

log = logging.getLogger(__name__)

__all__ = ["LRFindResult", "lr_find", "suggest", "smooth"]


@dataclass
class LRFindResult:
    lrs: list[float]
    """The learning rate of each step of the sweep."""
    losses: list[float]
    """The training loss of each step (mean over its micro-batches)."""
    smoothed: list[float]
    """The debiased exponential moving average of the losses."""
    suggestion: float | None
    """Where the smoothed loss falls fastest; None when the sweep was too short to say."""
    reason: str
    """Why the sweep ended (end_lr reached, or the loss diverged at which rate)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """start_lr, end_lr, steps, smoothing, diverge, and the config's optimizer, model and batch."""
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["files"] = [str(f) for f in self.files]
        return d


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)) if beta > 0 else loss)
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_begin: int = 10, skip_end: int = 1) -> float | None:
    """The rate of the steepest fall of ``smoothed`` against log(lr) (points equally spaced in log(lr): the
    gradient over the index), leaving out the first ``skip_begin`` and last ``skip_end`` points; None when fewer
    than 3 remain."""
    pts = smoothed[skip_begin : len(smoothed) - skip_end]
    if len(pts) < 3:
        return None
    n = len(pts)
    # numpy.gradient's rule: central differences inside, one-sided at the ends
    grads = [(pts[min(i + 1, n - 1)] - pts[max(i - 1, 0)]) / (min(i + 1, n - 1) - max(i - 1, 0)) for i in range(n)]
    return lrs[skip_begin + min(range(len(grads)), key=grads.__getitem__)]


def lr_find(
    cfg: Config,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    out_dir: str | os.PathLike | None = None,
    model: Any = None,
    dataset: Any = None,
) -> LRFindResult:
    """Sweep the learning rate of ``cfg``'s optimizer from ``start_lr`` to ``end_lr`` over ``steps`` steps; write
    lr_find.json and lr_find.png into ``out_dir`` (default: train.runs_dir/lr-find-<name>-<date>-<time>)."""
    _check(start_lr > 0, "--start-lr", f"must be > 0, got {start_lr}")
    _check(end_lr > start_lr, "--end-lr", f"must be above --start-lr ({start_lr:g}), got {end_lr}")
    _check(steps >= 5, "--steps", f"must be >= 5, got {steps}")
    _check(0 <= beta < 1, "--smoothing", f"must be in [0, 1), got {beta}")
    _check(diverge > 1, "--diverge", f"must be > 1, got {diverge}")
    from fasttrain.prepare import prepare
    from fasttrain.runtime import seed_everything

    prep = prepare(cfg, model=model, dataset=dataset)
    if prep.dist.enabled:
        raise ConfigError("lr-find: runs in one process; start it without torchrun")
    task = prep.task
    if "loss" not in task.train_metric_names or task.name == "pix2pix":
        raise ConfigError(
            f"task.name: lr-find needs one network trained on one loss; task {task.name} trains "
            f"{'two networks against each other' if task.name == 'pix2pix' else 'without a loss'}"
        )
    seed_everything(prep.cfg.runtime.seed)
    accum = prep.cfg.train.accumulation
    with prep.runtime.flags():
        loader = task.make_loader(prep.source.train, train=True, backend=prep.backend, batch_size=prep.micro_batch)
        try:
            if len(loader) < accum:
                raise ConfigError(
                    f"train.batch_size: {prep.cfg.train.batch_size} is larger than the training set "
                    f"({loader.num_samples} images)"
                )
            state = task.build_state()
            lrs, losses, smoothed, reason = _sweep(task, state, loader, accum, start_lr, end_lr, steps, beta, diverge)
        finally:
            loader.close()
    result = LRFindResult(
        lrs,
        losses,
        smoothed,
        suggest(lrs, smoothed),
        reason,
        {
            "start_lr": start_lr,
            "end_lr": end_lr,
            "steps": steps,
            "smoothing": beta,
            "diverge": diverge,
            "optim.name": prep.cfg.optim.name,
            "optim.lr (config)": prep.cfg.optim.lr,
            "model.name": prep.cfg.model.name,
            "train.batch_size": prep.cfg.train.batch_size,
        },
    )
    result.out_dir = _out_dir(prep.cfg, out_dir)
    result.files = _write(result)
    return result


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"lr-find {flag}: {msg}")


def _sweep(task, state, loader, accum, start_lr, end_lr, steps, beta, diverge):
    """The exponential sweep: one optimizer step per rate; stops at end_lr or once the loss diverges."""
    optimizers = list(state.optimizers.values())
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    best, avg = math.inf, 0.0
    reason = f"reached end_lr {end_lr:g} after {steps} steps"
    epoch, it = 0, None
    state.train(True)
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # timm's layer-wise decay scales each group
        total = 0.0
        for micro in range(accum):
            batch = None
            while batch is None:
                if it is None:
                    loader.set_epoch(epoch)
                    it, epoch = iter(loader), epoch + 1
                batch = next(it, None)
                if batch is None:
                    it = None
            out = task.train_step(state, batch, update=micro == accum - 1, loss_scale=1.0 / accum)
            total += float(out["loss"]) / accum  # a sync per step: the sweep needs each loss
        lrs.append(lr)
        losses.append(total)
        if not math.isfinite(total):
            reason = f"the loss was not finite at lr {lr:.3g} (step {i + 1})"
            break
        avg = beta * avg + (1 - beta) * total  # as smooth(), one step at a time
        smoothed.append(avg / (1 - beta ** len(losses)))
        best = min(best, smoothed[-1])
        if smoothed[-1] > diverge * best:
            reason = f"the smoothed loss passed {diverge:g} x its lowest at lr {lr:.3g} (step {i + 1})"
            break
    lrs = lrs[: len(smoothed)]
    return lrs, losses[: len(smoothed)], smoothed, reason


def _out_dir(cfg: Config, out_dir: str | os.PathLike | None) -> Path:
    if out_dir is not None:
        d = Path(out_dir).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        return d
    from fasttrain.rundir import new_run_dir, run_name

    return new_run_dir(cfg.train.runs_dir, run_name(cfg.name, prefix="lr-find-"))


def _write(result: LRFindResult) -> list[Path]:
    """lr_find.json and lr_find.png, never over an existing file (``-2`` and on where the names are taken)."""
    from fasttrain.io import write_new, write_new_text

    assert result.out_dir is not None
    js = write_new_text(result.out_dir / "lr_find.json", json.dumps(result.to_json(), indent=2) + "\n")
    png = write_new(result.out_dir / "lr_find.png", lambda p: _figure(result).savefig(p, format="png", dpi=110))
    return [js, png]


def _figure(result: LRFindResult) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    if result.suggestion is not None:
        i = result.lrs.index(result.suggestion)
        ax.plot(
            [result.suggestion],
            [result.smoothed[i]],
            "o",
            color="C3",
            ms=8,
            label=f"suggestion {result.suggestion:.3g} (steepest fall)",
        )
    lo, hi = min(result.losses + result.smoothed), max(result.smoothed)
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))  # a last exploding loss would flatten it
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test: {result.settings.get('model.name', '')}, {result.settings.get('optim.name', '')}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
