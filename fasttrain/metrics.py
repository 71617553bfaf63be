"""What a run records and shows: metrics files through sinks (JSON lines always; CSV and TensorBoard on request;
another is a class in the ``loggers`` table of :mod:`fasttrain.registry`), the progress
bar on a terminal, plain progress lines elsewhere, and the epoch summary line.

``metrics.jsonl`` holds one record per epoch (no ``event`` key), one per ``train.log_every`` steps
(``"event": "step"``), the start-up's phases at each start (``"event": "startup"``), the final test
(``"event": "test"``) and the run's end once its reports are written (``"event": "finished"``: a resume from that
checkpoint trains and reports nothing again); resume and ``fasttrain plot`` read it back.
Only the main process writes (under torchrun, rank 0).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fasttrain import registry
from fasttrain.io import append_jsonl, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

__all__ = [
    "MetricsLog",
    "MetricSink",
    "JsonlSink",
    "CsvSink",
    "TensorboardSink",
    "Progress",
    "trim_metrics",
    "summary_line",
    "step_line",
    "fmt_metrics",
    "fmt_duration",
    "fmt_rate",
    "PROGRESS",
    "ConsoleFilter",
    "console_handler",
]

PROGRESS = "progress"
"""``extra`` key marking progress lines in the log: a terminal that shows the bar can leave them out."""


class ConsoleFilter(logging.Filter):
    """What the console shows besides its level: under torchrun only rank 0's lines, except warnings and errors,
    which every rank reports with its rank; on a terminal the progress bar instead of the plain progress lines
    (which train.log always gets)."""

    def __init__(self, bar_on_terminal: bool):
        super().__init__()
        from fasttrain.distributed import dist_info

        self.bar = bar_on_terminal and _is_terminal()
        info = dist_info()
        self.rank = info.rank if info.enabled else None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.bar and getattr(record, PROGRESS, False):
            return False
        if self.rank is not None:
            if record.levelno < logging.WARNING and self.rank != 0:
                return False
            if record.levelno >= logging.WARNING and not record.getMessage().startswith("[rank"):
                record.msg, record.args = f"[rank {self.rank}] {record.getMessage()}", None
        return True


def console_handler(level: int, *, bar_on_terminal: bool) -> logging.Handler:
    """The console's log handler (stderr, ``HH:MM:SS L message``), as the command line and a ``train()`` called
    from Python with no logging configured show it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    handler.setLevel(level)
    handler.addFilter(ConsoleFilter(bar_on_terminal=bar_on_terminal))
    return handler


