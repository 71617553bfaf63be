"""Starting weights: torchvision's pretrained weights, or a state dict / fasttrain checkpoint from a file.

The classifier head (the model's last ``nn.Linear``) is what changes between a pretrained model and a new task
(1,000 ImageNet classes against the user's few): with ``reset_head`` its saved weights are left out and it
keeps its fresh initialisation; without it, a head of another shape is an error that says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["head_linear", "replace_head", "read_state_dict", "load_initial_weights"]


def head_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(qualified name, module) of the model's last ``nn.Linear`` in registration order, or None."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def replace_head(model: nn.Module, num_outputs: int) -> None:
    """Swap the last ``nn.Linear`` for a freshly initialised one with ``num_outputs`` outputs (in place)."""
    found = head_linear(model)
    if found is None:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear head to resize to {num_outputs} outputs")
    name, old = found
    new = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)


def read_state_dict(path: str | os.PathLike, module: str = "model") -> dict[str, torch.Tensor]:
    """The weights in ``path``: a fasttrain checkpoint (its ``module``), a plain state dict, or one wrapped as
    ``{"state_dict": ...}`` / ``{"model": ...}`` (timm's and torchvision's training scripts). DDP's and
    torch.compile's key prefixes (``module.``, ``_orig_mod.``) are stripped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.init_from: {p} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors: say which file and why
        raise ValueError(f"model.init_from: {p} cannot be loaded ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and "modules" in obj["state"]:
        modules = obj["state"]["modules"]
        if module not in modules:
            raise ValueError(f"model.init_from: the fasttrain checkpoint {p} holds {sorted(modules)}, not {module!r}")
        obj = modules[module]
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.init_from: {p} holds no state dict (a mapping of names to tensors)")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_initial_weights(
    model: nn.Module, state: dict[str, torch.Tensor], *, reset_head: bool, source: str
) -> dict[str, Any]:
    """Load ``state`` into ``model``; every key must match in name and shape, except the head's with
    ``reset_head`` (left at its fresh initialisation). Returns what was loaded and left out, for the log."""
    head = head_linear(model)
    head_keys = {f"{head[0]}.{n}" for n, _ in head[1].named_parameters()} if head else set()
    own = model.state_dict()
    skipped = sorted(k for k in head_keys if k in state) if reset_head else []
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(k for k in own if k not in state and k not in (head_keys if reset_head else set()))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{what}: {', '.join(keys[:5])}{more}")
        hint = ""
        if not reset_head and any(k.split(" ")[0] in head_keys for k in wrong):
            hint = "; the classifier head differs (another class count?): set model.reset_head = true to start it fresh"
        raise ValueError(
            f"model.init_from: {source} does not fit model {type(model).__name__} ({'; '.join(parts)}){hint}"
        )
    model.load_state_dict(state, strict=not reset_head)
    log.info(
        "initial weights from %s (%d tensors%s)",
        source,
        len(state),
        f"; head {', '.join(skipped)} left fresh" if skipped else "",
    )
    return {"loaded": len(state), "head_reset": skipped}
