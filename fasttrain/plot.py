"""``fasttrain plot RUN_DIR...``: a run's curves from its ``metrics.jsonl`` in one PNG, several runs overlaid.

Four panels against optimizer steps: the loss (training, from the step records written every
``train.log_every`` steps, and validation per epoch), the task's validation metric (accuracy for a classifier,
the point error for the drawing task, ...), the learning rate, and samples/s. A run without step records (a
run from before they existed) is drawn from its epoch records alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.io import atomic_replace, read_jsonl, write_new

log = logging.getLogger(__name__)

__all__ = ["RunCurves", "read_curves", "plot_runs"]

# The validation metric drawn per task, first one present wins.
_METRICS = ("val_acc", "val_point_px", "val_psnr", "val_l1", "val_mse")


@dataclass
class RunCurves:
    name: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Step records (``"event": "step"``)."""
    epochs: list[dict[str, Any]] = field(default_factory=list)
    """Epoch records (no ``event``)."""
    best_metric: str = ""
    """The run's train.best_metric (its config.toml), drawn and starred where it recorded it."""

    def series(self, key: str, source: str = "epochs") -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` in the step or epoch records, skipping records without it."""
        recs = self.steps if source == "steps" else self.epochs
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and r.get("step") is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def metric(self) -> str | None:
        wanted = (self.best_metric, *_METRICS) if self.best_metric.startswith("val_") else _METRICS
        return next((m for m in wanted if any(m in r for r in self.epochs)), None)


def read_curves(run_dir: str | os.PathLike) -> RunCurves:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line, from a run killed mid-write, is dropped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"plot: {path} not found (a run folder holds metrics.jsonl)")
    curves = RunCurves(path.parent.name, best_metric=_best_metric(path.parent / "config.toml"))
    for rec in read_jsonl(path):
        event = rec.get("event")
        if event == "step":
            curves.steps.append(rec)
        elif event is None:
            curves.epochs.append(rec)
    return curves


def _best_metric(config: Path) -> str:
    """train.best_metric of a run's config.toml ("" when it has none or cannot be read: the curves still draw)."""
    import tomllib

    try:
        value = tomllib.loads(config.read_text(encoding="utf-8")).get("train", {}).get("best_metric", "")
    except (OSError, ValueError):
        return ""
    return value if isinstance(value, str) else ""


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Draw the runs' curves into a PNG and return its path. Default: ``curves.png`` in the run folder (one
    run; replaced when drawn again) or ``runs-compare.png`` here (several; an existing file is kept and a new
    name chosen)."""
    if not run_dirs:
        raise ValueError("plot: give at least one run folder")
    runs = [read_curves(d) for d in run_dirs]
    fig = _figure(runs)
    if out is None and len(runs) == 1:
        target = Path(run_dirs[0]) / "curves.png"
        return atomic_replace(target, lambda p: fig.savefig(p, format="png", dpi=110))
    target = Path(out) if out is not None else Path("runs-compare.png")
    return write_new(target, lambda p: fig.savefig(p, format="png", dpi=110))


def _figure(runs: list[RunCurves]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_metric, ax_lr, ax_speed = fig.subplots(2, 2).flat
    colors = [f"C{i}" for i in range(10)]
    metrics = {r.metric for r in runs if r.metric}
    for i, run in enumerate(runs):
        c = colors[i % 10]
        label = run.name if len(runs) > 1 else ""  # one run: its name is the title
        x, y = run.series("loss", "steps")
        if x:
            ax_loss.plot(x, y, "-", color=c, alpha=0.45, lw=1, label=f"{label} train (steps)".strip())
        x, y = run.series("train_loss")
        ax_loss.plot(x, y, "o-", color=c, lw=1.5, ms=3, label=f"{label} train (epoch mean)".strip())
        x, y = run.series("val_loss")
        if x:
            ax_loss.plot(x, y, "s--", color=c, lw=1.5, ms=4, label=f"{label} val".strip())
        if run.metric:
            x, y = run.series(run.metric)
            ax_metric.plot(x, y, "s-", color=c, ms=4, label=f"{label} {run.metric}".strip())
            best = [r for r in run.epochs if r.get("best")]
            if best:
                ax_metric.plot([best[-1]["step"]], [best[-1][run.metric]], "*", color=c, ms=12)
        x, y = run.series("lr", "steps") if run.steps else run.series("lr")
        ax_lr.plot(x, y, "-" if len(x) > 1 else "o", color=c, label=label or None)  # one point: a line shows nothing
        x, y = run.series("samples_per_s", "steps")
        if x:
            ax_speed.plot(x, y, "-", color=c, alpha=0.45, lw=1, label=f"{label} (steps)".strip())
        x, y = run.series("samples_per_s")
        ax_speed.plot(x, y, "o-", color=c, ms=3, label=f"{label} (epoch)".strip())
    ax_loss.set(title="loss", ylabel="loss")
    ax_metric.set(title="validation " + (", ".join(sorted(metrics)) or "metric (none recorded)"))
    ax_lr.set(title="learning rate", ylabel="lr")
    ax_speed.set(title="throughput", ylabel="samples/s")
    for ax in (ax_loss, ax_metric, ax_lr, ax_speed):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            if len(runs) > 1:  # a line per run and series: beside the axes, never over the curves
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
            else:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(_title([r.name for r in runs]), fontsize=11)
    return fig


def _title(names: list[str], width: int = 110) -> str:
    """The figure's title: the run, the runs compared, or (more than fit a line) how many, the legends naming
    them (six run names ran off the figure)."""
    title = " vs ".join(names)
    return title if len(title) <= width else f"{len(names)} runs (the legends name them)"