def trim_metrics(
    path: str | os.PathLike, epochs_done: int, step: int, *, redone: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """On resume: keep what happened before the checkpoint (epoch records up to ``epochs_done``, step records up
    to ``step``) and drop the rest, which will be run again, and a torn last line; returns the records kept.
    ``redone``: events written at the checkpoint itself that the resumed run writes again (the end of a run
    killed before it finished: its test record), dropped too."""
    path = Path(path)
    if not path.is_file():
        return []
    records = read_jsonl(path)
    keep = [
        r
        for r in records
        if (r.get("step", 0) <= step if r.get("event") == "step" else r.get("epoch", 0) <= epochs_done)
        and not (r.get("event") in redone and (r.get("epoch"), r.get("step")) == (epochs_done, step))
    ]
    text = "".join(_json_line(r) for r in keep)
    if len(keep) != len(records) or text != path.read_text(encoding="utf-8", errors="replace"):
        atomic_write_text(path, text)
    return keep


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


class MetricSink(Protocol):
    """One metrics file format (a ``loggers`` entry of :mod:`fasttrain.registry`, built with the run folder).
    The sinks see the records in this order: :class:`JsonlSink` first, so a later sink may read it back."""

    def step(self, record: dict[str, Any]) -> None: ...

    def epoch(self, record: dict[str, Any]) -> None: ...

    def event(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``metrics.jsonl``: every record, one JSON line each (resume and ``fasttrain plot`` read it back)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def step(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, {"event": "step", **record})

    def epoch(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)

    def event(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)

    def close(self) -> None:
        pass


class CsvSink:
    """``metrics.csv``: the epoch records as a table, rewritten whole from metrics.jsonl each epoch (epochs are
    few; a resumed run's earlier epochs are there), so a column that appears later (validation every few epochs)
    gets its header."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def step(self, record: dict[str, Any]) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "event" not in r]
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def event(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorboardSink:
    """TensorBoard event files in ``tensorboard/``: train/<m> per logged step, train/<m>_epoch and val/<m> per
    epoch, test/<m> once (needs the tensorboard package)."""

    def __init__(self, run_dir: Path):
        self.writer: Any = tensorboard_writer(Path(run_dir) / "tensorboard")

    def step(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k not in ("epoch", "step") and _is_number(v):
                self.writer.add_scalar(f"train/{k}" if k not in ("lr", "samples_per_s") else k, v, record["step"])

    def epoch(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k.startswith(("train_", "val_")) and _is_number(v):
                split, _, name = k.partition("_")
                self.writer.add_scalar(f"{split}/{name}" + ("_epoch" if split == "train" else ""), v, record["step"])
        self.writer.flush()

    def event(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k.startswith("test_") and _is_number(v):
                self.writer.add_scalar(f"test/{k[5:]}", v, record.get("step", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """The run's metrics files: one sink per ``train.loggers`` name (the ``loggers`` table of
    :mod:`fasttrain.registry`), ``jsonl`` always and first. ``enabled=False`` (ranks other than 0) writes
    nothing."""

    def __init__(self, run_dir: str | os.PathLike, loggers: Sequence[str] = ("jsonl",), *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        names = dict.fromkeys(["jsonl", *loggers])  # in order, once each
        self.sinks: list[MetricSink] = [registry.resolve("loggers", n)(self.run_dir) for n in names] if enabled else []

    def step(self, record: dict[str, Any]) -> None:
        """A step record: ``step``, ``epoch``, the training values, ``lr``, ``samples_per_s``."""
        for sink in self.sinks:
            sink.step(record)

    def epoch(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.epoch(record)

    def event(self, record: dict[str, Any]) -> None:
        """A one-off record (``"event": "test"``)."""
        for sink in self.sinks:
            sink.event(record)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        from fasttrain.config import ConfigError

        raise ConfigError(
            f"train.loggers: tensorboard needs the tensorboard package ({e}); pip install "
            f"tensorboard, or leave it out of train.loggers"
        ) from None
    return SummaryWriter(log_dir=str(folder))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Progress:
    """A tqdm bar on a terminal (``bar``); elsewhere (CI logs, files) nothing but the plain lines the engine
    logs every ``train.log_every`` steps: one ~2 KB line of carriage-return fragments per epoch reads badly."""

    def __init__(self, total: int, initial: int, desc: str, *, enabled: bool):
        self.bar = None
        if enabled and _is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="img",
                unit_scale=False,
                dynamic_ncols=True,
                desc=desc,
                leave=True,  # the epoch's last values stay on screen above its summary line
                mininterval=0.5,
                # no "<remaining" of tqdm's own (this epoch's): the run's one ETA comes with the values
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
            )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, values: dict[str, float], eta_s: float | None = None) -> None:
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in values.items()}
            if eta_s is not None:
                shown["ETA"] = fmt_duration(eta_s)
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


MIN_BAR_COLUMNS = 40
"""A terminal narrower than this (a zero-width one: some CI consoles and IDE panes say 0) gets the plain progress
lines instead of a bar it cannot draw."""


def _is_terminal() -> bool:
    """stderr is a terminal wide enough for the progress bar."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns >= MIN_BAR_COLUMNS
    except (AttributeError, ValueError, OSError):
        return False


def fmt_metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def fmt_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def fmt_rate(samples_per_s: float) -> str:
    """Three significant digits at least: "0.217 img/s" for a slow GAN on a CPU, "5,612 img/s" on a GPU."""
    if samples_per_s >= 100:
        return f"{samples_per_s:,.0f} img/s"
    return f"{samples_per_s:.3g} img/s"


def step_line(
    epoch: int,
    epochs: int,
    step_in_epoch: int,
    steps_per_epoch: int,
    values: dict[str, float],
    lr: float,
    samples_per_s: float | None,
    eta_s: float | None,
) -> str:
    """A plain progress line, as timm's ``log_interval`` prints: step, values, lr, speed, ETA."""
    parts = [f"epoch {epoch}/{epochs} step {step_in_epoch}/{steps_per_epoch}"]
    parts.append(" ".join(f"{k} {v:.4g}" for k, v in values.items()))
    parts.append(f"lr {lr:.3g}")
    if samples_per_s:
        parts.append(fmt_rate(samples_per_s))
    if eta_s is not None:
        parts.append(f"ETA {fmt_duration(eta_s)}")
    return " | ".join(p for p in parts if p)


def summary_line(r: dict[str, Any], epochs: int, eta_s: float | None = None, skipped: int = 0) -> str:
    keys = [k for k in r if k.startswith(("train_", "val_"))]
    parts = [f"epoch {r['epoch']}/{epochs}"] + [f"{k} {r[k]:.4f}" for k in keys]
    if r.get("samples_per_s"):
        parts.append(fmt_rate(r["samples_per_s"]))
    parts.append(f"{r['epoch_time_s']:.1f}s")
    if skipped:
        parts.append(f"{skipped} file{'s' if skipped != 1 else ''} skipped")
    if r.get("best"):
        parts.append("*best* (EMA weights)" if r.get("weights") == "ema" else "*best*")
    if eta_s:
        parts.append(f"ETA {fmt_duration(eta_s)}")
    return " | ".join(parts)
