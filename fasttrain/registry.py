"""Every name a config accepts for a pluggable part, and where each is implemented: the ground floor.

One table per kind of part. Entries are ``"module:attribute"`` strings, imported only when used, so
:mod:`fasttrain.config` validates names against these tables without importing torch, DALI or the
implementations, and no module imports another just to learn a name. This module imports nothing of fasttrain.

- ``tasks``: ``task.name`` -> a :class:`~fasttrain.tasks.base.Task` subclass.
- ``backends``: ``data.loader`` -> a :class:`~fasttrain.data.base.Backend` object (its module's ``BACKEND``):
  it builds loaders, says which samples it serves and where ``auto`` should take it (its ``rank`` and ``fits``),
  and what autotune may try (its ``knobs``); ``auto`` is the one policy over them
  (:func:`fasttrain.data.loaders.choose_backend`), and neither it nor autotune knows a backend by name.
- ``formats``: ``data.format`` -> a function ``(DataConfig, root: Path) -> DataSource``.
- ``optimizers``: ``optim.name`` -> a builder ``(modules, OptimConfig, lr, fused_kwargs) -> Optimizer``
  (:mod:`fasttrain.optim`; ``timm/<name>`` is any of timm's, outside the table).
- ``schedules``: ``schedule.name`` -> a pure lr factor ``(ScheduleConfig, step, steps_per_epoch, total_steps)``.
- ``loggers``: ``train.loggers`` -> a metric sink class ``(run_dir)`` (:mod:`fasttrain.metrics`).

Adding a part: its module and one line in its table, or :func:`register` from outside the package (a test, a
plugin) before the config is loaded. A new data backend touches at most 3 files: its module, one line here and
the settings of its own it adds to ``DataConfig`` (if any); ``tests/data/test_backend_plugin.py`` shows one that
trains, is chosen by ``auto`` and is tuned by autotune, registered from a test module.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AUTO", "INDEXED_FORMATS", "TABLES", "SETTINGS", "names", "register", "resolve"]

AUTO = "auto"
"""``data.loader = auto``: the backend is chosen per run (the choice and its reason are logged)."""

TABLES: dict[str, dict[str, str]] = {
    "tasks": {
        "classify": "fasttrain.tasks.classify:ClassifyTask",
        "regress": "fasttrain.tasks.regress:RegressTask",
        "pix2pix": "fasttrain.tasks.pix2pix:Pix2PixTask",
    },
    "backends": {
        "torch": "fasttrain.data.torch_loader:BACKEND",
        "dali": "fasttrain.data.dali:BACKEND",
        "cache": "fasttrain.data.gpu_cache:BACKEND",
    },
    "formats": {
        "folder": "fasttrain.data.sources:discover_folder",
        "manifest": "fasttrain.data.formats:discover_manifest",
        "drawing": "fasttrain.data.formats:discover_drawing",
        "paired": "fasttrain.data.formats:discover_paired",
        "shards": "fasttrain.data.shards:discover_shards",
    },
    "optimizers": {
        "sgd": "fasttrain.optim:sgd",
        "adamw": "fasttrain.optim:adamw",
        "adam": "fasttrain.optim:adamw",
        "lamb": "fasttrain.optim:timm_factory",
        "lion": "fasttrain.optim:timm_factory",
    },
    "schedules": {
        "constant": "fasttrain.optim:constant",
        "step": "fasttrain.optim:step_decay",
        "cosine": "fasttrain.optim:cosine",
        "linear": "fasttrain.optim:linear",
        "onecycle": "fasttrain.optim:onecycle",
    },
    "loggers": {
        "jsonl": "fasttrain.metrics:JsonlSink",
        "csv": "fasttrain.metrics:CsvSink",
        "tensorboard": "fasttrain.metrics:TensorboardSink",
    },
}

SETTINGS: dict[str, str] = {
    "tasks": "task.name",
    "backends": "data.loader",
    "formats": "data.format",
    "optimizers": "optim.name",
    "schedules": "schedule.name",
    "loggers": "train.loggers",
}
"""The config setting each table's names are the values of (named in every error)."""

INDEXED_FORMATS = ("folder", "manifest", "drawing", "paired")
"""The built-in formats the dataset index holds (:mod:`fasttrain.data.index`; tar shards carry their own index,
and a format registered from outside is indexed keyed by every data setting)."""


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
