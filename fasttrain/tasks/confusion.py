"""A classifier's confusion matrix and per-class accuracy over a split, as ``confusion.json`` and
``confusion.png`` in the run folder (written at the end of a run, for the weights the test split gets: best.pt's
where the run has one).

Rows are true classes, columns predicted ones; the counts are summed on the device (one ``bincount`` per
batch), over all processes, and read once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrain.data.base import Loader
from fasttrain.io import atomic_replace, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["confusion_matrix", "confusion_report", "write_confusion"]


def confusion_matrix(
    model: Any, loader: Loader, num_classes: int, autocast: Any, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[true, predicted]`` counts of ``model`` over ``loader`` (int64, on the CPU, summed over processes). A
    rank without validation batches (a streamed split with fewer shards than ranks) adds zeros on ``device``, the
    device the others' counts are on: a CPU tensor in an NCCL all-reduce raised there, and the others waited
    ``dist.timeout_s``."""
    from fasttrain import distributed

    counts: torch.Tensor | None = None
    with torch.no_grad():
        for batch in loader:
            with autocast():
                pred = model(batch.inputs).argmax(1)
            idx = batch.targets.long() * num_classes + pred
            c = torch.bincount(idx, minlength=num_classes * num_classes)
            counts = c if counts is None else counts + c
    if counts is None:
        counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    if distributed.current().enabled:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts.cpu().reshape(num_classes, num_classes)


def confusion_report(matrix: torch.Tensor, class_names: list[str], *, split: str, weights: str) -> dict[str, Any]:
    """The JSON record: per-class accuracy (recall: right / true samples of the class; None for a class with no
    samples), the matrix, overall accuracy, and which split and weights it describes."""
    m = matrix.tolist()
    per_class = {
        name: (round(row[i] / sum(row), 6) if sum(row) else None) for i, (name, row) in enumerate(zip(class_names, m))
    }
    total = int(matrix.sum())
    return {
        "split": split,
        "weights": weights,
        "classes": list(class_names),
        "per_class_accuracy": per_class,
        "accuracy": round(float(matrix.diag().sum()) / total, 6) if total else None,
        "samples": total,
        "matrix": m,
        "rows": "true class",
        "columns": "predicted class",
    }


def write_confusion(run_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """confusion.json and confusion.png in ``run_dir`` (fasttrain's own files: replaced on a resumed run)."""
    js = atomic_write_text(run_dir / "confusion.json", _json(report))
    png = atomic_replace(run_dir / "confusion.png", lambda p: _figure(report).savefig(p, format="png", dpi=110))
    return js, png


def _json(report: dict[str, Any]) -> str:
    """The report, indented, with one line per matrix row (1,000 classes: 1,000 lines, not a million)."""
    rest = json.dumps({k: v for k, v in report.items() if k != "matrix"}, indent=2)
    rows = ",\n".join("    " + json.dumps(row) for row in report["matrix"])
    return f'{rest[:-2]},\n  "matrix": [\n{rows}\n  ]\n}}\n' if rows else rest[:-2] + ',\n  "matrix": []\n}\n'


def _figure(report: dict[str, Any]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, m = report["classes"], report["matrix"]
    n = len(m)
    names = names if len(names) == n else [str(i) for i in range(n)]
    side = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # rows normalised: each true class's share per prediction (the diagonal is its accuracy)
    counts = np.asarray(m, dtype=np.float64).reshape(n, n)  # square: rows true, columns predicted classes
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")  # cells, not a blur
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 50:  # named ticks where the names can be read; beyond, none (1,000 tick marks took seconds to draw)
        ax.set_xticks(range(n), names, rotation=90 if n > 8 else 0)
        ax.set_yticks(range(n), names)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:  # the counts, where they fit
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(m[i][j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black",
                )
    acc = report["accuracy"]
    ax.set_title(f"{report['split']}: accuracy {acc:.4f} ({report['weights']})" if acc is not None else report["split"])
    fig.tight_layout()
    return fig
