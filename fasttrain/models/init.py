"""Starting weights: torchvision's pretrained weights, or a state dict / fasttrain checkpoint from a file.

The classifier head (the model's last ``nn.Linear``) is what changes between a pretrained model and a new task
(1,000 ImageNet classes against the user's few): with ``reset_head`` its saved weights are left out and it
keeps its fresh initialisation; without it, a head of another shape is an error that says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "head_linear",
    "replace_head",
    "read_weights",
    "read_state_dict",
    "init_from",
    "load_initial_weights",
    "PretrainedSource",
    "pretrained_source",
    "check_pretrained_reachable",
    "pretrained_error",
]


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


_COMPARED = ("task.name", "model.name", "model.width", "data.channels", "data.image_size")
"""Settings of a fasttrain checkpoint that decide its weights' names and shapes: named when they differ."""

_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"RIFF": "a WebP image"}


def _not_a_checkpoint(p: Path) -> str | None:
    """What ``p`` is when it cannot be a torch file (torch.save writes a zip; old torch a pickle), else None."""
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    kind = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)
    return kind or "neither the zip file torch.save writes nor a pickle"


def read_weights(
    path: str | os.PathLike, module: str = "model", *, task: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, the settings of the fasttrain run that saved it, by ``section.key``; empty for another file).
    ``task``: the task of the run it starts, which a fasttrain checkpoint of another task cannot start."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.init_from: {p} not found")
    kind = _not_a_checkpoint(p)
    if kind is not None:
        raise ValueError(
            f"model.init_from: {p} is not a checkpoint ({kind}); give a state dict or a fasttrain checkpoint "
            f"(torch.save's .pt / .pth)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors: say which file and why, in one line
        import pickle

        why = (
            "it holds Python objects beyond tensors, which a safe load refuses; save the state dict alone: "
            "torch.save(model.state_dict(), path)"
            if isinstance(e, pickle.UnpicklingError)
            else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
        )
        raise ValueError(f"model.init_from: {p} cannot be loaded ({why})") from None
    settings: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and "modules" in obj["state"]:
        saved_cfg = obj.get("config")
        for key in _COMPARED:
            section, _, name = key.partition(".")
            table = saved_cfg.get(section) if isinstance(saved_cfg, dict) else None
            if isinstance(table, dict) and name in table:
                settings[key] = table[name]
        modules = obj["state"]["modules"]
        saved_task = settings.get("task.name")
        if task is not None and saved_task is not None and saved_task != task:
            raise ValueError(
                f"model.init_from: {p} is a fasttrain checkpoint of task {saved_task} ({', '.join(sorted(modules))}"
                f" of {settings.get('model.name', '?')}), not of task {task}: start from a checkpoint of this task "
                f"or a state dict"
            )
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
    return out, settings


def read_state_dict(path: str | os.PathLike, module: str = "model") -> dict[str, torch.Tensor]:
    """The weights in ``path``: a fasttrain checkpoint (its ``module``), a plain state dict, or one wrapped as
    ``{"state_dict": ...}`` / ``{"model": ...}`` (timm's and torchvision's training scripts). DDP's and
    torch.compile's key prefixes (``module.``, ``_orig_mod.``) are stripped."""
    return read_weights(path, module)[0]


def init_from(model: nn.Module, cfg: Any, module: str = "model") -> dict[str, Any]:
    """``model.init_from`` of the config ``cfg`` into ``model``'s ``module``: read, checked, loaded; errors say what
    the file is and what differs (a fasttrain checkpoint's settings against this run's)."""
    path = cfg.model.init_from
    state, saved = read_weights(path, module, task=cfg.task.name)
    differs = [
        f"{key} = {value} (this run: {_setting(cfg, key)})"
        for key, value in saved.items()
        if value != _setting(cfg, key) and key != "task.name"
    ]
    name = cfg.model.name if cfg.model.name != "custom" else f"custom ({type(model).__name__})"
    about = f"the file was trained with {', '.join(differs)}" if differs else ""
    return load_initial_weights(
        model, state, reset_head=cfg.model.reset_head, source=path, model_name=name, about=about
    )


def _setting(cfg: Any, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def load_initial_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    reset_head: bool,
    source: str,
    model_name: str | None = None,
    about: str = "",
) -> dict[str, Any]:
    """Load ``state`` into ``model``; every key must match in name and shape, except the head's with
    ``reset_head`` (left at its fresh initialisation). Returns what was loaded and left out, for the log.
    ``model_name``: what messages call the model (model.name); ``about``: what is known to differ."""
    head = head_linear(model)
    head_keys = {f"{head[0]}.{n}" for n, _ in head[1].named_parameters()} if head else set()
    own = model.state_dict()
    skipped = sorted(k for k in head_keys if k in state) if reset_head else []
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(k for k in own if k not in state and k not in (head_keys if reset_head else set()))
    unexpected = sorted(k for k in state if k not in own)
    wrong_keys = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_keys]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{what}: {', '.join(keys[:5])}{more}")
        if not reset_head and wrong_keys and set(wrong_keys + missing) <= head_keys and not unexpected:
            # only the head differs: leaving it out is what makes the file fit
            hint = "; only the classifier head differs (another class count?): set model.reset_head = true"
        elif about:
            hint = f"; {about}"
        else:
            hint = "; saved from another architecture, width or input size?"
        raise ValueError(
            f"model.init_from: {source} does not fit model {model_name or type(model).__name__} "
            f"({'; '.join(parts)}){hint}"
        )
    model.load_state_dict(state, strict=not reset_head)
    log.info(
        "initial weights from %s (%d tensors%s)",
        source,
        len(state),
        f"; head {', '.join(skipped)} left fresh" if skipped else "",
    )
    return {"loaded": len(state), "head_reset": skipped}


