"""``sb3``: a stable-baselines3 PPO policy, meta-trained by ``python -m benchmarks.meta_train``.

The policy maps the env's observation to a MultiDiscrete action (one grid index per
hyperparameter). One policy serves every task: its action space is the element-wise largest grid
over the tasks it was trained on, and an index past the end of a smaller grid (Logic has three
difficulty levels where the others have four) is clipped to that grid's last value. Meta-training
is paid once for all runs; its cost, read from the JSON written next to the policy, is reported in
every run's cost under ``meta_train_*`` keys, apart from the run's own stages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from controllers.base import RunResult, Tracker, check_budget, check_int, plain

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "results" / "sb3" / "policy.zip"


def metadata_path(policy_path: str | Path) -> Path:
    """The JSON written next to a policy: ``policy.zip`` -> ``policy.json``."""
    return Path(policy_path).with_suffix(".json")


def fit_action(action: Any, nvec: np.ndarray) -> np.ndarray:
    """Clip each index of a policy action to the env's grids (the policy's may be larger)."""
    return np.minimum(np.asarray(action, dtype=np.int64).reshape(-1), np.asarray(nvec) - 1)


class CommonActions(gym.ActionWrapper):
    """Exposes MultiDiscrete(``nvec``), the largest grids over tasks: one policy drives them all."""

    def __init__(self, env: gym.Env, nvec: Any) -> None:
        super().__init__(env)
        inner = np.asarray(env.action_space.nvec)
        nvec = np.asarray(nvec, dtype=np.int64)
        if nvec.shape != inner.shape or np.any(nvec < inner):
            raise ValueError(f"common grid sizes {nvec.tolist()} do not cover the env's "
                             f"{inner.tolist()}")
        self.action_space = spaces.MultiDiscrete(nvec)

    def action(self, action: Any) -> np.ndarray:
        return fit_action(action, self.env.action_space.nvec)


def load_policy(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The PPO model at ``path`` and its metadata (empty when the JSON is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no sb3 policy at {path}; train one with `python -m benchmarks.meta_train` "
            "(or pass policy_path=)")
    from stable_baselines3 import PPO  # imported here: `import controllers` stays light

    model = PPO.load(path, device="cpu")
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return model, meta


def check_compatible(model: Any, meta: dict[str, Any], env: gym.Env) -> None:
    """Raise a clear error when the policy's spaces cannot drive this env."""
    u = env.unwrapped
    names = list(u.hparams.names)
    trained = meta.get("hparam_names")
    if trained is not None and list(trained) != names:
        raise ValueError(f"the sb3 policy controls {trained}, this env controls {names}; "
                         "meta-train a policy for this action space")
    obs_shape = tuple(env.observation_space.shape)
    if tuple(model.observation_space.shape) != obs_shape:
        raise ValueError(f"the sb3 policy observes shape {model.observation_space.shape}, "
                         f"this env {obs_shape}")
    nvec = np.asarray(model.action_space.nvec)
    if nvec.shape != u.hparams.nvec.shape:
        raise ValueError(f"the sb3 policy picks {nvec.size} hyperparameters, this env "
                         f"{u.hparams.nvec.size}")


def meta_cost(meta: dict[str, Any]) -> dict[str, float]:
    """Meta-training cost keys for RunResult.cost (NaN when the metadata does not say)."""
    keys = {"meta_train_timesteps": "timesteps", "meta_train_seconds": "wall_s",
            "meta_train_real_stages": "real_stages",
            "meta_train_real_seconds": "real_stage_seconds"}
    return {k: float(meta.get(v, math.nan)) for k, v in keys.items()}


@dataclass
class SB3:
    """Runs a saved PPO policy for one episode with deterministic actions.

    ``episodes > 1`` spends more of the budget on episodes whose actions are sampled from the
    policy (seeded); as with every controller, the best state on dev is the one returned.
    """

    name: str = "sb3"
    policy_path: str | None = None  # default: results/sb3/policy.zip in the repository
    episodes: int = 1
    unspent_reason: ClassVar[str | None] = (
        "a deterministic policy on a deterministic env: one episode (unless episodes > 1 samples "
        "more); repeating it retrains the same states")

    def __post_init__(self) -> None:
        check_int("episodes", self.episodes, 1)

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        check_budget(budget)   # before the policy loads
        model, meta = load_policy(self.policy_path or POLICY)
        check_compatible(model, meta, env)
        tracker = Tracker(env, budget, seed)
        space = tracker.space
        rng = np.random.default_rng(seed)  # own RNG: sampling must not touch torch's global one
        for episode in range(self.episodes):
            if tracker.remaining < 1:
                break
            obs, _ = env.unwrapped.load_state(tracker.root)
            path: list[dict[str, Any]] = []
            devs: list[float] = []
            while tracker.remaining >= 1:
                if episode == 0:
                    action, _ = model.predict(obs, deterministic=True)
                else:
                    action = _sample(model, obs, rng)
                hp = plain(space.decode(fit_action(action, space.nvec)))
                dev, done = tracker.step(path + [hp])
                path.append(hp)
                devs.append(dev)
                obs = tracker.last_obs
                if done:
                    break
            tracker.trials.append({"number": episode, "sampled": episode > 0,
                                   "schedule": path, "dev_scores": devs})
        result = tracker.result(self.name)
        result.cost.update(meta_cost(meta))
        return result


def _sample(model: Any, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action drawn from the policy's per-hyperparameter categorical distributions."""
    import torch

    with torch.no_grad():
        obs_t, _ = model.policy.obs_to_tensor(obs)
        dist = model.policy.get_distribution(obs_t)
    probs = [d.probs[0].double().numpy() for d in dist.distribution]
    return np.array([rng.choice(len(p), p=p / p.sum()) for p in probs], dtype=np.int64)
