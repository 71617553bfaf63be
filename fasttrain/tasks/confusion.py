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
from typing import Any, NamedTuple

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


def write_confusion(run_dir: Path, report: dict[str, Any]) -> tuple[Path, Path | None]:
    """confusion.json and confusion.png in ``run_dir`` (fasttrain's own files: replaced on a resumed run). A
    figure that cannot be drawn is logged and left out (None), never the end of a finished run."""
    js = atomic_write_text(run_dir / "confusion.json", _json(report))
    try:
        image = _render(report)[0]
    except (OSError, ValueError) as e:  # a font Pillow cannot load, text it cannot encode
        log.warning("confusion.png not drawn (%s: %s); %s holds the matrix", type(e).__name__, e, js.name)
        return js, None
    return js, atomic_replace(run_dir / "confusion.png", lambda p: image.save(p, format="PNG"))


def _json(report: dict[str, Any]) -> str:
    """The report, indented, with one line per matrix row (1,000 classes: 1,000 lines, not a million)."""
    rest = json.dumps({k: v for k, v in report.items() if k != "matrix"}, indent=2)
    rows = ",\n".join("    " + json.dumps(row) for row in report["matrix"])
    return f'{rest[:-2]},\n  "matrix": [\n{rows}\n  ]\n}}\n' if rows else rest[:-2] + ',\n  "matrix": []\n}\n'


_BLUES = np.array(
    [
        (247, 251, 255),
        (222, 235, 247),
        (198, 219, 239),
        (158, 202, 225),
        (107, 174, 214),
        (66, 146, 198),
        (33, 113, 181),
        (8, 81, 156),
        (8, 48, 107),
    ],
    dtype=np.float64,
)
"""ColorBrewer's Blues, the nine colours of matplotlib's ``Blues`` colour map (linear between them, as there)."""

MAX_SIDE = 1200
"""The matrix's side in pixels at most: beyond as many classes, blocks of classes are averaged into a pixel."""
NAMED_UP_TO = 50
"""Classes named along the axes up to this many; beyond, the names would overlap (and 1,000 labels cost time)."""
COUNTS_UP_TO = 20
"""Counts written in the cells up to this many classes, where they fit."""


def blues(shares: np.ndarray) -> np.ndarray:
    """uint8 RGB of each share (0..1, clipped) on the :data:`_BLUES` ramp: shape ``shares.shape + (3,)``."""
    pos = np.clip(np.asarray(shares, dtype=np.float64), 0.0, 1.0) * (len(_BLUES) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_BLUES) - 2)
    frac = (pos - lo)[..., None]
    return np.rint(_BLUES[lo] * (1.0 - frac) + _BLUES[lo + 1] * frac).astype(np.uint8)


def _font(size: int) -> Any:
    """Pillow's own font at ``size`` px (FreeType, no font file to find); its fixed bitmap font where Pillow has
    no FreeType."""
    from PIL import ImageFont

    return ImageFont.load_default(size)


