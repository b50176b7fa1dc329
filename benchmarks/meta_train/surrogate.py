"""A surrogate of LLMZeroEnv for cheap meta-training: stage transitions fitted to real run logs.

A real env step trains one GRPO stage (seconds to minutes); PPO needs thousands of steps. The
surrogate learns, per task, how one stage moves the observation and the dev score, from stages the
real env logged (the leaderboard's HDF5 run log, or random episodes collected here with
``collect_random``), and replays that model as a Gymnasium env with the real env's observation
and action spaces, so a policy trained on it runs on the real env unchanged.

Model, per task: ridge least squares from (scaled observation, one-hot action, 1) to (the next
stage's nine training diagnostics, scaled to [0, 1], and the dev-score change). The ridge strength
is picked by k-fold cross-validation on the dev-score change (the strongest one when none beats
the mean on held-out stages); noise is a resampled out-of-fold
residual vector (so the surrogate is as unsure as its held-out error); divergence is a clipped
linear probability fitted on every stage, and ends the episode with dev score 0 as the real env.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
from gymnasium import spaces

from benchmarks.leaderboard import runlog
from benchmarks.leaderboard.runlog import RunRecord, StageRecorder
from metaenv import observation as obs_layout
from metaenv.env import FAILURE_PATHOLOGY
from metaenv.hparams import HParamSpace, InvalidAction

DEV = obs_layout.observation_names(()).index("dev_score")
N_TRAINED = DEV  # the stage's training diagnostics (reward ... grad norm) come before it
RIDGES = (0.01, 0.1, 1.0, 10.0, 100.0)
# Env arguments that change neither the dynamics nor the spaces: logs made with other values
# of these still describe the same env.
IRRELEVANT = ("test_size", "device", "max_stages", "seed", "render_mode", "max_states_in_memory",
              "state_dir")
COLLECTOR = "sb3-collect"  # controller name of the random episodes collect_random logs


@dataclass
class Transition:
    """One real stage: the observation before it, the action, what followed."""

    obs: np.ndarray
    action: np.ndarray  # grid indices
    next_obs: np.ndarray
    reward: float  # dev score change
    truncated: bool  # diverged or out of memory: the real env ends the episode with dev 0


# ---- run logs -> transitions -------------------------------------------------------------------


def dynamics_key(env_kwargs: dict[str, Any]) -> str:
    """What two runs' env arguments must share for their stages to describe the same env."""
    kept = {k: v for k, v in env_kwargs.items() if k not in IRRELEVANT}
    return json.dumps(kept, sort_keys=True, default=str)


