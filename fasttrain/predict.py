"""Prediction from a checkpoint: the task's own preprocessing, model and description of an output."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import config_from_dict
from fasttrain.models import is_conv_model
from fasttrain.runtime import Runtime
from fasttrain.tasks import make_task

__all__ = ["predict"]


def predict(checkpoint: str | Path, images: list[str], *, device: str = "auto",
            out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One record per image (class and probability, regressed values, or the written image's path)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    # A handful of images: compiling would cost more than it saves.
    rt_cfg = dataclasses.replace(cfg.runtime, device=device, compile="off")
    runtime = Runtime(rt_cfg, conv_model=is_conv_model(cfg.model.name))
    task = make_task(cfg, runtime, None)
    state = task.build_state()
    for name, module in state.modules.items():
        module.load_state_dict(ckpt["state"]["modules"][name])
    return task.predict(state, [str(p) for p in images], ckpt.get("meta") or {},
                        Path(out_dir) if out_dir else None)
