"""Image classification: cross-entropy with label smoothing, top-1 (and top-5) accuracy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fasttrain.data.base import Batch, InputSpec, Loader
from fasttrain.tasks.base import Task, TrainState, check_per_image

log = logging.getLogger(__name__)

__all__ = ["ClassifyTask", "tta_logits"]


def tta_logits(model: Any, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits of ``x`` with test-time augmentation (``task.tta``): ``none``; ``flip``: the mean over the batch
    and its mirror; ``flip_translate`` (airbench's): half that, half the flip mean over the batch shifted by one
    pixel up-left and down-right (reflect padding), for small images where a pixel is a visible shift."""
    if mode == "none":
        return model(x)

    def mirrored(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(t).float() + 0.5 * model(t.flip(-1)).float()

    logits = mirrored(x)
    if mode == "flip":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # Laid out as x is, strides and all (a compiled model's graph guards on strides: no new graph for the shifted
    # batches). empty_like keeps x's strides; choosing a memory format did not for one channel, where a
    # channels_last batch is also contiguous.
    shifted = [torch.empty_like(x).copy_(p) for p in (padded[..., 0:h, 0:w], padded[..., 2 : h + 2, 2 : w + 2])]
    return 0.5 * logits + 0.25 * (mirrored(shifted[0]) + mirrored(shifted[1]))


def _some(names: list[str], show: int = 5) -> str:
    """``a, b, c, d, e, ...``: the first ``show`` class names for a message."""
    return ", ".join(names[:show]) + (", ..." if len(names) > show else "")


class ClassifyTask(Task):
    name = "classify"
    best_metric = "val_acc"
    higher_is_better = frozenset({"acc", "acc5"})
    sample_kind = "class"
    train_metric_names = ("loss", "acc")

    @property
    def num_outputs(self) -> int:
        src = self.source
        if src is not None and src.class_names is None and src.target_names is not None:
            from fasttrain.config import ConfigError

            raise ConfigError(
                f"task.name = classify: {src.root} holds numeric targets per image ({', '.join(src.target_names)}), "
                "not classes: set task.name = regress (a manifest's column of classes is named label, class or "
                "category)"
            )
        n = self.cfg.model.num_outputs or (src.num_outputs if src else 0)
        if n < 2 and not self.cfg.model.num_outputs and src is not None and src.class_names and src.format == "folder":
            raise ValueError(
                f"data.root: {src.root} has one class folder ({src.class_names[0]}/); a classifier needs two at least "
                "(is data.root one class's folder? it is the folder above them)"
            )
        if n < 2:
            raise ValueError(
                "model.num_outputs: a classifier needs at least 2 classes "
                f"(found {n}; set model.num_outputs or check data.root)"
            )
        # (a resume keeps its config's count: a changed set of classes is said by the class names it checks)
        if src is not None and src.class_names and n != len(src.class_names) and not self.restoring:
            from fasttrain.config import ConfigError

            raise ConfigError(
                f"model.num_outputs: {n}, but {src.root} has {len(src.class_names)} classes "
                f"({_some(src.class_names)}): leave it 0 to take the data's (a model with other outputs than classes "
                "cannot name what it predicts)"
            )
        return n

    def check_output(self, out: Any) -> None:
        names = self.source.class_names if self.source is not None else None
        shown = f": {_some(names)}" if names else ""
        check_per_image(out, self.num_outputs, f"logits of its {self.num_outputs} classes{shown}", self.name)

    def __init__(self, cfg, runtime, source, **settings):
        super().__init__(cfg, runtime, source, **settings)
        self._mix: Any = None
        self._erase: Any = None
        self._weight: torch.Tensor | None = None
        self._counts: list[int] | None = None
        if cfg.task.class_weights == "balanced" and source is not None and not self.class_counts():
            from fasttrain.config import ConfigError

            raise ConfigError(
                "task.class_weights = balanced weighs classes by their training images, which a dataset from "
                "Python does not list before it is read (set it to none)"
            )

    def class_counts(self) -> list[int]:
        """Training images per class (empty where the split lists no labels: a dataset from Python), counted
        once: the check at construction, the start's note and the loss weight all ask."""
        if self._counts is None:
            src = self.source
            if src is None or not len(src.train.targets):
                self._counts = []
            else:
                import numpy as np

                counts = np.bincount(np.asarray(src.train.targets, dtype=np.int64), minlength=self.num_outputs)
                self._counts = [int(c) for c in counts]
        return self._counts

    def loss_weight(self, device: torch.device) -> torch.Tensor | None:
        """``task.class_weights = balanced``: N / (classes x images of the class) per class (0 for a class with
        none, which no sample trains anyway), on ``device``; None otherwise."""
        if self.cfg.task.class_weights != "balanced":
            return None
        if self._weight is None or self._weight.device != device:
            counts = torch.tensor(self.class_counts(), dtype=torch.float32)
            weight = counts.sum() / (len(counts) * counts.clamp(min=1))
            self._weight = torch.where(counts > 0, weight, torch.zeros_like(weight)).to(device)
        return self._weight

    def data_notes(self) -> list[str]:
        counts = self.class_counts()
        present = [c for c in counts if c]
        if self.cfg.task.class_weights != "none" or len(present) < 2 or max(present) < 4 * min(present):
            return []
        names = self.source.class_names if self.source is not None and self.source.class_names else None
        names = names or [str(i) for i in range(len(counts))]
        most, least = counts.index(max(present)), counts.index(min(present))
        share = max(present) / sum(counts)
        return [
            f"the classes are unbalanced: {names[most]} has {max(present)} training images, {names[least]} "
            f"{min(present)}; a model answering {names[most]} for every image scores an accuracy near {share:.2f}. "
            "task.class_weights = balanced weighs each class's loss by its rarity (the per-class accuracies at "
            "the end show what each class gets)"
        ]

    def batch_mix(self) -> Any:
        """MixUp / CutMix (torchvision.transforms.v2) over a device batch, or None when both are off. The mixing
        weight is drawn on the CPU (no device sync); the images are mixed where they are."""
        t = self.cfg.task
        if self._mix is None and (t.mixup_alpha > 0 or t.cutmix_alpha > 0):
            from torchvision.transforms import v2

            n = self.num_outputs
            mixes = ([v2.MixUp(alpha=t.mixup_alpha, num_classes=n)] if t.mixup_alpha > 0 else []) + (
                [v2.CutMix(alpha=t.cutmix_alpha, num_classes=n)] if t.cutmix_alpha > 0 else []
            )
            self._mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        return self._mix

    def train_phases(self, state: TrainState, batch: Batch):
        x, y = batch.inputs, batch.targets
        if self.cfg.task.random_erasing > 0:
            if self._erase is None:
                from fasttrain.timm_support import random_erasing

                self._erase = random_erasing(self.cfg.task.random_erasing, x.device)
            x = self._erase(x.clone())  # in place on a copy: the batch may be reused (the cache, a retry)
        mix = self.batch_mix()
        if mix is not None:  # soft targets: a mix of two labels per sample
            x, y = mix(x, y)
            if self.runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            logits = state.callables["model"](x)
        # The loss in float32: autocast would compute it in float32 anyway, this makes it explicit.
        loss = F.cross_entropy(
            logits.float(), y, weight=self.loss_weight(logits.device), label_smoothing=self.cfg.train.label_smoothing
        )
        yield "model", loss
        acc = (logits.detach().argmax(1) == batch.targets).float().mean()
        return {"loss": loss.detach(), "acc": acc}

    def eval_metric_names(self) -> tuple[str, ...]:
        return ("loss", "acc", "acc5") if self.num_outputs > 5 else ("loss", "acc")  # top-5 of <= 5 says nothing

    def infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(model, x, self.cfg.task.tta)

    def eval_step(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        with self.runtime.autocast():
            logits = self.infer(state.local["model"], batch.inputs).float()
        y = batch.targets
        out = {
            "loss": F.cross_entropy(logits, y, reduction="sum"),
            "acc": (logits.argmax(1) == y).sum(),
            "count": torch.full((), float(len(y)), device=y.device),  # no host->device copy: no sync
        }
        if logits.shape[1] > 5:
            out["acc5"] = (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        return out

    def on_run_end(
        self, state: TrainState, run_dir: Path | None, val_loader: Loader, weights: str, ema: bool = False
    ) -> None:
        """Per-class accuracy and the confusion matrix over the validation split: confusion.json and
        confusion.png in the run folder, and the per-class accuracies in the log."""
        from fasttrain.tasks.confusion import confusion_matrix, confusion_report, write_confusion

        state.train(False)
        try:
            model = state.ema["model"].module if ema and "model" in state.ema else state.local["model"]
            matrix = confusion_matrix(
                lambda x: self.infer(model, x), val_loader, self.num_outputs, self.runtime.autocast, self.runtime.device
            )
        finally:
            state.train(True)
        names = list(self.source.class_names) if self.source and self.source.class_names else []
        names = names if len(names) == self.num_outputs else [str(i) for i in range(self.num_outputs)]
        report = confusion_report(matrix, names, split="val", weights=weights)
        if run_dir is None:
            return
        js, png = write_confusion(run_dir, report)
        ranked = sorted(((v, k) for k, v in report["per_class_accuracy"].items() if v is not None))
        shown = ", ".join(f"{k} {v:.3f}" for v, k in ranked[:10]) + (" ..." if len(ranked) > 10 else "")
        files = ", ".join(f.name for f in (js, png) if f is not None)
        log.info("per-class val accuracy (%s), lowest first: %s | %s", weights, shown, files)

    def synthetic_batch(self, batch_size: int, spec: InputSpec, train: bool = True) -> Batch:
        # Training at the largest training size (progressive resizing: memory is planned for the last epochs),
        # evaluation at its own crop.
        d = self.cfg.data
        y = torch.randint(0, self.num_outputs, (batch_size,), device=spec.device)
        return Batch(self.synthetic_inputs(batch_size, spec, d.train_size_max if train else d.eval_crop), y)

    def describe_prediction(self, output: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
        probs = output.softmax(0)
        names = meta.get("class_names") or [str(i) for i in range(len(probs))]
        top = probs.topk(min(3, len(probs)))
        return {
            "class": names[int(top.indices[0])],
            "probability": round(float(top.values[0]), 4),
            "top": [(names[int(i)], round(float(p), 4)) for p, i in zip(top.values, top.indices)],
        }
