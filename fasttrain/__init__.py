"""fasttrain: a high-throughput trainer for PyTorch image models.

    from fasttrain import load_config, train
    cfg = load_config("catfish", ["data.root=photos", "train.epochs=5"])
    result = train(cfg)                       # a TrainResult: run folder, per-epoch history, best value

``train``, ``autotune``, ``bench``, ``predict`` and ``load_config`` are the entry points (each returns a result
object; the command line only prints them). Importing the package has no side effects: no CUDA initialisation,
no DALI import, no flags changed; the entry points are imported when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "train", "autotune", "bench", "predict"]

_ENTRY_POINTS = {
    "load_config": "fasttrain.config",
    "train": "fasttrain.engine",
    "autotune": "fasttrain.tuning",
    "bench": "fasttrain.benchmark",
    "predict": "fasttrain.prediction",
}
"""Each verb of the API and the module (a noun) that implements it."""


def __getattr__(name: str) -> Any:
    """``fasttrain.train`` and friends, imported on first use (PEP 562) so that ``import fasttrain`` stays light."""
    import importlib

    if name in _ENTRY_POINTS:
        value = getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
