"""The env's configuration: every argument of `LLMZeroEnv` in one dataclass, checked as it enters.

`gym.make(env_id, **kwargs)` hands its keyword arguments to `LLMZeroEnv`, which builds an
`EnvConfig` from them; an argument left as None takes its scale's default (`SCALE_DEFAULTS`).
Every check that needs no data runs here, before anything is built or loaded, and raises a
ValueError that names the argument, the value and what is allowed. The checks that need the task's
data (a split that cannot hold `dev_size` items) or its grids (`hparam_grid`, `fixed_hparams`:
`metaenv.hparams.build_hparam_space`) run in the env's constructor, still before any model loads.
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from inner.tasks import task_class

# Per-scale defaults. Embedded: 8 stages of 5 steps give a controller 8 decisions per episode,
# long enough for entropy collapse, zero-variance groups and plateaus to appear and be answered,
# while a stage stays under 10 s on 2 CPU cores (benchmarks/learnability.py, headroom.py).
SCALE_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedded": {"stages": 8, "steps_per_stage": 5, "dev_size": 64, "test_size": 256,
                 "max_states_in_memory": 16},
    # Large models: every saved state goes straight to disk (an AdamW state is 3x the weights).
    "paper": {"stages": 8, "steps_per_stage": 25, "dev_size": 128, "test_size": 500,
              "max_states_in_memory": 0, "model": "Qwen/Qwen3-0.6B"},
}
DEV_METRICS = ("accuracy", "mean_score")
RENDER_MODES = ("rgb_array",)
DTYPES = ("auto", "fp32", "bf16")
# The episode token cap's default: the default schedule's expected episode tokens, plus a margin
# (LLMZeroEnv.default_episode_tokens), so the default schedule runs its `stages` stages.
DEFAULT_CAP = "default"


@dataclass(frozen=True)
class EnvConfig:
    """Every argument of the env (the `gym.make` keyword arguments), with its scale's defaults.

    task: a registered task's name (`inner.tasks.task_names()`).
    scale: "embedded" (the shipped tiny model, CPU, offline) or "paper" (`model`: a Hugging Face
        id or a local path).
    model: None for the scale's default model.
    device: a torch device available on this machine ("cpu", "cuda", "cuda:1", "mps", ...).
    stages x steps_per_stage: the episode's length in stages, and GRPO steps per stage.
    hparam_grid: {name: [values] | None} overrides the task's grids (`metaenv.hparams`); None
        removes a name from control. fixed_hparams: uncontrolled `GRPOConfig` values.
    difficulty: the default training level (one of the task's levels at `scale`).
    dev_size / test_size: evaluation items; the task must hold that many distinct problems.
    dev_metric: "accuracy" or "mean_score" (the reward, format bonus included).
    eval_max_new_tokens: tokens generated per evaluation completion (None: the trainer's default).
    seed: the seed of the first reset() when it is given none.
    max_stages / max_tokens: budgets (stages trained; prompt + completion tokens sampled) after
        which step() raises BudgetExhausted; each counts every stage this env trains.
    max_states_in_memory / state_dir: saved states kept in memory before they spill to disk, and
        the folder they spill to (created if needed; None: a temporary folder).
    render_mode: None or "rgb_array".
    shuffle_rewards: a control for benchmarks (rewards permuted across each batch, so nothing
        can be learned).
    data_path (paper scale): local files in the hub dataset's columns instead of the hub.
    enable_thinking: Qwen3's switch in the chat template (chat models only; default off).
    episode_token_cap: prompt + completion tokens one episode may sample; the episode ends at the
        stage that reaches it, or at `stages`, whichever comes first. "default": the default
        schedule's expected episode tokens plus 10% (`LLMZeroEnv.default_episode_tokens`), so a
        schedule that raises the group size or the completion length buys fewer stages. None (the
        default for now): no cap, so the committed results keep their meaning; the leaderboard's
        presets say where they turn it on.
    dtype: "fp32", "bf16" (forward passes under bf16 autocast, fp32 weights and AdamW moments,
        as TRL's bf16=True) or "auto" (bf16 where results/precision.md measured it faster and
        faithful: `inner.models.bf16_pays`).
    stage_cache: a folder of trained stages shared by envs and processes (`metaenv.stage_cache`):
        a stage whose path from the base model was trained before is loaded, not trained again,
        and charged to the budget as trained. None: no cache.
    """

    task: str = "gsm8k"
    scale: str = "embedded"
    model: str | None = None
    device: str = "cpu"
    stages: int | None = None
    steps_per_stage: int | None = None
    hparam_grid: Mapping[str, Any] | None = None
    fixed_hparams: Mapping[str, Any] | None = None
    difficulty: int | None = None
    dev_size: int | None = None
    test_size: int | None = None
    dev_metric: str = "accuracy"
    eval_max_new_tokens: int | None = None
    seed: int | None = None
    max_stages: int | None = None
    max_tokens: int | None = None
    max_states_in_memory: int | None = None
    state_dir: str | None = None
    render_mode: str | None = None
    shuffle_rewards: bool = False
    data_path: str | None = None
    enable_thinking: bool = False
    episode_token_cap: int | str | None = None
    dtype: str = "auto"
    stage_cache: str | None = None

    def __post_init__(self) -> None:
        _check_choice("scale", self.scale, tuple(SCALE_DEFAULTS))
        for name, value in SCALE_DEFAULTS[self.scale].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._check_task()
        self._check_numbers()
        _check_choice("dev_metric", self.dev_metric, DEV_METRICS)
        if self.render_mode is not None:
            _check_choice("render_mode", self.render_mode, RENDER_MODES)
        for name in ("shuffle_rewards", "enable_thinking"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("hparam_grid", "fixed_hparams"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a dict of hyperparameter names, got {value!r}")
        check_device(self.device)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.episode_token_cap != DEFAULT_CAP:
            try:
                check_int("episode_token_cap", self.episode_token_cap, 1, optional=True)
            except ValueError as err:
                raise ValueError(f"episode_token_cap must be {DEFAULT_CAP!r}, None (no cap) or "
                                 f"an int >= 1: {err}") from None
        for name in ("state_dir", "stage_cache"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
                check_writable_dir(name, getattr(self, name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The env's argument names."""
        return tuple(f.name for f in fields(cls))

    def _check_task(self) -> None:
        cls = task_class(self.task)  # ValueError naming the registered tasks
        if self.scale not in cls.levels:
            raise ValueError(f"task {self.task!r} has no scale {self.scale!r}; it has "
                             f"{list(cls.levels)}")
        if self.data_path is not None and self.scale != "paper":
            raise ValueError(f"data_path is for scale='paper' (real datasets), not {self.scale!r}; "
                             f"got data_path={self.data_path!r}")
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"model must be a Hugging Face id or a local path, got {self.model!r}")
        levels = tuple(cls.levels[self.scale][0])
        if self.difficulty is not None and (isinstance(self.difficulty, bool) or not isinstance(
                self.difficulty, numbers.Integral) or self.difficulty not in levels):
            raise ValueError(f"difficulty={self.difficulty!r} is not a level of task "
                             f"{self.task!r} at scale {self.scale!r}; allowed: {list(levels)}")

    def _check_numbers(self) -> None:
        for name, minimum, optional in (
                ("stages", 1, False), ("steps_per_stage", 1, False), ("dev_size", 1, False),
                ("test_size", 1, False), ("eval_max_new_tokens", 1, True), ("max_stages", 1, True),
                ("max_tokens", 1, True), ("max_states_in_memory", 0, True), ("seed", 0, True)):
            value = getattr(self, name)
            check_int(name, value, minimum, optional)
            if value is not None:
                object.__setattr__(self, name, int(value))  # a numpy integer becomes an int


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is an int >= ``minimum`` (or None if
    ``optional``); a float or a bool is refused, not truncated. The one integer check of the
    env's and the controllers' arguments."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum} and an int (not a float or a bool)"
                         f"{' or None' if optional else ''}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_device(device: Any) -> None:
    """Raise ValueError unless `device` names a torch device that this machine has."""
    allowed = "allowed: 'cpu', or an accelerator this machine has ('cuda', 'cuda:1', 'mps', ...)"
    try:
        dev = torch.device(device) if isinstance(device, str | torch.device) else None
    except RuntimeError:
        dev = None
    if dev is None:
        raise ValueError(f"device={device!r} is not a torch device; {allowed}")
    if dev.type == "cpu":
        return
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != dev.type:
        have = "no accelerator" if accelerator is None else f"the accelerator {accelerator.type!r}"
        raise ValueError(f"device={device!r} is not available: this machine has {have}; {allowed}")
    count = torch.accelerator.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device={device!r} is not available: this machine has {count} "
                         f"{dev.type} device(s), indices 0..{count - 1}")


def check_writable_dir(name: str, path: str | os.PathLike) -> None:
    """Create the folder `path` if needed and write a file in it; ValueError naming `name` if
    either fails."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, TypeError) as err:
        raise ValueError(f"{name}={str(path)!r} cannot be created or written: {err}") from err
