"""What a run does with a monitored metric besides best.pt: early stopping and the top-k checkpoints.

Both see each epoch record (:meth:`update`) before ``last.pt`` is written, and both keep their state in every
checkpoint (:meth:`state_dict`), so a resumed run counts on where it stopped and deletes only the top-k files
it wrote itself. Which direction is better the task says (:meth:`~fasttrain.tasks.base.Task.metric_mode`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fasttrain.checkpoint import CheckpointManager
    from fasttrain.config import TrainConfig
    from fasttrain.tasks import Task, TrainState

log = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "TopK", "improved", "monitors", "use_best"]


def improved(mode: str, new: float, old: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``new`` beats ``old`` by more than ``min_delta`` in direction ``mode``; NaN never does."""
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old + min_delta if mode == "max" else new < old - min_delta


class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row
    (as Lightning's ``EarlyStopping``); ``patience`` 0 never stops. ``reason`` says why it stopped."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float = 0.0):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0
        """Evaluations in a row without improvement."""
        self.reason = ""

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience

    def update(self, record: dict[str, Any]) -> bool:
        """Take an epoch record (epochs without the metric, i.e. not evaluated, do not count); True: stop now."""
        value = record.get(self.metric)
        if self.patience <= 0 or value is None:
            return False
        if improved(self.mode, value, self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = value, int(record["epoch"]), 0
            return False
        self.wait += 1
        if self.stopped:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            self.reason = (
                f"early stop after epoch {record['epoch']}: {self.metric} has not improved{delta} for "
                f"{self.wait} evaluations (best {self.best:.4g} at epoch {self.best_epoch}; "
                f"train.early_stop_patience = {self.patience})"
                if self.best is not None
                else f"early stop after epoch {record['epoch']}: {self.metric} was not finite for {self.wait} "
                f"evaluations (train.early_stop_patience = {self.patience})"
            )
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "reason": self.reason,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("metric") != self.metric:  # another metric: its count says nothing about this one
            return
        self.best, self.best_epoch, self.wait = sd.get("best"), int(sd.get("best_epoch", 0)), int(sd.get("wait", 0))
        self.reason = str(sd.get("reason", "")) if self.stopped else ""


class TopK:
    """Keep the ``k`` best checkpoints by ``metric`` as ``checkpoints/epoch=E-<metric>=V.pt``; a file that
    drops out of the k is deleted, but only one this run wrote (its name is in the list the checkpoints carry),
    and a name already taken by another file is never written over (``-v2`` is appended)."""

    def __init__(self, folder: Path, metric: str, mode: str, k: int):
        self.folder, self.metric, self.mode, self.k = Path(folder), metric, mode, k
        self.kept: list[dict[str, Any]] = []
        """{"file", "value", "epoch"} of the checkpoints kept, best first."""

    def wants(self, value: float | None) -> bool:
        if self.k <= 0 or value is None or math.isnan(value):
            return False
        return len(self.kept) < self.k or improved(self.mode, value, self.kept[-1]["value"])

    def name_for(self, epoch: int, value: float) -> str:
        mine = {e["file"] for e in self.kept}
        stem, n = f"epoch={epoch}-{self.metric}={value:.4f}", 1
        name = f"{stem}.pt"
        while (self.folder / name).exists() and name not in mine:
            n += 1
            name = f"{stem}-v{n}.pt"
        return name

    def add(self, name: str, epoch: int, value: float) -> list[Path]:
        """Record a written checkpoint; delete the ones beyond k (this run's only); returns those deleted."""
        self.kept = [e for e in self.kept if e["file"] != name]
        self.kept.append({"file": name, "value": value, "epoch": epoch})
        return self._prune()

    def _prune(self) -> list[Path]:
        # best first; among equals the earlier epoch stays (as an improvement must be strict)
        sign = -1.0 if self.mode == "max" else 1.0
        self.kept.sort(key=lambda e: (sign * e["value"], e["epoch"]))
        removed = []
        for e in self.kept[self.k :]:
            path = self.folder / e["file"]
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot delete %s (no longer among the top %d): %s", path, self.k, err)
        self.kept = self.kept[: self.k]
        return removed

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "kept": [dict(e) for e in self.kept]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("metric") != self.metric:
            return
        self.kept = [
            {"file": str(e["file"]), "value": float(e["value"]), "epoch": int(e["epoch"])}
            for e in sd.get("kept", [])
            if "/" not in str(e.get("file", "/")) and "\\" not in str(e.get("file", "\\"))
        ]
        if self.k > 0:
            self._prune()  # a resume with a smaller train.save_top_k


def monitors(
    tc: TrainConfig, folder: Path, best_metric: str, mode_of: Callable[[str], str], is_main: bool
) -> tuple[EarlyStopping, TopK]:
    """Early stopping (on every process: they all see the same all-reduced values and stop together) and the
    top-k keeper (on the process that writes files) a run's config asks for. ``mode_of``: the task's
    :meth:`~fasttrain.tasks.base.Task.metric_mode` (which direction is better)."""
    metric = tc.early_stop_metric or best_metric
    return (
        EarlyStopping(metric, mode_of(metric), tc.early_stop_patience, tc.early_stop_min_delta),
        TopK(folder, best_metric, mode_of(best_metric), tc.save_top_k if is_main else 0),
    )


def use_best(task: Task, state: TrainState, ckpts: CheckpointManager) -> str:
    """Load best.pt's weights (and averages) into ``state`` where the run has one; returns which weights
    ``state`` now holds, for the log and the reports (best.pt and its epoch, or the final weights).

    Under torchrun rank 0 decides, and every rank evaluates rank 0's best.pt: a rank that does not see that
    file (a runs folder each node has for itself, or another run's best.pt there) gets its weights from rank 0,
    so the test evaluation and its all-reduce never mix best and final weights."""
    from fasttrain import distributed
    from fasttrain.checkpoint import load_checkpoint

    best = ckpts.dir / "best.pt"
    distributed.barrier()  # rank 0 wrote best.pt: every process reads the finished file
    main = distributed.current().is_main
    saved: dict[str, Any] | None = None
    mark = None
    if main and ckpts.best_value is not None and best.is_file():
        saved = load_checkpoint(best, map_location=task.runtime.device)["state"]
        mark = (int(saved["epoch"]), int(saved["step"]), f"{ckpts.best_metric} {ckpts.best_value:.4g}")
    mark = distributed.broadcast_object(mark)
    if mark is None:
        return f"final weights, epoch {state.epoch}"
    if not main:
        saved = _same_best(best, mark[:2], task.runtime.device)
    blind = [r for r, ok in enumerate(distributed.all_gather_object(saved is not None)) if not ok]
    if blind:
        log.warning(
            "rank%s %s do%s not see rank 0's %s: rank 0 sends its weights",
            "s" if len(blind) > 1 else "",
            ", ".join(map(str, blind)),
            "" if len(blind) > 1 else "es",
            best,
        )
        sent = distributed.broadcast_object(
            _to_cpu({"modules": saved["modules"], "ema": saved.get("ema")}) if main and saved else None
        )
        saved = saved if saved is not None else sent
    assert saved is not None
    for name, module in state.modules.items():
        module.load_state_dict(saved["modules"][name])
    for name, ema in state.ema.items():
        if name in (saved.get("ema") or {}):
            ema.load_state_dict(saved["ema"][name])
    return f"best.pt, epoch {mark[0]}, {mark[2]}"


def _same_best(path: Path, mark: tuple[int, int], device: Any) -> dict[str, Any] | None:
    """``path``'s state where it is rank 0's best.pt (its epoch and step), else None."""
    from fasttrain.checkpoint import load_checkpoint

    if not path.is_file():
        return None
    try:
        saved = load_checkpoint(path, map_location=device)["state"]
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return saved if (saved.get("epoch"), saved.get("step")) == mark else None


def _to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU (sent between ranks: a CUDA tensor would arrive on the sender's device)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = {k: _to_cpu(v) for k, v in obj.items()}
        if hasattr(obj, "_metadata"):  # a module's state dict: its versions, which loading reads
            from collections import OrderedDict

            ordered = OrderedDict(out)
            ordered._metadata = obj._metadata  # type: ignore[attr-defined]
            return ordered
        return out
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
