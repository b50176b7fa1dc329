"""The Gymnasium face of LLMZero-Gym: `import metaenv` registers one env id per task.

    import gymnasium as gym, metaenv
    env = gym.make("LLMZero-GSM8K-v0", stages=4, steps_per_stage=10)

The ids come from the task registry (`inner.tasks.register`): every task registered before or after
this import gets its class's `env_id`, so a user's task needs no second registration here.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from inner.tasks import Task, on_register, registered
from metaenv.config import EnvConfig
from metaenv.env import Budget, BudgetExhausted, EnvState, LLMZeroEnv
from metaenv.hparams import HParamSpace, InvalidAction


def env_ids() -> dict[str, str]:
    """Task name -> gym id, for every registered task, in registration order."""
    return {cls.name: cls.env_id for cls in registered()}


def _register_env(cls: type[Task]) -> None:
    if cls.env_id not in registry:  # re-importing (e.g. importlib.reload) must not warn
        register(id=cls.env_id, entry_point="metaenv.env:LLMZeroEnv", kwargs={"task": cls.name})


on_register(_register_env)

__all__ = [
    "Budget",
    "BudgetExhausted",
    "EnvConfig",
    "EnvState",
    "HParamSpace",
    "InvalidAction",
    "LLMZeroEnv",
    "env_ids",
]
