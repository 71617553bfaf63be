"""The answer cache: one JSON file per key under ``tune.cache_dir``.

The key is a hash of the *whole* resolved config minus an explicit ignore list (each entry says why it cannot
change the answer), plus the budget and what the machine and libraries are. A field added to the config enters
the key by itself, so a stale answer can only be served for a field someone decided, in writing, to ignore.
Only reliable, ok answers are stored (see :attr:`AutotuneReport.reliable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from fasttrain.config import Config, config_to_dict, default_workers
from fasttrain.io import atomic_write_text
from fasttrain.tuning.report import AutotuneReport

log = logging.getLogger("fasttrain.tuning")

__all__ = [
    "CACHE_VERSION",
    "IGNORED",
    "flatten",
    "key_fields",
    "cache_key",
    "cache_dir_for",
    "load",
    "store",
    "machine",
]

CACHE_VERSION = 3
"""Raised whenever what a cached answer means changes."""

IGNORED: dict[str, str] = {
    "name": "the config's name labels files only",
    "train.epochs": "how long training runs, not what one step costs",
    "train.runs_dir": "where files go",
    "train.run_name": "where files go",
    "train.checkpoint_every": "checkpoints are written between steps",
    "train.checkpoint_every_steps": "checkpoints are written between steps",
    "train.best_metric": "which checkpoint is kept",
    "train.log_every": "read-backs between steps",
    "train.max_steps": "how long training runs",
    "train.eval_every": "how often evaluation runs, not what it costs",
    "schedule.*": "the learning-rate schedule changes a number in the update, not its cost",
    "optim.lr": "a number in the update, not its cost",
    "runtime.seed": "which random numbers, not how many",
    "task.sample_every": "pix2pix sample images are written between steps",
    "tune.cache_dir": "where answers are kept",
    "dist.*": "how long processes wait on each other, not what a step costs",
}


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every config field, ``name`` included."""
    out: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def _ignored(name: str) -> bool:
    return name in IGNORED or f"{name.split('.')[0]}.*" in IGNORED


def machine(runtime) -> dict[str, Any]:
    """What the answer depends on besides the config: the device, its software, the cores a loader may use."""
    import torch

    from fasttrain import __version__
    from fasttrain.distributed import dist_info
    from fasttrain.runtime import dali_version

    if runtime.is_cuda:
        device = torch.cuda.get_device_name(runtime.device)
    else:
        device = f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}"
    return {
        "device": device,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dali": dali_version(),
        "workers": default_workers(),
        "fasttrain": __version__,
        "world_size": dist_info().world_size,  # the answer is per GPU for a share of the global batch
    }


def key_fields(cfg: Config, *, budget_gib: float, machine_info: dict[str, Any]) -> dict[str, Any]:
    """Everything the key is hashed from (stored beside the answer, so a mismatch can be read)."""
    config = {k: v for k, v in flatten(cfg).items() if not _ignored(k)}
    return {"version": CACHE_VERSION, "budget_gib": budget_gib, "machine": machine_info, "config": config}


def cache_key(fields: dict[str, Any]) -> str:
    """A stable hash of ``fields`` (order of keys does not matter)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_dir_for(cfg: Config) -> Path:
    """tune.cache_dir, else the autotune/ folder of fasttrain's cache (where the demo dataset lives too)."""
    from fasttrain.data.synthetic import default_cache_dir

    return Path(cfg.tune.cache_dir).expanduser() if cfg.tune.cache_dir else default_cache_dir() / "autotune"


def load(path: Path, fields: dict[str, Any]) -> AutotuneReport | None:
    """The stored report when ``path`` holds one for exactly ``fields``; None otherwise (an unreadable entry is
    ignored with a warning)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") != json.loads(json.dumps(fields, default=str)):
            return None
        return AutotuneReport.from_dict(entry["report"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable autotune cache %s: %s", path, e)
        return None


def store(path: Path, fields: dict[str, Any], report: AutotuneReport) -> None:
    atomic_write_text(path, json.dumps({"key": fields, "report": report.to_dict()}, indent=1, default=str))
