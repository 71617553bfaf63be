"""Tasks: what a batch means. ``make_task(cfg, runtime, source)`` picks one by ``task.name``."""

from __future__ import annotations

import importlib

from fasttrain.tasks.base import Task, TrainState

__all__ = ["Task", "TrainState", "make_task", "task_class"]

_TASKS = {
    "classify": "fasttrain.tasks.classify:ClassifyTask",
    "regress": "fasttrain.tasks.regress:RegressTask",
    "pix2pix": "fasttrain.tasks.pix2pix:Pix2PixTask",
}


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"task.name: unknown task {name!r}; known: {', '.join(_TASKS)}")
    mod, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def make_task(cfg, runtime, source) -> Task:
    return task_class(cfg.task.name)(cfg, runtime, source)
