"""Meta-train the ``sb3`` controller: PPO over several tasks and seeds, on surrogates or real envs.

    python -m benchmarks.meta_train --collect-episodes 10  # surrogate from 10 random real
                                                            # episodes per task (+ any logs)
    python -m benchmarks.meta_train --logs results/standard-train  # from leaderboard logs
    python -m benchmarks.meta_train --real --timesteps 64  # PPO on the real embedded envs (slow)

By default the policy is trained on surrogate envs (``surrogate``) fitted per task to
real stages: those of the leaderboard's HDF5 logs (``--logs``) made with the same env settings,
and random episodes collected here (saved under ``<out>/data`` and reused by a rerun). Every real
stage behind the data counts in the policy's cost. The env settings default to the leaderboard's
standard preset (``--preset``), so the policy sees the episodes it is evaluated on, but never
their seeds: it learns only from env seeds in ``--train-seeds`` (default 100-104; the
leaderboard evaluates on 0-4 and replays on 1000-1004). Collected episodes train from them,
logged runs of other seeds are left out, and ``policy.json`` records the seeds used
(``train_seeds``), which the leaderboard checks. ``wall_s`` is the whole pipeline's time, reused
collections included. Writes ``<out>/policy.zip``, ``<out>/policy.json`` (what it was trained on
and what that cost) and ``<out>/surrogate.npz``; the last line of output is
``timesteps=<n> wall_s=<x> real_stages=<n> ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from benchmarks.leaderboard import runlog
from benchmarks.leaderboard.harness import PRESETS, TASKS
from benchmarks.meta_train.surrogate import (
    COLLECTOR,
    SurrogateEnv,
    SurrogateModel,
    collect_random,
    dynamics_key,
    fit,
    planned_env_seeds,
    read_records,
    record_env_seeds,
    save_models,
    transitions_from_record,
)
from controllers.sb3 import CommonActions, fit_action
from metaenv import LLMZeroEnv, env_ids

SKIP_CONTROLLERS = ("base", "sb3")  # no stages; and never learn from the policy's own runs
# Env seeds the policy may learn from: disjoint from every preset's evaluation seeds (0-4) and
# the standard preset's replay seeds (1000-1004).
TRAIN_SEEDS = (100, 101, 102, 103, 104)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.meta_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--logs", nargs="*", default=None, metavar="PATH",
                   help="leaderboard outputs (a folder or .h5) to fit the surrogate to "
                        "(default: results/ when it exists)")
    p.add_argument("--collect-episodes", type=int, default=0, metavar="N",
                   help="random real-env episodes per task to add to the surrogate's data")
    p.add_argument("--real", action="store_true",
                   help="train PPO on the real envs instead of surrogates (every step a stage)")
    p.add_argument("--timesteps", type=int, default=None,
                   help="PPO env steps (default: 20000 on surrogates, 8 per env on real envs)")
    p.add_argument("--envs-per-task", type=int, default=2,
                   help="vectorised envs per task, each with its own seed")
    p.add_argument("--n-steps", type=int, default=None,
                   help="PPO rollout steps per env (default: 32 episodes' worth on surrogates, "
                        "one episode on real envs)")
    p.add_argument("--seed", type=int, default=0, help="PPO's seed and the random actions'")
    p.add_argument("--train-seeds", nargs="+", type=int, default=list(TRAIN_SEEDS),
                   metavar="SEED",
                   help="env seeds to learn from (collected episodes train from them; logged "
                        "runs of other seeds are left out); never a leaderboard's evaluation "
                        f"seeds (default: {' '.join(map(str, TRAIN_SEEDS))})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="the leaderboard preset whose env settings the policy is trained for")
    p.add_argument("--stages", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps-per-stage", type=int, default=None, help="default: the preset's")
    p.add_argument("--dev-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--test-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--env-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="more LLMZeroEnv arguments, as the leaderboard's --env-kwargs")
    p.add_argument("--eval-episodes", type=int, default=200,
                   help="surrogate episodes per task to compare the policy with random actions")
    p.add_argument("--out", default="results/sb3")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    for name in ("stages", "steps_per_stage", "dev_size", "test_size"):
        if getattr(a, name) is None:
            setattr(a, name, getattr(preset, name))
    return a


def env_kwargs_of(a: argparse.Namespace) -> dict[str, Any]:
    """The env arguments the policy is trained for, spelled as the leaderboard records them."""
    return {**a.env_kwargs, "stages": a.stages, "steps_per_stage": a.steps_per_stage,
            "dev_size": a.dev_size, "test_size": a.test_size,
            "device": a.env_kwargs.get("device", "cpu")}


def ppo_settings(a: argparse.Namespace, n_envs: int) -> dict[str, Any]:
    """PPO hyperparameters; episodes are only `stages` steps long, so rollouts hold many."""
    n_steps = a.n_steps or (a.stages if a.real else 32 * a.stages)
    return {"n_steps": n_steps, "batch_size": min(128, n_steps * n_envs), "n_epochs": 10,
            "learning_rate": 3e-4, "gamma": 1.0,  # the return is final dev - base dev
            "gae_lambda": 0.95, "ent_coef": 0.01, "clip_range": 0.2,
            "policy_kwargs": {"net_arch": [64, 64]}}


# ---- data ---------------------------------------------------------------------------------------


def gather_records(a: argparse.Namespace, env_kwargs: dict[str, Any],
                   out: Path) -> tuple[list[runlog.RunRecord], dict[str, Any]]:
    """Runs made with these env settings: the given logs, then random episodes (new or reused)."""
    key = dynamics_key(env_kwargs)
    paths = a.logs if a.logs is not None else (["results"] if Path("results").is_dir() else [])
    found = read_records(paths) if paths else []
    allowed = set(a.train_seeds)
    used = [r for r in found if r.task in a.tasks and r.controller not in SKIP_CONTROLLERS
            and dynamics_key(r.settings.get("env_kwargs", {})) == key
            and set(record_env_seeds(r)) <= allowed]
    collected_new, reused_wall = 0, 0.0
    if a.collect_episodes > 0:
        data = out / "data"
        saved = {r.key: r for r in read_records([data])} if (data / runlog.RUNS_DIR).is_dir() \
            else {}
        planned = planned_env_seeds(a.collect_episodes, a.seed, a.train_seeds)
        for task in a.tasks:
            old = saved.get((task, COLLECTOR, a.seed))
            if (old is not None and dynamics_key(old.settings.get("env_kwargs", {})) == key
                    and old.settings.get("env_seeds") == planned):
                used.append(old)  # collected by an earlier run with these settings: reuse it
                reused_wall += old.wall_s
                continue
            env = gym.make(env_ids()[task], **env_kwargs)
            rec = collect_random(env, a.collect_episodes, a.seed, env_ids()[task], env_kwargs,
                                 env_seeds=a.train_seeds)
            env.close()
            runlog.save_run(data, rec)
            collected_new += len(rec.stages)
            used.append(rec)
            print(f"collected {task}: {len(rec.stages)} stages in {rec.wall_s:.0f}s "
                  f"(base dev {rec.base_dev_score:.3f}, best dev {rec.dev_score:.3f})", flush=True)
    by_ctrl = Counter()
    for r in used:
        by_ctrl[r.controller] += len(r.stages)
    info = {"paths": [str(p) for p in paths], "runs_found": len(found), "runs_used": len(used),
            "stages_by_controller": dict(by_ctrl), "collected_stages": collected_new,
            "reused_collection_wall_s": round(reused_wall, 1),
            "env_seeds": sorted({s for r in used for s in record_env_seeds(r)})}
    return used, info


def fit_surrogates(records: list[runlog.RunRecord], spaces_: dict[str, LLMZeroEnv],
                   seed: int) -> dict[str, SurrogateModel]:
    """One SurrogateModel per task from the stages of its runs."""
    models = {}
    for task, env in spaces_.items():
        mine = [r for r in records if r.task == task]
        if not mine:
            raise SystemExit(f"no logged stages for {task} with these env settings; add "
                             "--collect-episodes N or --logs PATH")
        transitions = [t for r in mine
                       for t in transitions_from_record(r, env.hparams, env.stages)]
        models[task] = fit(transitions, task, env.hparams, env.stages,
                           base_dev=mine[0].base_dev_score, seed=seed)
    return models


# ---- envs and evaluation ------------------------------------------------------------------------


def make_vec_env(thunks: list[Callable[[], gym.Env]]) -> Any:
    """A DummyVecEnv of Monitor-wrapped envs (episode returns for SB3's logs)."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    return DummyVecEnv([lambda t=t: Monitor(t()) for t in thunks])


def evaluate(act: Callable[[np.ndarray, np.random.Generator], np.ndarray], env: gym.Env,
             episodes: int, seed: int = 10_000) -> float:
    """Mean return of ``act(obs, rng)`` over seeded episodes of ``env``."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        rng = np.random.default_rng(seed + i)
        total, done = 0.0, False
        while not done:
            obs, r, terminated, truncated, _ = env.step(act(obs, rng))
            total += r
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def policy_act(model: Any, nvec: np.ndarray) -> Callable[[np.ndarray, np.random.Generator],
                                                         np.ndarray]:
    """The policy's deterministic action, clipped to a task's grids."""
    return lambda obs, rng: fit_action(model.predict(obs, deterministic=True)[0], nvec)


def random_act(nvec: np.ndarray) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Uniform random grid indices."""
    return lambda obs, rng: rng.integers(nvec)


# ---- main ---------------------------------------------------------------------------------------


@dataclass
class TrainingEnvs:
    """What PPO trains on in one mode (real envs, or surrogates fitted to logged stages)."""

    thunks: list[Callable[[], gym.Env]]
    models: dict[str, SurrogateModel] = field(default_factory=dict)  # surrogate mode only
    records: list[runlog.RunRecord] = field(default_factory=list)  # the stages behind them
    logs: dict[str, Any] = field(default_factory=dict)
    surrogate: dict[str, Any] = field(default_factory=dict)  # per-task fit summary


class SeedCycle(gym.Wrapper):
    """Resets to the next of ``seeds`` in turn, whatever seed the caller asks for: PPO's vector
    env reseeds its own way, and the policy must learn only from its training seeds."""

    def __init__(self, env: gym.Env, seeds: list[int], start: int = 0) -> None:
        super().__init__(env)
        self.seeds, self.next = list(seeds), start

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        seed, self.next = self.seeds[self.next % len(self.seeds)], self.next + 1
        return self.env.reset(seed=seed, options=options)


def real_envs(a: argparse.Namespace, env_kwargs: dict[str, Any], common: np.ndarray
              ) -> TrainingEnvs:
    thunks = [lambda t=t, i=i: CommonActions(SeedCycle(gym.make(env_ids()[t], **env_kwargs),
                                                       a.train_seeds, start=i), common)
              for t in a.tasks for i in range(a.envs_per_task)]
    return TrainingEnvs(thunks, logs={"env_seeds": sorted(set(a.train_seeds))})


def surrogate_envs(a: argparse.Namespace, env_kwargs: dict[str, Any],
                   spaces_: dict[str, LLMZeroEnv], common: np.ndarray, out: Path) -> TrainingEnvs:
    """Fit one surrogate per task to the logged (and collected) stages, and save them."""
    records, logs = gather_records(a, env_kwargs, out)
    models = fit_surrogates(records, spaces_, a.seed)
    save_models(out / "surrogate.npz", models)
    for t, m in models.items():
        print(f"surrogate {t}: {m.n_transitions} transitions, ridge {m.ridge}, "
              f"out-of-fold R2 of the dev change {m.cv_r2:.2f}", flush=True)
    # null, not NaN, in the JSON: an R2 is undefined when every logged dev change is equal.
    surrogate = {t: {"transitions": m.n_transitions, "ridge": m.ridge,
                     "cv_r2_dev_delta": m.cv_r2 if math.isfinite(m.cv_r2) else None}
                 for t, m in models.items()}
    thunks = [lambda t=t: CommonActions(SurrogateEnv(models[t]), common)
              for t in a.tasks for _ in range(a.envs_per_task)]
    return TrainingEnvs(thunks, models, records, logs, surrogate)


def real_cost(a: argparse.Namespace, vec: Any, envs: TrainingEnvs) -> tuple[int, float]:
    """Real stages (and their seconds) behind the policy: trained now, or logged."""
    if a.real:
        budgets = [e.unwrapped.budget for e in vec.envs]
        return int(sum(b.stages for b in budgets)), float(sum(b.seconds for b in budgets))
    stages = [s for r in envs.records for s in r.stages]
    return len(stages), float(np.nansum([s.seconds for s in stages]))


def evaluate_on_surrogates(a: argparse.Namespace, model: Any,
                           models: dict[str, SurrogateModel]) -> dict[str, Any]:
    """Mean surrogate return of the policy and of uniform random actions, per task."""
    ppo_r, rand_r = [], []
    for t in a.tasks:
        env = SurrogateEnv(models[t])
        ppo_r.append(evaluate(policy_act(model, env.action_space.nvec), env, a.eval_episodes))
        rand_r.append(evaluate(random_act(env.action_space.nvec), env, a.eval_episodes))
    return {"episodes_per_task": a.eval_episodes,
            "surrogate_return_ppo": float(np.mean(ppo_r)),
            "surrogate_return_random": float(np.mean(rand_r)),
            "by_task": {t: {"ppo": p, "random": r}
                        for t, p, r in zip(a.tasks, ppo_r, rand_r, strict=True)}}


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    a = parse_args(argv)
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env_kwargs = env_kwargs_of(a)
    # Built without reset: grids, spaces and episode length, no model loaded.
    spaces_ = {t: LLMZeroEnv(task=t, **env_kwargs) for t in a.tasks}
    names = {tuple(e.hparams.names) for e in spaces_.values()}
    if len(names) != 1:
        raise SystemExit(f"the tasks control different hyperparameters {sorted(names)}; "
                         "one policy needs one action layout")
    common = np.max([e.hparams.nvec for e in spaces_.values()], axis=0)
    envs = (real_envs(a, env_kwargs, common) if a.real
            else surrogate_envs(a, env_kwargs, spaces_, common, out))

    vec = make_vec_env(envs.thunks)
    settings = ppo_settings(a, len(envs.thunks))
    timesteps = a.timesteps or (8 * len(envs.thunks) if a.real else 20_000)
    if not a.real:
        # A 64x64 MLP gains nothing from threads, and on a busy 2-core machine two threads ran
        # PPO 10x slower than one (measured); real envs keep theirs for GRPO.
        torch.set_num_threads(1)
    t_ppo = time.time()
    model = PPO("MlpPolicy", vec, seed=a.seed, device="cpu", verbose=0, **settings)
    model.learn(total_timesteps=timesteps)
    ppo_wall = time.time() - t_ppo
    real_stages, real_seconds = real_cost(a, vec, envs)
    vec.close()
    evaluation = (evaluate_on_surrogates(a, model, envs.models)
                  if not a.real and a.eval_episodes > 0 else {})

    policy_path = out / "policy.zip"
    model.save(policy_path)
    # The pipeline's whole cost: random episodes an earlier run collected count as if run now.
    wall = time.time() - t0 + envs.logs.get("reused_collection_wall_s", 0.0)
    meta = {
        "policy": policy_path.name,
        "trained_on": "real" if a.real else "surrogate",
        "tasks": list(a.tasks),
        "envs_per_task": a.envs_per_task,
        "env_kwargs": env_kwargs,
        "hparam_names": list(next(iter(names))),
        "nvec": {t: e.hparams.nvec.tolist() for t, e in spaces_.items()},
        "policy_nvec": common.tolist(),
        "timesteps": int(model.num_timesteps),
        "wall_s": round(wall, 1),
        "ppo_wall_s": round(ppo_wall, 1),
        "real_stages": real_stages,
        "real_stage_seconds": round(real_seconds, 1),
        "logs": envs.logs,
        "surrogate": envs.surrogate,
        "ppo": settings,
        "seed": a.seed,
        # The env seeds behind every real stage the policy learned from; the leaderboard leaves
        # sb3 out where they meet its evaluation seeds.
        "train_seeds": envs.logs["env_seeds"],
        "eval": evaluation,
        "command": shlex.join(["python", "-m", "benchmarks.meta_train",
                               *(sys.argv[1:] if argv is None else argv)]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    write_policy_card(out, meta, evaluation, model.num_timesteps)
    return 0


def _versions() -> dict[str, str]:
    import stable_baselines3
    import torch

    return {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__,
            "gymnasium": gym.__version__}


def write_policy_card(out: Path, meta: dict[str, Any], evaluation: dict[str, Any],
                      timesteps: int) -> None:
    """policy.json beside policy.zip, then the machine-readable last line."""
    (out / "policy.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out / meta['policy']} and {out / 'policy.json'}")
    tail = ""
    if evaluation:
        tail = (f" surrogate_return_ppo={evaluation['surrogate_return_ppo']:.4f}"
                f" surrogate_return_random={evaluation['surrogate_return_random']:.4f}")
    print(f"timesteps={timesteps} wall_s={meta['wall_s']:.1f} real_stages={meta['real_stages']} "
          f"tasks={len(meta['tasks'])} trained_on={meta['trained_on']}{tail}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
