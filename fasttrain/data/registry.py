"""The names ``data.loader`` and ``data.format`` accept, and where each is implemented: one table each.

Entries are ``"module:attribute"`` strings, imported only when used, so ``fasttrain.config`` reads the names
without importing torch, DALI or the implementations (and no module imports another just to learn a name).

- A loader backend is a module with ``build(samples, cfg, spec, *, train, batch_size, num_shards, shard_id)``
  returning a :class:`~fasttrain.data.base.Loader` for a :class:`~fasttrain.data.samples.Samples` request
  (every task asks through it, so a backend serves every task it can). Adding one: its module and one line in
  :data:`BACKENDS`. ``auto`` is a policy over these (:func:`fasttrain.data.loaders.choose_backend`).
- A data format is a function ``(DataConfig, root: Path) -> DataSource`` listing files and targets. Adding one:
  its function and one line in :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AUTO", "BACKENDS", "FORMATS", "loader_choices", "format_choices", "backend_builder", "format_discoverer"]

AUTO = "auto"
"""``data.loader = auto``: the backend is chosen per run (the choice and its reason are logged)."""

BACKENDS: dict[str, str] = {
    "torch": "fasttrain.data.torch_loader:build",
    "dali": "fasttrain.data.dali:build",
    "cache": "fasttrain.data.gpu_cache:build",
}

FORMATS: dict[str, str] = {
    "folder": "fasttrain.data.sources:discover_folder",
    "manifest": "fasttrain.data.formats:discover_manifest",
    "drawing": "fasttrain.data.formats:discover_drawing",
    "paired": "fasttrain.data.formats:discover_paired",
}


def loader_choices() -> tuple[str, ...]:
    return (AUTO, *BACKENDS)


def format_choices() -> tuple[str, ...]:
    return tuple(FORMATS)


def _resolve(table: dict[str, str], name: str, setting: str) -> Any:
    if name not in table:
        raise ValueError(f"{setting}: unknown value {name!r}; known: {', '.join(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def backend_builder(name: str) -> Any:
    """The ``build`` function of loader backend ``name`` (imports its module)."""
    return _resolve(BACKENDS, name, "data.loader")


def format_discoverer(name: str) -> Any:
    """The discovery function of data format ``name`` (imports its module)."""
    return _resolve(FORMATS, name, "data.format")
