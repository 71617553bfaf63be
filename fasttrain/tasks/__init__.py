"""Tasks: what a batch means. ``make_task(cfg, runtime, source)`` picks one by ``task.name``.

:data:`TASKS` is the one table of task names (``"module:Class"`` strings, imported only when used), so
``fasttrain.config`` reads the names ``task.name`` accepts without importing torch. Adding a task: its module
and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fasttrain.tasks.base import Task, TrainState

__all__ = ["TASKS", "Task", "TrainState", "make_task", "task_class", "task_names"]

TASKS: dict[str, str] = {
    "classify": "fasttrain.tasks.classify:ClassifyTask",
    "regress": "fasttrain.tasks.regress:RegressTask",
    "pix2pix": "fasttrain.tasks.pix2pix:Pix2PixTask",
}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task {name!r}; known: {', '.join(TASKS)}")
    mod, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def make_task(cfg: Any, runtime: Any, source: Any) -> Task:
    return task_class(cfg.task.name)(cfg, runtime, source)


def __getattr__(name: str) -> Any:
    """``Task`` and ``TrainState`` from :mod:`fasttrain.tasks.base`, imported on first use (it imports torch)."""
    if name in ("Task", "TrainState"):
        from fasttrain.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'fasttrain.tasks' has no attribute {name!r}")
