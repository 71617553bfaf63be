"""Prediction from a checkpoint: the task's own preprocessing, model and description of an output."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fasttrain.checkpoint import CheckpointError, checkpoint_config, load_checkpoint
from fasttrain.config import Config
from fasttrain.io import check_writable
from fasttrain.runtime import Runtime, runtime_for
from fasttrain.tasks import make_task

log = logging.getLogger(__name__)

__all__ = ["predict", "prediction_runtime", "checkpoint_file", "expand_images"]


def prediction_runtime(cfg: Config, device: str) -> Runtime:
    """The runtime for prediction on ``device``: the trained precision where this device runs it, else the one
    ``auto`` picks here (a checkpoint trained in fp16 on a GPU predicts in fp32 on a CPU). No compile: for a
    handful of images it costs more than it saves."""
    try:
        return runtime_for(cfg, device=device, compile="off")
    except ValueError as e:
        if not str(e).startswith("runtime.precision"):
            raise
        log.info("%s: predicting with runtime.precision = auto on this device instead", e)
        return runtime_for(cfg, device=device, compile="off", precision="auto")


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's best checkpoint (its last when it has no best.pt)."""
    p = Path(path)
    if not p.is_dir():
        return p
    for name in ("best.pt", "last.pt"):
        if (p / "checkpoints" / name).is_file():
            return p / "checkpoints" / name
    raise FileNotFoundError(f"{p}: a folder without checkpoints/best.pt or last.pt (is it a run folder?)")


def expand_images(paths: Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Files as given, folders as the image files under them (recursively, sorted, hidden ones left out, as
    training finds them); returns the paths and an ``error`` record for each image-named entry in a folder that
    is no regular file (a FIFO, a broken link). A folder without images is an error naming it."""
    from fasttrain.data.sources import IMAGE_EXTENSIONS, scan_images

    files: list[str] = []
    errors: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(str(p))
            continue
        scan = scan_images(p)
        if not scan.files and not scan.others:
            raise FileNotFoundError(
                f"predict: no image files under {p} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += [str(f) for f in scan.files]
        errors += [{"image": str(f), "error": why} for f, why in scan.others]
    return files, errors


def _check_order(checkpoint: str | Path, images: Sequence[str | Path]) -> None:
    """An image given first and a run folder or checkpoint among the images: the arguments swapped."""
    from fasttrain.data.sources import IMAGE_EXTENSIONS

    if Path(checkpoint).suffix.lower() not in IMAGE_EXTENSIONS:
        return
    from fasttrain.rundir import is_run_folder

    runs = [str(p) for p in images if is_run_folder(p) or Path(p).suffix == ".pt"]
    raise ValueError(
        f"predict: {checkpoint} is an image where the checkpoint or run folder goes: the checkpoint comes first, "
        f"then the images (fasttrain predict {runs[0] if runs else 'RUN_DIR'} {checkpoint} ...)"
    )


def predict(
    checkpoint: str | Path,
    images: list[str],
    *,
    device: str = "auto",
    out_dir: str | Path | None = None,
    model: Any = None,
    weights: str | None = None,
) -> list[dict[str, Any]]:
    """One record per image (class and probability, regressed values, or the written image's path); an image
    that cannot be read gets an ``error`` and the others go on. ``images``: files, or folders of them (every
    image file under a folder, recursively; see :func:`expand_images`). ``checkpoint``: a checkpoint file, or a run
    folder (its best.pt, else last.pt). ``weights``: ``raw`` or ``ema`` (the moving average of a run trained
    with ``train.ema_decay``); None: those the checkpoint says validated better (the average in checkpoints
    written before that was recorded). ``model``: the ``nn.Module`` (or factory) a run trained from Python was
    given."""
    if weights not in (None, "raw", "ema"):
        raise ValueError(f"predict --weights: {weights!r} is not one of raw, ema")
    _check_order(checkpoint, images)
    checkpoint = checkpoint_file(checkpoint)
    paths, errors = expand_images(images)
    ckpt = load_checkpoint(checkpoint)
    averages = ckpt["state"].get("ema") or {}
    if weights == "ema" and not averages:
        raise CheckpointError(
            f"predict --weights ema: checkpoint {checkpoint} holds no moving average (its run had no "
            f"train.ema_decay); use --weights raw"
        )
    use_ema = bool(averages) and (weights or ckpt.get("weights") or "ema") == "ema"
    cfg = checkpoint_config(ckpt, checkpoint)
    if cfg.task.name == "pix2pix":  # it writes images: ask before predicting (./predictions by default)
        check_writable(out_dir or "predictions", "predict --out-dir")
    runtime = prediction_runtime(cfg, device)
    from fasttrain.models import check_model

    check_model(cfg.model.name, given=model is not None)  # a run trained on a model from Python needs it again
    # restoring: the checkpoint holds the weights: no pretrained download, no init_from read
    task = make_task(cfg, runtime, None, model=model, restoring=True, inference=True)
    state = task.build_state()
    saved = dict(ckpt["state"]["modules"])
    for name, averaged in averages.items() if use_ema else ():  # ModelEma: "module." + the model's keys
        saved[name] = {k[len("module.") :]: v for k, v in averaged.items() if k.startswith("module.")}
        log.info(
            "predicting with the moving average of %s's weights (train.ema_decay; --weights raw for the raw)", name
        )
    if averages and not use_ema:
        log.info("predicting with the raw weights (--weights ema for their moving average)")
    missing = sorted(set(state.modules) - set(saved))
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint}: has no weights for {', '.join(missing)} (it holds {', '.join(sorted(saved))})"
        )
    for name, module in state.modules.items():
        try:
            module.load_state_dict(saved[name])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {checkpoint}: its {name} weights do not fit model "
                f"{cfg.model.name} ({str(e).splitlines()[-1].strip()})"
            ) from None
    meta = ckpt.get("meta") or {}
    if meta.get("float_items") and paths:
        log.warning(
            "%s learned from float images of a dataset given from Python, normalized its own way; image files are "
            "normalized here with data.mean and data.std (%s, %s), which is right only if the dataset did the same",
            checkpoint,
            cfg.data.mean,
            cfg.data.std,
        )
    records = task.predict(state, paths, meta, Path(out_dir) if out_dir else None)
    return records + errors
