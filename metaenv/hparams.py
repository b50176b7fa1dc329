"""The action space: per-task grids of absolute hyperparameter values.

Values are the currency: a stage is a dict {name: grid value}, which controllers build and
`HParamSpace.complete` checks (the env's one check of a stage); `neighbour` moves a value along its
grid. Indices exist for a MultiDiscrete policy only: one index per controlled name selects a value
from its grid (`encode`, `decode`). Grids are plain data (`default_grids(task, scale)`: grids
shared by every task, plus the task's own completion lengths) that a user overrides per name with
the env's `hparam_grid`; `"difficulty"` is the training-data difficulty level, every other name is
a `GRPOConfig` field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from gymnasium import spaces

from inner.config import GRPOConfig
from inner.tasks import SCALES, task_class

DIFFICULTY = "difficulty"  # the one controlled name that is not a GRPOConfig field
CONFIG_NAMES = tuple(f.name for f in fields(GRPOConfig))
ALLOWED_NAMES = (*CONFIG_NAMES, DIFFICULTY)

# Shared embedded-scale grids. The tiny char-level models are very sensitive to the learning rate
# (one AdamW step at 1e-4 gave a k3 KL of ~0.27 on 3M parameters), so the grid spans 1e-5..1e-3.
_EMBEDDED_COMMON: dict[str, tuple] = {
    "learning_rate": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    "beta": (0.0, 0.01, 0.04, 0.1),
    "temperature": (0.7, 1.0, 1.3),
    "num_generations": (4, 8, 16),
}
# Paper scale (Qwen3-0.6B..8B): the usual GRPO ranges, with completions measured in BPE tokens.
_PAPER_COMMON: dict[str, tuple] = {
    "learning_rate": (1e-7, 3e-7, 1e-6, 3e-6, 1e-5),
    "beta": (0.0, 0.001, 0.01, 0.04),
    "temperature": (0.6, 0.8, 1.0, 1.2),
    "num_generations": (4, 8, 16),
}

# The clip range `epsilon` is not on these grids: with num_iterations = 1 (both scales' default)
# the policy ratio is exactly 1 and the clip never acts. Control it together with num_iterations,
# e.g. hparam_grid={"epsilon": [0.1, 0.2, 0.3], "num_iterations": [2]}.
CLIP_NAMES = ("epsilon", "epsilon_high")
COMMON_GRIDS = {"embedded": _EMBEDDED_COMMON, "paper": _PAPER_COMMON}
# Default value of each shared name (what `complete` and `encode` fill in when given no base).
# Names absent here default to the GRPOConfig default.
COMMON_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedded": {"learning_rate": 1e-4, "beta": 0.04, "temperature": 1.0, "num_generations": 8},
    "paper": {"learning_rate": 1e-6, "beta": 0.0, "temperature": 1.0, "num_generations": 8},
}
# Hyperparameters that are not controlled but differ from GRPOConfig's defaults, per scale.
DEFAULT_FIXED: dict[str, dict[str, Any]] = {
    "embedded": {},
    "paper": {"prompts_per_step": 16},
}


class InvalidAction(ValueError):
    """An action or hyperparameter value outside the space; the message names the parameter."""


def _same(a: Any, b: Any) -> bool:
    # Floats built by arithmetic (0.1 * 3e-4) must still match the grid value 3e-5.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or a == b
    return a == b


def _distance(a: Any, b: Any) -> float:
    # Log distance for positive grids (learning rates span decades), linear otherwise.
    if a > 0 and b > 0:
        return abs(math.log(a) - math.log(b))
    return abs(a - b)


def default_grids(task: str, scale: str) -> dict[str, tuple | None]:
    """The grids of a registered task at `scale`: the shared ones and the task's completion
    lengths; `difficulty: None` stands for the task's own difficulty levels."""
    lengths, _ = _task_lengths(task, scale)
    return COMMON_GRIDS[scale] | {"max_completion_length": lengths, DIFFICULTY: None}


def default_values(task: str, scale: str) -> dict[str, Any]:
    """The default value of each name of `default_grids` but difficulty."""
    _, length = _task_lengths(task, scale)
    return COMMON_DEFAULTS[scale] | {"max_completion_length": length}


def _task_lengths(task: str, scale: str) -> tuple[tuple[int, ...], int]:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    lengths = task_class(task).completion_lengths
    if scale not in lengths:
        raise ValueError(f"task {task!r} has no {scale} scale; it has {list(lengths)}")
    grid, default = lengths[scale]
    return tuple(grid), default


