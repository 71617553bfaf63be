"""Prediction from a checkpoint: the task's own preprocessing, model and description of an output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import config_from_dict
from fasttrain.runtime import runtime_for
from fasttrain.tasks import make_task

__all__ = ["predict"]


def predict(checkpoint: str | Path, images: list[str], *, device: str = "auto",
            out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One record per image (class and probability, regressed values, or the written image's path)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    # A handful of images: compiling would cost more than it saves.
    runtime = runtime_for(cfg, device=device, compile="off")
    task = make_task(cfg, runtime, None)
    state = task.build_state()
    for name, module in state.modules.items():
        module.load_state_dict(ckpt["state"]["modules"][name])
    return task.predict(state, [str(p) for p in images], ckpt.get("meta") or {},
                        Path(out_dir) if out_dir else None)