def read_records(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Run records from leaderboard outputs: a folder (its runs/ or its *.h5), or one .h5 file.

    Read only: never runlog.load_runs, which deletes temp files a running leaderboard may own.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            runs = p / runlog.RUNS_DIR
            files += sorted((runs if runs.is_dir() else p).glob("*.h5"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no run log at {p}")
    records: dict[tuple, RunRecord] = {}
    for path in files:
        with h5py.File(path, "r") as f:
            recs = [runlog.read_run(f)] if "stages" in f else None
        if recs is None:  # a combined leaderboard.h5: one group per run
            recs = runlog.read_combined(path)
        for rec in recs:
            records[rec.key] = rec  # a run in both runs/ and leaderboard.h5 counts once
    return list(records.values())


def _truncated(pathologies: Sequence[str]) -> bool:
    return any(p in pathologies for p in FAILURE_PATHOLOGY.values())


def root_observation(space: HParamSpace, base_dev: float) -> np.ndarray:
    """The real env's observation after reset: no diagnostics, default hyperparameters."""
    return obs_layout.build_observation(None, base_dev, space.positions(space.defaults), 0.0)


def transitions_from_record(rec: RunRecord, space: HParamSpace, stages: int) -> list[Transition]:
    """Rebuild the (obs, action, next obs) of each logged stage, as the real env computed them.

    Controllers fork and restore states, so a stage's parent is not always the row before it: it
    is the latest earlier stage one level up whose dev score is the one this stage started from
    (dev - reward), or the base model for a first stage. Stages off this grid are skipped.
    """
    out: list[Transition] = []
    after: list[np.ndarray | None] = []  # observation after each row (None: unusable row)
    root = root_observation(space, rec.base_dev_score)
    for i, s in enumerate(rec.stages):
        after.append(None)
        try:
            action = space.encode({n: s.hparams[n] for n in space.names})
        except (KeyError, InvalidAction):
            continue
        dev_before = s.dev_score - s.reward
        if s.stage == 0:
            obs = root if math.isclose(dev_before, rec.base_dev_score, abs_tol=1e-9) else None
        else:
            obs = next((after[j] for j in range(i - 1, -1, -1)
                        if after[j] is not None and rec.stages[j].stage == s.stage - 1
                        and not _truncated(rec.stages[j].pathologies)
                        and math.isclose(rec.stages[j].dev_score, dev_before, abs_tol=1e-9)),
                       None)
        if obs is None:
            continue
        truncated = _truncated(s.pathologies)
        diag = obs_layout.stage_diagnostics(s.metrics, float(s.hparams["max_completion_length"]),
                                            s.dev_score, dev_before)
        if truncated:
            diag = obs_layout.failed(diag)
        nxt = obs_layout.build_observation(diag, s.dev_score, space.positions(s.hparams),
                                           (s.stage + 1) / stages)
        after[i] = nxt
        out.append(Transition(obs, action, nxt, float(s.reward), truncated))
    return out


# ---- collecting random episodes on the real env -----------------------------------------------


def collect_random(env: gym.Env, episodes: int, seed: int, env_id: str = "",
                   env_kwargs: dict[str, Any] | None = None,
                   env_seeds: Sequence[int] | None = None) -> RunRecord:
    """Random-action episodes on the real env, logged as a RunRecord (runlog.save_run saves it).

    Uniform actions cover every grid value evenly, which is what a one-hot regression needs.
    Episode i trains from env seed ``env_seeds[i % len(env_seeds)]`` (default: seed * 1000 + i),
    so the data is not one data order's luck; ``seed`` draws the actions. The env seeds are
    recorded in the settings (``env_seeds``): a policy must not be scored on them.
    """
    rec_env = StageRecorder(env)
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    started, before = time.time(), copy.copy(u.budget)  # the budget is cumulative
    best = -math.inf
    used = planned_env_seeds(episodes, seed, env_seeds)
    for env_seed in used:
        rec_env.reset(seed=env_seed)
        best = max(best, u.base_dev_score)
        done = False
        while not done:
            action = rng.integers(u.hparams.nvec)
            _, _, terminated, truncated, info = rec_env.step(action)
            best = max(best, info["dev_score"])
            done = terminated or truncated
    return RunRecord(
        task=u.task_name, controller=COLLECTOR, seed=seed, test_score=math.nan, dev_score=best,
        base_dev_score=float(u.base_dev_score), budget=u.budget.stages - before.stages,
        stages_spent=u.budget.stages - before.stages,
        tokens=float(u.budget.tokens - before.tokens),
        seconds=float(u.budget.seconds - before.seconds), wall_s=time.time() - started,
        started_at=started, finished_at=time.time(), stages=rec_env.stages,
        settings={"env_id": env_id, "env_kwargs": dict(env_kwargs or {}), "episodes": episodes,
                  "env_seeds": used})


def planned_env_seeds(episodes: int, seed: int, env_seeds: Sequence[int] | None) -> list[int]:
    """The env seed of each collected episode (see collect_random)."""
    if env_seeds is not None and not len(env_seeds):
        raise ValueError("env_seeds is empty: give at least one seed to collect episodes on")
    return [int(env_seeds[i % len(env_seeds)]) if env_seeds is not None else seed * 1000 + i
            for i in range(episodes)]


def record_env_seeds(rec: RunRecord) -> list[int]:
    """The env seeds a logged run trained from: a leaderboard run resets only to its own seed;
    a collection records its seeds (older ones used seed * 1000 + episode)."""
    if rec.controller != COLLECTOR:
        return [int(rec.seed)]
    seeds = rec.settings.get("env_seeds")
    if seeds is None:
        return planned_env_seeds(int(rec.settings.get("episodes", 0)), rec.seed, None)
    return [int(s) for s in seeds]


# ---- the model ----------------------------------------------------------------------------------


@dataclass
class SurrogateModel:
    """A fitted transition model of one task's env (plain arrays; saved with np.savez)."""

    task: str
    names: tuple[str, ...]
    nvec: np.ndarray
    stages: int
    root_obs: np.ndarray
    weights: np.ndarray  # (features, N_TRAINED + 1): scaled diagnostics, then the dev change
    residuals: np.ndarray  # out-of-fold residual vectors, resampled as noise
    div_weights: np.ndarray  # (features,) linear divergence probability; zeros when none seen
    ridge: float
    n_transitions: int
    cv_r2: float  # out-of-fold R^2 of the dev change (<= 0: no better than its mean)

    @property
    def observation_space(self) -> spaces.Box:
        return obs_layout.observation_space(len(self.names))

    def features(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Scaled observation, one-hot action, bias."""
        return _features(self.observation_space, self.nvec, obs[None], action[None])[0]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        d = {"task": np.array(self.task), "names": np.array(self.names), "nvec": self.nvec,
             "stages": np.array(self.stages), "root_obs": self.root_obs, "weights": self.weights,
             "residuals": self.residuals, "div_weights": self.div_weights,
             "ridge": np.array(self.ridge), "n_transitions": np.array(self.n_transitions),
             "cv_r2": np.array(self.cv_r2)}
        return {f"{prefix}/{k}": v for k, v in d.items()}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> SurrogateModel:
        a = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(prefix + "/")}
        return cls(task=str(a["task"]), names=tuple(str(n) for n in a["names"]),
                   nvec=a["nvec"].astype(np.int64), stages=int(a["stages"]),
                   root_obs=a["root_obs"].astype(np.float32), weights=a["weights"],
                   residuals=a["residuals"], div_weights=a["div_weights"],
                   ridge=float(a["ridge"]), n_transitions=int(a["n_transitions"]),
                   cv_r2=float(a["cv_r2"]))


def save_models(path: str | Path, models: dict[str, SurrogateModel]) -> None:
    """All tasks' models in one .npz."""
    arrays: dict[str, np.ndarray] = {}
    for task, m in models.items():
        arrays |= m.to_arrays(task)
    np.savez(path, **arrays)


def load_models(path: str | Path) -> dict[str, SurrogateModel]:
    with np.load(path) as arrays:
        tasks = sorted({k.split("/", 1)[0] for k in arrays.files})
        return {t: SurrogateModel.from_arrays(arrays, t) for t in tasks}


def _features(box: spaces.Box, nvec: np.ndarray, obs: np.ndarray,
              actions: np.ndarray) -> np.ndarray:
    scaled = (obs - box.low) / (box.high - box.low)  # kl and entropy span [0, 10]
    onehot = [np.eye(n)[actions[:, i]] for i, n in enumerate(nvec)]
    return np.concatenate([scaled, *onehot, np.ones((len(obs), 1))], axis=1)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    penalty = lam * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    return np.linalg.solve(x.T @ x + penalty, x.T @ y)


def _oof_residuals(x: np.ndarray, y: np.ndarray, lam: float, folds: int,
                   rng: np.random.Generator) -> np.ndarray:
    fold = rng.permutation(len(x)) % folds
    res = np.zeros_like(y)
    for k in range(folds):
        test = fold == k
        res[test] = y[test] - x[test] @ _ridge(x[~test], y[~test], lam)
    return res


def fit(transitions: Sequence[Transition], task: str, space: HParamSpace, stages: int,
        base_dev: float, folds: int = 5, seed: int = 0) -> SurrogateModel:
    """Fit one task's transition model (ridge strength by cross-validation)."""
    healthy = [t for t in transitions if not t.truncated]
    if len(healthy) < 3:
        raise ValueError(f"{task}: {len(healthy)} usable stages in the logs; the surrogate needs "
                         "at least 3 (collect more with --collect-episodes)")
    nvec = np.asarray(space.nvec, dtype=np.int64)
    box = obs_layout.observation_space(len(space.names))
    scale = box.high[:N_TRAINED] - box.low[:N_TRAINED]

    def design(ts: Sequence[Transition]) -> np.ndarray:
        return _features(box, nvec, np.stack([t.obs for t in ts]),
                         np.stack([t.action for t in ts]))

    x = design(healthy)
    y = np.column_stack([(np.stack([t.next_obs[:N_TRAINED] for t in healthy])
                          - box.low[:N_TRAINED]) / scale,
                         [t.reward for t in healthy]])
    folds = min(folds, len(healthy))
    oof = {lam: _oof_residuals(x, y, lam, folds, np.random.default_rng(seed)) for lam in RIDGES}
    lam = min(RIDGES, key=lambda k: float(np.mean(oof[k][:, -1] ** 2)))
    spread = float(np.sum((y[:, -1] - y[:, -1].mean()) ** 2))
    cv_r2 = 1.0 - float(np.sum(oof[lam][:, -1] ** 2)) / spread if spread > 0 else math.nan
    if not cv_r2 > 0:
        # No ridge predicts held-out dev changes better than their mean: the data cannot tell
        # actions apart, so shrink hardest rather than let PPO exploit an overfit extrapolation.
        lam = max(RIDGES)
        cv_r2 = 1.0 - float(np.sum(oof[lam][:, -1] ** 2)) / spread if spread > 0 else math.nan

    div = np.zeros(x.shape[1])
    if any(t.truncated for t in transitions):
        div = _ridge(design(transitions), np.array([float(t.truncated) for t in transitions]),
                     lam)
    return SurrogateModel(task=task, names=tuple(space.names), nvec=nvec, stages=int(stages),
                          root_obs=root_observation(space, base_dev), weights=_ridge(x, y, lam),
                          residuals=oof[lam], div_weights=div, ridge=lam,
                          n_transitions=len(transitions), cv_r2=cv_r2)


# ---- the env ------------------------------------------------------------------------------------


class SurrogateEnv(gym.Env):
    """The real env's spaces and episode structure, with stages drawn from a SurrogateModel."""

    metadata = {"render_modes": []}

    def __init__(self, model: SurrogateModel, noise: float = 1.0) -> None:
        self.model, self.noise = model, float(noise)
        self.observation_space = model.observation_space
        self.action_space = spaces.MultiDiscrete(model.nvec)
        self.stage, self.done = 0, True
        self._obs = model.root_obs.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.stage, self.done = 0, False
        self._obs = self.model.root_obs.copy()
        return self._obs.copy(), self._info(diverged=False)

    def step(self, action: Any):
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape != self.model.nvec.shape or np.any(a < 0) or np.any(a >= self.model.nvec):
            raise ValueError(f"action {np.asarray(action).tolist()} is outside "
                             f"MultiDiscrete({self.model.nvec.tolist()})")
        m, rng = self.model, self.np_random
        x = m.features(self._obs.astype(np.float64), a)
        y = x @ m.weights
        if self.noise > 0:
            y = y + self.noise * m.residuals[rng.integers(len(m.residuals))]
        diverged = rng.random() < float(np.clip(x @ m.div_weights, 0.0, 1.0))
        box = self.observation_space
        lo, hi = box.low[:N_TRAINED], box.high[:N_TRAINED]
        trained = lo + np.clip(y[:N_TRAINED], 0.0, 1.0) * (hi - lo)
        dev_before = float(self._obs[DEV])
        dev = 0.0 if diverged else float(np.clip(dev_before + y[-1], 0.0, 1.0))
        diag = {d[0]: float(v) for d, v in zip(obs_layout.DIAGNOSTICS, trained, strict=False)}
        diag.update(dev_score=dev, dev_delta=dev - dev_before)
        if diverged:
            diag = obs_layout.failed(diag)
        self.stage += 1
        position = a / np.maximum(m.nvec - 1, 1)
        self._obs = obs_layout.build_observation(diag, dev, position, self.stage / m.stages)
        terminated = not diverged and self.stage >= m.stages
        self.done = terminated or diverged
        return self._obs.copy(), dev - dev_before, terminated, bool(diverged), \
            self._info(diverged)

    def _info(self, diverged: bool) -> dict[str, Any]:
        return {"dev_score": float(self._obs[DEV]), "stage": self.stage, "diverged": diverged}