def _drawable(text: str, font: Any) -> str:
    """``text`` as ``font`` can draw it: Pillow's bitmap font encodes Latin-1 and raised on anything else (a
    class named in Greek or Chinese); FreeType draws what it has glyphs for and boxes for the rest."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _blocks(shares: np.ndarray, k: int) -> np.ndarray:
    """``shares`` averaged over k x k blocks of classes (the last blocks over the classes left)."""
    n = len(shares)
    m = -(-n // k)
    padded = np.full((m * k, m * k), np.nan)
    padded[:n, :n] = shares
    return np.nanmean(padded.reshape(m, k, m, k), axis=(1, 3))


class Layout(NamedTuple):
    """Where :func:`_render` put the matrix: cell (i, j) spans ``left + j * cell`` and ``top + i * cell``."""

    left: int
    top: int
    cell: int
    labels: list[str]
    """The class names drawn along both axes ([] beyond :data:`NAMED_UP_TO` classes)."""
    classes_per_cell: int = 1
    """Beyond :data:`MAX_SIDE` classes, each one-pixel cell averages a block of this many classes a side."""


def axis_labels(report: dict[str, Any]) -> list[str]:
    """The names along the axes: the report's classes, numbered where it has not one name per row, none beyond
    :data:`NAMED_UP_TO` classes."""
    n = len(report["matrix"])
    names = [str(c) for c in report["classes"]]
    names = names if len(names) == n else [str(i) for i in range(n)]
    return names if n <= NAMED_UP_TO else []


def _render(report: dict[str, Any]) -> tuple[Any, Layout]:
    """The confusion matrix as an RGB image, drawn with Pillow: each true class's row normalised (the diagonal is
    its accuracy), named axes, the counts in the cells where they fit, a colour bar and a title. matplotlib drew it
    before, in 0.6-0.8 s on a 2-core CPU and about 1.8 s at the end of an H200 speed run (its import, its font's
    first load, two draws); this takes milliseconds."""
    from PIL import Image, ImageDraw

    m = report["matrix"]
    n = len(m)
    counts = np.asarray(m, dtype=np.float64).reshape(n, n)  # square: rows true, columns predicted classes
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    k = -(-n // MAX_SIDE)
    shown = _blocks(shares, k) if k > 1 else shares  # 10,000 classes: a 1,000 x 1,000 picture, not 10,000^2
    cell = max(1, min(56, 560 // max(n, 1)))  # 10 classes: 56 px cells; 1,000: one pixel each
    side = len(shown) * cell
    font, small, pad = _font(13), _font(11), 8
    labels = [_drawable(s, small) for s in axis_labels(report)]

    def size(text: str, f: Any) -> tuple[int, int]:
        box = f.getbbox(text)  # (left, top, right, bottom) of the text drawn at (0, 0)
        return int(box[2]), int(box[3])

    line = size("Ag", font)[1]
    label_w = max((size(s, small)[0] for s in labels), default=0)
    x_rotated = n > 8
    acc = report["accuracy"]
    title = f"{report['split']}: accuracy {acc:.4f} ({report['weights']})" if acc is not None else report["split"]
    title = _drawable(str(title), font)
    left = pad + line + pad + label_w + (pad if labels else 0)
    top = pad + line + pad
    bar_x = left + side + 2 * pad
    ticks = ("1.0", "0.5", "0.0")
    right = bar_x + 14 + 4 + max(size(t, small)[0] for t in ticks) + pad + line + pad
    x_labels_h = (label_w if x_rotated else size("Ag", small)[1]) if labels else 0
    bottom = top + side + (4 + x_labels_h if labels else 0) + pad + line + pad
    width = max(right, left + size(title, font)[0] + pad)
    canvas = Image.new("RGB", (width, bottom), "white")
    if side:
        canvas.paste(Image.fromarray(np.repeat(np.repeat(blues(shown), cell, 0), cell, 1), "RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)

    def upright(text: str, f: Any, x: int, y: int) -> None:  # text turned 90 degrees, read bottom to top
        w, h = size(text, f)
        tile = Image.new("L", (max(w, 1), max(h, 1)), 0)
        ImageDraw.Draw(tile).text((0, 0), text, font=f, fill=255)
        tile = tile.rotate(90, expand=True)
        canvas.paste(Image.new("RGB", tile.size, "black"), (x, y), tile)

    draw.text((left, pad), title, font=font, fill="black")
    for i, name in enumerate(labels):
        w, h = size(name, small)
        y_mid, x_mid = top + i * cell + cell // 2, left + i * cell + cell // 2
        draw.text((left - pad - w, y_mid - h // 2), name, font=small, fill="black")  # rows: true classes
        if x_rotated:  # columns: predicted classes, each name ending just below its column
            upright(name, small, x_mid - h // 2, top + side + 4)
        else:
            draw.text((x_mid - w // 2, top + side + 4), name, font=small, fill="black")
    w, h = size("predicted class", font)
    draw.text((left + (side - w) // 2, bottom - pad - line), "predicted class", font=font, fill="black")
    w, h = size("true class", font)
    upright("true class", font, pad, top + (side - w) // 2)
    if 0 < n <= COUNTS_UP_TO:
        texts = [[str(int(v)) for v in row] for row in counts.tolist()]
        if max(size(t, small)[0] for row in texts for t in row) <= cell - 4:
            for i, row in enumerate(texts):
                for j, text in enumerate(row):
                    w, h = size(text, small)
                    xy = (left + j * cell + (cell - w) // 2, top + i * cell + (cell - h) // 2)
                    draw.text(xy, text, font=small, fill="white" if shares[i, j] > 0.5 else "black")
    if side:  # the colour bar, as tall as the matrix
        ramp = blues(np.linspace(1.0, 0.0, side))[:, None, :].repeat(14, axis=1)
        canvas.paste(Image.fromarray(ramp, "RGB"), (bar_x, top))
        draw.rectangle((bar_x, top, bar_x + 13, top + side - 1), outline=(128, 128, 128))
        for t, tick in enumerate(ticks):
            w, h = size(tick, small)
            y = top + round(t * (side - 1) / 2) - h // 2
            draw.text((bar_x + 18, min(max(y, 0), bottom - h)), tick, font=small, fill="black")
    tick_w = max(size(t, small)[0] for t in ticks)
    w, h = size("share of the true class", font)
    upright("share of the true class", font, bar_x + 18 + tick_w + pad, top + max(0, (side - w) // 2))
    return canvas, Layout(left, top, cell, labels, k)
