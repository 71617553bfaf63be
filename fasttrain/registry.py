"""Every name a config accepts for a pluggable part, and where each is implemented: the ground floor.

One table per kind of part. Entries are ``"module:attribute"`` strings, imported only when used, so
:mod:`fasttrain.config` validates names against these tables without importing torch, DALI or the
implementations, and no module imports another just to learn a name. This module imports nothing of fasttrain.

- ``tasks``: ``task.name`` -> a :class:`~fasttrain.tasks.base.Task` subclass.
- ``backends``: ``data.loader`` -> a loader backend (see :mod:`fasttrain.data.base`); ``auto`` is a policy over
  them (:func:`fasttrain.data.loaders.choose_backend`).
- ``formats``: ``data.format`` -> a function ``(DataConfig, root: Path) -> DataSource``.

Adding a part: its module and one line in its table, or :func:`register` from outside the package (a test, a
plugin) before the config is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AUTO", "TABLES", "SETTINGS", "names", "register", "resolve"]

AUTO = "auto"
"""``data.loader = auto``: the backend is chosen per run (the choice and its reason are logged)."""

TABLES: dict[str, dict[str, str]] = {
    "tasks": {
        "classify": "fasttrain.tasks.classify:ClassifyTask",
        "regress": "fasttrain.tasks.regress:RegressTask",
        "pix2pix": "fasttrain.tasks.pix2pix:Pix2PixTask",
    },
    "backends": {
        "torch": "fasttrain.data.torch_loader:build",
        "dali": "fasttrain.data.dali:build",
        "cache": "fasttrain.data.gpu_cache:build",
    },
    "formats": {
        "folder": "fasttrain.data.sources:discover_folder",
        "manifest": "fasttrain.data.formats:discover_manifest",
        "drawing": "fasttrain.data.formats:discover_drawing",
        "paired": "fasttrain.data.formats:discover_paired",
        "shards": "fasttrain.data.shards:discover_shards",
    },
}

SETTINGS: dict[str, str] = {"tasks": "task.name", "backends": "data.loader", "formats": "data.format"}
"""The config setting each table's names are the values of (named in every error)."""


def names(table: str) -> tuple[str, ...]:
    """The names ``table`` holds, in registration order."""
    return tuple(TABLES[table])


def register(table: str, name: str, target: str) -> None:
    """Add (or replace) ``name`` in ``table``; ``target`` is ``"module:attribute"``, imported when first used."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    if target.count(":") != 1:
        raise ValueError(f"{table}: target for {name!r} must be 'module:attribute', got {target!r}")
    TABLES[table][name] = target


def resolve(table: str, name: str) -> Any:
    """The object ``name`` stands for in ``table`` (imports its module). ValueError names the setting."""
    entries = TABLES[table]
    if name not in entries:
        raise ValueError(f"{SETTINGS[table]}: unknown value {name!r}; known: {', '.join(entries)}")
    module, attr = entries[name].split(":")
    return getattr(importlib.import_module(module), attr)
