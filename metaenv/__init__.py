"""The Gymnasium face of LLMZero-Gym: `import metaenv` registers the four env ids.

    import gymnasium as gym, metaenv
    env = gym.make("LLMZero-GSM8K-v0", stages=4, steps_per_stage=10)
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from metaenv.env import Budget, BudgetExhausted, EnvState, LLMZeroEnv
from metaenv.hparams import HParamSpace, InvalidAction

ENV_IDS = {
    "gsm8k": "LLMZero-GSM8K-v0",
    "math": "LLMZero-MATH-v0",
    "countdown": "LLMZero-Countdown-v0",
    "logic": "LLMZero-Logic-v0",
}

for _task, _env_id in ENV_IDS.items():
    if _env_id not in registry:  # re-importing (e.g. importlib.reload) must not warn
        register(id=_env_id, entry_point="metaenv.env:LLMZeroEnv", kwargs={"task": _task})

__all__ = [
    "ENV_IDS",
    "Budget",
    "BudgetExhausted",
    "EnvState",
    "HParamSpace",
    "InvalidAction",
    "LLMZeroEnv",
]
