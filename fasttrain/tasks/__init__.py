"""Tasks: what a batch means. ``make_task(cfg, runtime, source, *, model, restoring, inference)`` picks one by
``task.name``.

The task names live in the ``tasks`` table of :mod:`fasttrain.registry` (the ground floor, torch-free), so
``fasttrain.config`` reads the names ``task.name`` accepts without importing torch. Adding a task: its module
and one line there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fasttrain import registry

if TYPE_CHECKING:
    from fasttrain.tasks.base import Task, TrainState

__all__ = ["Task", "TrainState", "make_task", "task_class"]


def task_class(name: str) -> type[Task]:
    return registry.resolve("tasks", name)


def make_task(
    cfg: Any, runtime: Any, source: Any, *, model: Any = None, restoring: bool = False, inference: bool = False
) -> Task:
    """``task.name``'s task. ``model``: one given from Python (or a function returning one); ``restoring``: a
    checkpoint will be loaded into its state (no pretrained download, no init_from read); ``inference``: its
    state only predicts (:attr:`Task.inference`)."""
    task = task_class(cfg.task.name)(cfg, runtime, source, model=model, restoring=restoring)
    task.inference = inference
    return task


def __getattr__(name: str) -> Any:
    """``Task`` and ``TrainState`` from :mod:`fasttrain.tasks.base`, imported on first use (it imports torch)."""
    if name in ("Task", "TrainState"):
        from fasttrain.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'fasttrain.tasks' has no attribute {name!r}")
