"""The tasks: one interface and registry (`inner.tasks.base`) and the four built-in tasks.

A task is one class in one file: its data and checks, and everything else specific to it (the gym
id, difficulty levels, completion-length grid, split sizes, its part of the base model's SFT
data). `register(TaskClass)` makes it known to `get_task`, the env ids (metaenv), the action grids
and the benchmarks' task lists. The built-in tasks below register themselves the same way.
"""

from inner.tasks.base import (
    FORMAT_WEIGHT,
    SCALES,
    SPLITS,
    Example,
    SplitSizeError,
    Task,
    get_task,
    on_register,
    register,
    registered,
    task_class,
    task_names,
)

__all__ = ["FORMAT_WEIGHT", "SCALES", "SPLITS", "Example", "SplitSizeError", "Task", "get_task",
           "on_register", "register", "registered", "task_class", "task_names"]

# The built-in tasks register themselves on import, in this order (task_names() keeps it).
from inner.tasks import gsm8k, math_task, countdown, logic  # noqa: E402, F401, I001
