"""Registry of site learning tasks, by the name jobs put in their config."""

from __future__ import annotations

from importlib import import_module

from clinfed.tasks.base import SiteData, SiteDataError, Task

TASKS = {
    "breast_cancer": "clinfed.tasks.breast_cancer:BreastCancerTask",
    "segmentation": "clinfed.tasks.segmentation:SegmentationTask",
    "segmentation3d": "clinfed.tasks.segmentation:Segmentation3DTask",
}


def build_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)(**kwargs)


__all__ = ["TASKS", "SiteData", "SiteDataError", "Task", "build_task"]