@dataclass
class HParamSpace:
    """Controlled names, their grids and defaults (no episode state: the env keeps that)."""

    grids: dict[str, tuple]
    defaults: dict[str, Any]

    def __post_init__(self) -> None:
        for name, grid in self.grids.items():
            if len(grid) == 0:
                raise ValueError(f"hyperparameter {name!r} has an empty grid")
            self.grid_value(name, self.defaults[name])  # every default must be on its grid

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.grids)

    @property
    def nvec(self) -> np.ndarray:
        return np.array([len(g) for g in self.grids.values()], dtype=np.int64)

    def space(self) -> spaces.MultiDiscrete:
        """The gymnasium action space of this grid."""
        return spaces.MultiDiscrete(self.nvec)

    def grid_value(self, name: str, value: Any, snap: bool = False) -> Any:
        """The grid's own value equal to `value` for `name` (a float made by arithmetic, 0.1 *
        3e-4, matches 3e-5); raises naming both unless `snap` takes the nearest."""
        if name not in self.grids:
            raise InvalidAction(
                f"unknown hyperparameter {name!r}; controlled names are {list(self.names)}"
            )
        grid = self.grids[name]
        for v in grid:
            if _same(v, value):
                return v
        numeric = _is_numeric_grid(grid)
        if snap and numeric and isinstance(value, int | float) and math.isfinite(value):
            return _nearest(grid, value)
        raise InvalidAction(
            f"{name}={value!r} is not on the grid; allowed values: {list(grid)}"
            + (" (pass snap=True for the nearest)" if numeric and not snap else "")
        )

    def index(self, name: str, value: Any, snap: bool = False) -> int:
        """Grid index of `value` for `name` (as `grid_value` finds it)."""
        on_grid = self.grid_value(name, value, snap)  # raises first, naming an unknown name
        return self.grids[name].index(on_grid)

    def complete(
        self,
        values: Mapping[str, Any],
        *,
        base: Mapping[str, Any] | None = None,
        snap: bool = False,
    ) -> dict[str, Any]:
        """Every controlled name's grid value: `values` checked on the grids (or, with `snap`,
        moved to the nearest grid value), and the names it lacks from `base` (a full set of values,
        e.g. the last stage's; other names in it are ignored), or the defaults without one.

        This is the one check a stage's values pass; it returns the grid's own values, so a float
        made by arithmetic (0.1 * 3e-4) trains exactly as the grid value 3e-5 does.
        """
        unknown = [k for k in values if k not in self.grids]
        if unknown:
            raise InvalidAction(
                f"unknown hyperparameter {unknown[0]!r}; controlled names are {list(self.names)}"
            )
        fill = self.defaults if base is None else base
        lacking = [n for n in self.names if n not in values and n not in fill]
        if lacking:
            raise InvalidAction(f"base lacks {lacking}: it must give every controlled name")
        merged = {**fill, **values}
        return {n: self.grid_value(n, merged[n], snap) for n in self.names}

    def encode(
        self,
        values: Mapping[str, Any],
        *,
        base: Mapping[str, Any] | None = None,
        snap: bool = False,
    ) -> np.ndarray:
        """The MultiDiscrete action of `values` (completed as `complete` does), for a policy that
        acts in indices; controllers pass the values themselves to `env.step`."""
        full = self.complete(values, base=base, snap=snap)
        return np.array([self.index(n, full[n]) for n in self.names], dtype=np.int64)

    def neighbour(self, name: str, value: Any, delta: int, clamp: bool = True) -> Any:
        """The grid value `delta` steps from `value` (snapped to the grid) along `name`'s grid.

        Past the grid's end: its last (or first) value when `clamp`, else None.
        """
        grid = self.grids[name]
        i = self.index(name, value, snap=True) + delta
        if 0 <= i < len(grid):
            return grid[i]
        return grid[min(max(i, 0), len(grid) - 1)] if clamp else None

    def validate(self, action: Any) -> np.ndarray:
        """Check an action against the grids; returns it as int64 or raises naming the parameter."""
        arr = np.asarray(action)
        if arr.shape != (len(self.grids),):
            raise InvalidAction(
                f"action must have shape ({len(self.grids)},), one index per {list(self.names)}; "
                f"got shape {arr.shape}"
            )
        for i, (name, grid) in enumerate(self.grids.items()):
            x = arr[i]
            integral = np.issubdtype(arr.dtype, np.integer) or (
                np.issubdtype(arr.dtype, np.floating) and np.isfinite(x) and float(x).is_integer()
            )
            if not integral or not 0 <= int(x) < len(grid):
                raise InvalidAction(
                    f"action[{i}] for {name!r} is {x.item()!r}; allowed indices 0..{len(grid) - 1} "
                    f"for values {list(grid)}"
                )
        return arr.astype(np.int64)

    def decode(self, action: Any) -> dict[str, Any]:
        """The hyperparameter values an action selects."""
        idx = self.validate(action)
        return {n: self.grids[n][int(i)] for n, i in zip(self.names, idx, strict=True)}

    def default_action(self) -> np.ndarray:
        return np.array([self.index(n, self.defaults[n]) for n in self.names], dtype=np.int64)

    def positions(self, values: Mapping[str, Any]) -> np.ndarray:
        """Where each controlled value lies on its grid: its index over the grid's last index, in
        [0, 1] (0 for one-value grids); the observation's view of the hyperparameters."""
        idx = np.array([self.index(n, values[n]) for n in self.names], dtype=np.float32)
        top = np.maximum(self.nvec - 1, 1).astype(np.float32)
        return idx / top