# -- pretrained weights: where they come from, where they can be placed offline ----------------------------------
@dataclass(frozen=True)
class PretrainedSource:
    """Where model.pretrained's weights come from and where they are kept."""

    host: str
    """The server a download asks ("" when no network is needed)."""
    cached: bool
    """The weights are in their cache already: no network needed."""
    place: str
    """Where to put them for offline use, in words (a folder, the file's name, where to fetch it)."""
    hugging_face: bool = False
    """Served by the Hugging Face hub (HF_HUB_OFFLINE applies)."""


def pretrained_source(name: str) -> PretrainedSource:
    """``model.name``'s default pretrained weights: torchvision's (torch.hub's ``checkpoints`` folder) or timm's
    (the Hugging Face cache, or torch.hub's folder for timm models published by URL)."""
    from urllib.parse import urlparse

    if name.startswith("timm/"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name[len("timm/") :])
        repo = cfg.hf_hub_id if cfg is not None else None
        if repo:
            from huggingface_hub import constants, try_to_load_from_cache

            repo_id, _, revision = repo.partition("@")
            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
            names += ["model.safetensors", "pytorch_model.bin"]
            cached = any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in names)
            host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
            place = f"the Hugging Face cache {constants.HF_HUB_CACHE} (`hf download {repo_id}` elsewhere)"
            return PretrainedSource(host, cached, place, hugging_face=True)
        if cfg is None or not (cfg.url or cfg.file):
            return PretrainedSource("", True, "")  # timm says what it lacks itself
        if cfg.file:
            return PretrainedSource("", True, str(cfg.file))
        url = cfg.url
    else:
        from torchvision import models as tvm

        url = tvm.get_model_weights(name).DEFAULT.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = os.path.basename(urlparse(url).path)
    return PretrainedSource(
        urlparse(url).hostname or "", (folder / file).is_file(), f"{folder}/ as {file} (from {url})"
    )


def _offline_reason(host: str, hugging_face: bool) -> str | None:
    """Why no download can work here, known at once: HF_HUB_OFFLINE set, or the host's name does not resolve
    (a machine without network), so that nothing retries for a minute first."""
    import socket

    if hugging_face and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be resolved: {e.strerror or e}; no network?"
    return None


def pretrained_error(name: str, source: PretrainedSource, reason: str) -> ValueError:
    """The one line for pretrained weights that cannot be had: what, why, and the two ways on offline."""
    return ValueError(
        f"model.pretrained: the weights of {name} cannot be downloaded ({reason}); for offline use put them in "
        f"{source.place}, or start from a file of your own with model.init_from = PATH"
    )


def check_pretrained_reachable(name: str) -> PretrainedSource:
    """Before a pretrained model is built: weights neither cached nor downloadable raise the one line now."""
    source = pretrained_source(name)
    if not source.cached and source.host:
        reason = _offline_reason(source.host, source.hugging_face)
        if reason is not None:
            raise pretrained_error(name, source, reason)
    return source
