"""Hyperparameters of one GRPO stage, with TRL `GRPOConfig` names and meanings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass(frozen=True)
class GRPOConfig:
    """One stage's hyperparameters; any of them may change from one stage to the next.

    Frozen and validated when built, so a config that exists is a valid one.
    """

    learning_rate: float = 1e-4
    beta: float = 0.04  # k3 KL coefficient; the reference model is always kept, so 0 -> >0 works
    # TRL 1.16 default: weight the per-token KL by the (differentiable) policy ratio, which makes
    # its gradient the unbiased reverse-KL gradient; it changes the gradient even on-policy.
    use_bias_correction_kl: bool = True
    epsilon: float = 0.2  # lower clip of the policy ratio
    epsilon_high: float | None = None  # upper clip; None -> epsilon
    temperature: float = 1.0
    top_p: float = 1.0
    num_generations: int = 8
    prompts_per_step: int = 8  # unique prompts per step; batch = prompts_per_step * num_generations
    max_completion_length: int = 48
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # optimizer updates per generated batch
    max_grad_norm: float = 1.0  # <= 0 disables clipping (the norm is still logged)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"GRPOConfig.{f.name}={value!r} is invalid: not a finite number")
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta": self.beta >= 0,
            "epsilon": 0 <= self.epsilon < 1,
            "epsilon_high": self.epsilon_high is None or self.epsilon_high >= 0,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "num_generations": self.num_generations >= 1,
            "prompts_per_step": self.prompts_per_step >= 1,
            "max_completion_length": self.max_completion_length >= 1,
            "loss_type": self.loss_type in LOSS_TYPES,
            "scale_rewards": self.scale_rewards in SCALE_REWARDS,
            "num_iterations": self.num_iterations >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} is invalid")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        return asdict(self)
