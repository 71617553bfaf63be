"""Image -> numbers: a sigmoid over the model's outputs, mean squared error on targets scaled to 0..1.

Targets already in 0..1 (the drawing layout: point as a share of the canvas, colour) are used as they are;
others (manifest columns in their own units) are min-max scaled with the training split's range, stored in the
checkpoint so predictions come back in the original units. The whole image is resized to
``data.image_size`` squared without cropping or flipping: either would move the point a target describes.

Batches carry ``N x (K + 2)`` targets: the K scaled targets, then each source image's width and height, so
the drawing metrics measure point error in pixels of each canvas's own size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fasttrain.config import ConfigError
from fasttrain.data.base import Batch, InputSpec
from fasttrain.data.formats import DRAWING_TARGETS
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split
from fasttrain.data.transforms import resize_square
from fasttrain.data.vectors import Vectors
from fasttrain.tasks.base import Task, TrainState, check_per_image

log = logging.getLogger(__name__)

__all__ = ["RegressTask", "scale_targets", "target_range"]


def target_range(targets: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """(low, high) per target: (0, 1) when every value already lies in 0..1, else the observed min and max.
    One array pass (a :class:`~fasttrain.data.vectors.Vectors` is read as its array, no list per sample)."""
    if not len(targets):
        return [], []
    arr = np.asarray(targets, dtype=np.float64)
    if ((arr >= 0.0) & (arr <= 1.0)).all():
        return [0.0] * arr.shape[1], [1.0] * arr.shape[1]
    low, top = arr.min(0), arr.max(0)
    high = np.where(top > low, top, low + 1.0)
    return low.tolist(), high.tolist()


def scale_targets(split: Split, low: list[float], high: list[float]) -> Split:
    """The split with each target vector min-max scaled to 0..1 by the training range (float32 arithmetic), as
    one N x K float32 array; the paths are the split's own (an index's view stays a view)."""
    lo = np.asarray(low, dtype=np.float32)
    span = np.asarray(high, dtype=np.float32) - lo
    if not len(split.targets):
        return Split(split.name, split.paths, [])
    scaled = (np.asarray(split.targets, dtype=np.float32) - lo) / span
    return Split(split.name, split.paths, Vectors(scaled))


class RegressTask(Task):
    name = "regress"
    best_metric = "val_loss"
    sample_kind = "vector"

    def __init__(self, cfg, runtime, source, **settings):
        super().__init__(cfg, runtime, source, **settings)
        if source is not None:
            if not source.target_names:
                classes = " (its column of classes makes it a classifier's: data.target_columns names the numeric "
                raise ConfigError(
                    f"task.name: regress needs numeric targets (data.format manifest or drawing), "
                    f"but data.format = {cfg.data.format} gives none"
                    + (classes + "targets)" if cfg.data.format == "manifest" and source.class_names else "")
                )
            self.target_names = list(source.target_names)
            self.low, self.high = target_range(source.train.targets)
        else:  # prediction: names and range come from the checkpoint's meta
            n = cfg.model.num_outputs
            self.target_names = [f"t{i}" for i in range(n)]
            self.low, self.high = [0.0] * n, [1.0] * n
        self._span: torch.Tensor | None = None

    @property
    def num_outputs(self) -> int:
        n = self.cfg.model.num_outputs or len(self.target_names)
        if n != len(self.target_names):
            raise ConfigError(
                f"model.num_outputs: {n} does not match the {len(self.target_names)} targets "
                f"({', '.join(self.target_names)})"
            )
        return n

    def check_output(self, out: Any) -> None:
        check_per_image(out, self.num_outputs, f"its targets: {', '.join(self.target_names)}", self.name)

    @property
    def is_drawing(self) -> bool:
        return self.target_names == DRAWING_TARGETS

    # -- building ---------------------------------------------------------------------------------------------
    def samples(self, split: Split) -> Samples:
        """Any backend: each image resized whole to image_size squared, targets scaled, then its width and height."""
        return Samples(scale_targets(split, self.low, self.high), "vector", size_targets=True)

    def _span_on(self, device: torch.device) -> torch.Tensor:
        if self._span is None or self._span.device != device:
            self._span = torch.tensor([h - lo for lo, h in zip(self.low, self.high)], device=device)
        return self._span

    # -- steps -----------------------------------------------------------------------------------------------
    def train_phases(self, state: TrainState, batch: Batch):
        with self.runtime.autocast():
            out = state.callables["model"](batch.inputs)
        pred = torch.sigmoid(out.float())
        loss = F.mse_loss(pred, batch.targets[:, : pred.shape[1]])
        yield "model", loss
        return {"loss": loss.detach()}

    def eval_metric_names(self) -> tuple[str, ...]:
        return ("loss", "mse", "point_px", "color_err") if self.is_drawing else ("loss", "mse")

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        with self.runtime.autocast():
            pred = torch.sigmoid(state.local["model"](batch.inputs).float())
        k = pred.shape[1]
        err = pred - batch.targets[:, :k]
        out = {
            "loss": err.pow(2).mean(1).sum(),  # in scaled units, as trained
            "mse": (err * self._span_on(err.device)).pow(2).mean(1).sum(),  # in the targets' own units
            "count": torch.full((), float(len(err)), device=err.device),  # no host->device copy: no sync
        }
        if self.is_drawing:
            size = batch.targets[:, k : k + 2]
            out["point_px"] = (err[:, :2] * size).norm(dim=1).sum()
            out["color_err"] = err[:, 2:5].abs().mean(1).sum() * 255.0  # mean per-channel error, 0..255 levels
        return out

    def synthetic_batch(self, batch_size: int, spec: InputSpec, train: bool = True) -> Batch:
        s, k = self.cfg.data.image_size, self.num_outputs
        y = torch.cat(
            [torch.rand(batch_size, k, device=spec.device), torch.full((batch_size, 2), float(s), device=spec.device)],
            1,
        )
        return Batch(self.synthetic_inputs(batch_size, spec), y)

    # -- prediction ------------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "target_low": list(self.low), "target_high": list(self.high)}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return resize_square(image, self.cfg.data.image_size)

    def describe_prediction(self, output: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
        """Sigmoid, back to the targets' units; drawing targets as a point (pixels when ``meta["image_size"]``
        is known, else shares of the canvas) and a ``#rrggbb`` colour, other targets by name."""
        names = meta.get("target_names") or self.target_names
        low = meta.get("target_low") or self.low
        high = meta.get("target_high") or self.high
        vals = [lo + float(v) * (h - lo) for v, lo, h in zip(torch.sigmoid(output), low, high)]
        if names == DRAWING_TARGETS:
            x, y, r, g, b = vals
            if meta.get("image_size"):
                w, h = meta["image_size"]
                point = [round(x * w, 1), round(y * h, 1)]
            else:
                point = [round(x, 4), round(y, 4)]
            color = "#" + "".join(f"{min(255, max(0, round(c * 255))):02x}" for c in (r, g, b))
            return {"point": point, "color": color}
        return {n: round(v, 6) for n, v in zip(names, vals)}