def build_hparam_space(
    task: str,
    scale: str = "embedded",
    hparam_grid: Mapping[str, Sequence | None] | None = None,
    fixed_hparams: Mapping[str, Any] | None = None,
    difficulty_levels: Sequence[int] | None = None,
    default_difficulty: int | None = None,
) -> tuple[HParamSpace, dict[str, Any]]:
    """The task's default grids with the user's overrides, and the fixed (uncontrolled) values.

    `hparam_grid[name] = [values]` replaces or adds a grid, `None` removes the name from control
    (it then keeps its default). Fixed values are GRPOConfig fields or `difficulty`.
    """
    task_grids, task_defaults = default_grids(task, scale), default_values(task, scale)
    hparam_grid = dict(hparam_grid or {})
    fixed = dict(DEFAULT_FIXED[scale]) | dict(fixed_hparams or {})
    for name in [*hparam_grid, *fixed]:
        if name not in ALLOWED_NAMES:
            raise ValueError(f"unknown hyperparameter {name!r}; allowed: {list(ALLOWED_NAMES)}")
    both = set(hparam_grid) & set(fixed_hparams or {})
    if both:
        raise ValueError(f"{sorted(both)} are both in hparam_grid and fixed_hparams; choose one")
    _check_values(hparam_grid, fixed)

    levels = tuple(difficulty_levels) if difficulty_levels is not None else None
    config_defaults = GRPOConfig().to_dict()
    grids: dict[str, tuple] = {}
    defaults: dict[str, Any] = {}
    for name, grid in (task_grids | hparam_grid).items():
        if name in fixed or (name in hparam_grid and hparam_grid[name] is None):
            continue
        if name == DIFFICULTY:
            grid = levels if grid is None else tuple(grid)
            if grid is None:  # a task without difficulty levels: nothing to control
                continue
            if levels is not None and not set(grid) <= set(levels):
                raise ValueError(f"difficulty grid {list(grid)} is not within the task's {levels}")
            want = default_difficulty if default_difficulty is not None else grid[0]
        else:
            grid = tuple(grid)
            want = task_defaults.get(name, config_defaults[name])
        grids[name] = grid
        defaults[name] = _nearest(grid, want)
    if DIFFICULTY not in grids and DIFFICULTY not in fixed and default_difficulty is not None:
        fixed[DIFFICULTY] = default_difficulty
    _check_clip_acts(grids, fixed, config_defaults["num_iterations"])
    return HParamSpace(grids, defaults), fixed


def _check_values(hparam_grid: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """Each grid a non-empty list (or None), and no number in a grid or a fixed value that is
    not finite: ValueError naming the argument, the name and the value."""
    for name, grid in hparam_grid.items():
        if grid is None:
            continue
        if isinstance(grid, str | bytes | Mapping) or not isinstance(grid, Sequence) or not grid:
            raise ValueError(f"hparam_grid[{name!r}]={grid!r}: a grid is a non-empty list of "
                             "values (or None, to leave the name uncontrolled)")
        for value in grid:
            _check_finite(f"hparam_grid[{name!r}]", value)
    for name, value in fixed.items():
        _check_finite(f"fixed_hparams[{name!r}]", value)


def _check_finite(where: str, value: Any) -> None:
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        raise ValueError(f"{where} holds {value!r}: hyperparameter values must be finite numbers")


def _check_clip_acts(grids: Mapping[str, tuple], fixed: Mapping[str, Any],
                     default_iterations: int) -> None:
    """A clip range on the grid is an action that does nothing unless some stage makes more than
    one update per batch (num_iterations > 1): refuse it rather than offer a dead action."""
    iterations = grids.get("num_iterations", (fixed.get("num_iterations", default_iterations),))
    controlled = [n for n in CLIP_NAMES if len(grids.get(n, ())) > 1]
    if controlled and max(iterations) <= 1:
        raise ValueError(
            f"{controlled[0]} is controlled but num_iterations is 1, where the policy ratio is "
            "exactly 1 and the clip never acts; also control or fix num_iterations > 1, e.g. "
            'fixed_hparams={"num_iterations": 2}'
        )


def _is_numeric_grid(grid: Sequence) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in grid)


def _nearest(grid: tuple, value: Any) -> Any:
    """`value` if on the grid, else the nearest grid value (an override may lack the default)."""
    for v in grid:
        if _same(v, value):
            return v
    if _is_numeric_grid(grid) and isinstance(value, int | float) and math.isfinite(value):
        return min(grid, key=lambda v: _distance(v, value))
    return grid[0]
