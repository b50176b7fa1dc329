"""The sb3 controller: a surrogate fitted to real stages, PPO learning on it, the policy run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import controllers
import metaenv  # noqa: F401  (registers the env ids)
from benchmarks.leaderboard import runlog
from benchmarks.meta_train import train as meta_train
from benchmarks.meta_train.surrogate import (
    RIDGES,
    SurrogateEnv,
    Transition,
    collect_random,
    fit,
    load_models,
    planned_env_seeds,
    read_records,
    record_env_seeds,
    transitions_from_record,
)
from controllers.base import RunResult
from controllers.sb3 import SB3, CommonActions
from inner.models import tiny_gpt2
from inner.sft import sft
from inner.tasks import get_task
from inner.tokenizer import build_char_tokenizer

ENV_ID = "LLMZero-GSM8K-v0"
EPISODES = 6  # random episodes logged from the real env: 12 stages, ~10 s
LOGGED_SEEDS = tuple(range(EPISODES))  # collect_random's default env seeds for seed 0
# Completion lengths fit the default problems' worked solutions (three two-digit terms: ~25
# characters), so that rewards vary within a group and the learning rate can matter at all.
GRID = {"learning_rate": [1e-3, 3e-2], "beta": [0.0, 0.04], "temperature": [1.0],
        "num_generations": [4], "max_completion_length": [32, 48],
        "difficulty": [2, 3, 4]}
TINY = {"stages": 2, "steps_per_stage": 1, "dev_size": 8, "test_size": 4,
        "eval_max_new_tokens": 48, "dev_metric": "mean_score",
        "fixed_hparams": {"prompts_per_step": 2}, "hparam_grid": GRID}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's tensors are tiny: on the shared 2-core machine one thread ran them ~3x
    faster than two contended ones (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A ~40k-parameter GPT-2 after 200 SFT steps: it writes '#### n' (dev mean score ~0.09);
    a stage at lr 3e-2 wrecks it, one at 1e-3 keeps it, so the action matters."""
    path = tmp_path_factory.mktemp("sft-tiny")
    tokenizer = build_char_tokenizer()
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=256, seed=0)
    pairs = [(e.prompt, e.solution) for e in get_task("gsm8k").examples("train")[:512]]
    sft(model, tokenizer, pairs, steps=200, lr=1e-2, batch_size=32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class ObservationLog(gym.Wrapper):
    """Keeps (obs, action, next obs) of every step as the real env returned them."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        return self.obs, info

    def step(self, action):
        obs, *rest = self.env.step(action)
        self.steps.append((self.obs, np.asarray(action), obs))
        self.obs = obs
        return obs, *rest


@pytest.fixture(scope="module")
def logged(model_dir, tmp_path_factory):
    """Random episodes on the tiny real env, saved as an HDF5 run log like the leaderboard's."""
    kwargs = {**TINY, "model": model_dir}
    env = ObservationLog(gym.make(ENV_ID, **kwargs))
    rec = collect_random(env, EPISODES, 0, ENV_ID, kwargs)
    out = tmp_path_factory.mktemp("logs")
    runlog.save_run(out, rec)
    yield {"dir": out, "env": env, "kwargs": kwargs, "n_logged": len(env.steps)}
    env.close()


def surrogate_of(logged):
    (rec,) = read_records([logged["dir"]])
    u = logged["env"].unwrapped
    return fit(transitions_from_record(rec, u.hparams, u.stages), "gsm8k", u.hparams, u.stages,
               rec.base_dev_score)


def test_logged_stages_rebuild_the_real_observations(logged):
    (rec,) = read_records([logged["dir"]])
    u = logged["env"].unwrapped
    transitions = transitions_from_record(rec, u.hparams, u.stages)
    truth = logged["env"].steps[: logged["n_logged"]]  # later tests step this env too
    assert len(rec.stages) == len(truth) == len(transitions) >= EPISODES
    for t, (obs, action, nxt) in zip(transitions, truth, strict=True):
        np.testing.assert_array_equal(t.action, action)
        np.testing.assert_allclose(t.obs, obs, atol=1e-6)
        np.testing.assert_allclose(t.next_obs, nxt, atol=1e-6)
        assert t.reward == pytest.approx(float(nxt[10]), abs=1e-6)  # the dev change


def test_a_forked_stage_continues_the_state_it_was_trained_from(logged):
    # Tree search and PBT restore states: rows of the log need not follow their parents.
    u = logged["env"].unwrapped
    hp = u.hparams.decode(u.hparams.default_action()) | {"max_completion_length": 32}
    metrics = [{"reward": 0.5, "kl": 0.1, "grad_norm": 1.0, "completions/mean_length": 8.0}]

    def row(stage: int, dev: float, reward: float, lr: float) -> runlog.StageRecord:
        return runlog.StageRecord(episode=0, stage=stage, hparams=hp | {"learning_rate": lr},
                                  dev_score=dev, reward=reward, metrics=metrics)

    rows = [row(0, 0.3, 0.2, 1e-3), row(0, 0.05, -0.05, 3e-2),  # two children of the root
            row(1, 0.4, 0.1, 3e-2),  # the child of the first (it started from dev 0.3)
            row(1, 0.9, 0.5, 1e-3)]  # started from dev 0.4 at depth 0: no such state, skipped
    rec = runlog.RunRecord(task="gsm8k", controller="x", seed=0, test_score=0.0, dev_score=0.4,
                           base_dev_score=0.1, budget=4, stages_spent=4, stages=rows)
    a, b, c = transitions_from_record(rec, u.hparams, u.stages)
    np.testing.assert_array_equal(a.obs, b.obs)  # both from the root
    np.testing.assert_array_equal(c.obs, a.next_obs)
    assert c.obs[9] == pytest.approx(0.3) and c.next_obs[9] == pytest.approx(0.4)
    assert c.obs[-1] == 0.5 and c.next_obs[-1] == 1.0  # progress


def test_surrogate_shrinks_hardest_when_the_logs_cannot_tell_actions_apart(logged):
    u = logged["env"].unwrapped
    rng = np.random.default_rng(0)
    root = logged["env"].steps[0][0]
    noise = [Transition(root, rng.integers(u.hparams.nvec), root, float(rng.normal(0, 0.1)), False)
             for _ in range(20)]
    model = fit(noise, "gsm8k", u.hparams, u.stages, float(root[9]))
    assert not model.cv_r2 > 0 and model.ridge == max(RIDGES)


def test_surrogate_env_has_the_real_spaces_and_passes_the_checkers(logged):
    model = surrogate_of(logged)
    real = logged["env"]
    env = SurrogateEnv(model)
    assert env.observation_space == real.observation_space
    assert env.action_space == real.action_space
    check_env(env, skip_render_check=True)
    sb3_check_env(env)
    obs, _ = env.reset(seed=0)
    start, total, steps, done = obs[9], 0.0, 0, False
    while not done:
        obs, r, terminated, truncated, info = env.step(env.action_space.sample())
        total, steps, done = total + r, steps + 1, terminated or truncated
        assert env.observation_space.contains(obs)
    assert steps <= real.unwrapped.stages
    assert total == pytest.approx(info["dev_score"] - start, abs=1e-6)  # return = final - base


def test_ppo_return_rises_above_random_on_the_surrogate(logged):
    model = surrogate_of(logged)
    vec = meta_train.make_vec_env([lambda: SurrogateEnv(model) for _ in range(4)])
    ppo = PPO("MlpPolicy", vec, seed=0, device="cpu", n_steps=64, batch_size=128,
              gamma=1.0, ent_coef=0.01, policy_kwargs={"net_arch": [64, 64]})
    ppo.learn(3000)
    env = SurrogateEnv(model)
    nvec = env.action_space.nvec
    trained = meta_train.evaluate(meta_train.policy_act(ppo, nvec), env, 200)
    uniform = meta_train.evaluate(meta_train.random_act(nvec), env, 200)
    # The same 200 seeded episodes for both; random actions pick the wrecking lr half the time.
    assert trained > uniform + 0.02, (trained, uniform)


@pytest.fixture(scope="module")
def policy(logged, tmp_path_factory):
    """A policy meta-trained by the CLI on the logged data (surrogate), as a user would."""
    out = tmp_path_factory.mktemp("sb3")
    extra = {k: v for k, v in logged["kwargs"].items()
             if k not in ("stages", "steps_per_stage", "dev_size", "test_size")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = meta_train.main([
            "--tasks", "gsm8k", "--logs", str(logged["dir"]), "--timesteps", "512",
            "--train-seeds", *map(str, LOGGED_SEEDS),
            "--stages", "2", "--steps-per-stage", "1", "--dev-size", "8", "--test-size", "4",
            "--env-kwargs", json.dumps(extra), "--eval-episodes", "10", "--out", str(out)])
    assert code == 0
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


def test_meta_train_cli_writes_policy_metadata_and_key_values(policy, logged):
    last = (policy / "stdout.txt").read_text().strip().splitlines()[-1]
    values = dict(item.split("=") for item in last.split())
    assert int(values["timesteps"]) >= 512 and float(values["wall_s"]) > 0
    assert int(values["real_stages"]) == 2 * EPISODES
    meta = json.loads((policy / "policy.json").read_text())
    assert (policy / "policy.zip").is_file()
    assert meta["trained_on"] == "surrogate" and meta["tasks"] == ["gsm8k"]
    assert meta["timesteps"] >= 512 and meta["wall_s"] > 0
    assert meta["real_stages"] == 2 * EPISODES  # every logged stage is paid for
    assert meta["logs"]["stages_by_controller"] == {"sb3-collect": 2 * EPISODES}
    assert meta["hparam_names"] == list(logged["env"].unwrapped.hparams.names)
    assert meta["train_seeds"] == list(LOGGED_SEEDS)  # the env seeds behind the logged stages
    models = load_models(policy / "surrogate.npz")
    assert models["gsm8k"].n_transitions == 2 * EPISODES


def test_meta_training_learns_only_from_its_training_seeds(logged, tmp_path):
    (rec,) = read_records([logged["dir"]])
    assert record_env_seeds(rec) == list(LOGGED_SEEDS)
    # Logs of other seeds are left out: here, all of them.
    extra = {k: v for k, v in logged["kwargs"].items()
             if k not in ("stages", "steps_per_stage", "dev_size", "test_size")}
    with pytest.raises(SystemExit, match="no logged stages for gsm8k"):
        meta_train.main(["--tasks", "gsm8k", "--logs", str(logged["dir"]), "--train-seeds",
                         "100", "--stages", "2", "--steps-per-stage", "1", "--dev-size", "8",
                         "--test-size", "4", "--env-kwargs", json.dumps(extra),
                         "--out", str(tmp_path)])
    assert meta_train.TRAIN_SEEDS == (100, 101, 102, 103, 104)  # never a leaderboard's 0-4
    assert planned_env_seeds(3, 0, [7, 9]) == [7, 9, 7]


def test_saved_policy_runs_as_a_controller_within_its_budget(policy, logged):
    env, path = logged["env"], str(policy / "policy.zip")
    assert controllers.REGISTRY["sb3"] is SB3
    runs = []
    for budget in (3, 1):
        before = env.unwrapped.budget.stages
        result = controllers.make("sb3", policy_path=path).run(env, budget, seed=0)
        spent = env.unwrapped.budget.stages - before
        assert isinstance(result, RunResult) and result.name == "sb3"
        assert spent <= budget and result.cost["stages"] == spent == min(budget, 2)
        assert len(result.schedule) <= spent
        for hp in result.schedule:
            env.unwrapped.hparams.encode(hp)  # every chosen stage is on the grid
        assert result.dev_score >= result.base_dev_score
        assert result.cost["meta_train_real_stages"] == 2 * EPISODES
        assert result.cost["meta_train_timesteps"] >= 512
        env.unwrapped.load_state(result.final_state)
        assert env.unwrapped.dev_score == result.dev_score
        runs.append(result)
    # Deterministic actions: the one-stage run is the first stage of the two-stage one.
    assert runs[1].trials[0]["schedule"] == runs[0].trials[0]["schedule"][:1]

    # Sampled episodes spend the rest of the budget, the env's counter decides.
    before = env.unwrapped.budget.stages
    result = SB3(policy_path=path, episodes=3).run(env, 5, seed=1)
    assert env.unwrapped.budget.stages - before == result.cost["stages"] == 5
    assert [t["sampled"] for t in result.trials] == [False, True, True]


def test_policy_for_another_action_space_is_refused(policy, logged, tmp_path):
    for name in ("policy.zip", "policy.json"):
        shutil.copy(policy / name, tmp_path / name)
    meta = json.loads((tmp_path / "policy.json").read_text())
    meta["hparam_names"] = meta["hparam_names"][:-1]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="controls"):
        SB3(policy_path=str(tmp_path / "policy.zip")).run(logged["env"], 2)
    with pytest.raises(FileNotFoundError, match="meta_train"):
        SB3(policy_path=str(tmp_path / "missing.zip")).run(logged["env"], 2)


def test_common_action_space_clips_to_each_tasks_grid(logged):
    env = CommonActions(logged["env"], logged["env"].action_space.nvec + 1)
    assert np.all(env.action_space.nvec == logged["env"].action_space.nvec + 1)
    np.testing.assert_array_equal(env.action(env.action_space.nvec - 1),
                                  logged["env"].action_space.nvec - 1)
    with pytest.raises(ValueError, match="cover"):
        CommonActions(logged["env"], logged["env"].action_space.nvec - 1)


def test_meta_train_on_the_real_env(model_dir, tmp_path):
    extra = {k: v for k, v in TINY.items()
             if k not in ("stages", "steps_per_stage", "dev_size", "test_size")}
    code = meta_train.main([
        "--real", "--tasks", "gsm8k", "--timesteps", "4", "--envs-per-task", "1",
        "--n-steps", "2", "--stages", "2", "--steps-per-stage", "1", "--dev-size", "8",
        "--test-size", "4", "--env-kwargs", json.dumps({**extra, "model": model_dir}),
        "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    meta = json.loads((tmp_path / "policy.json").read_text())
    assert meta["trained_on"] == "real" and meta["timesteps"] == meta["real_stages"] == 4
    assert meta["train_seeds"] == list(meta_train.TRAIN_SEEDS)


def test_seed_cycle_resets_only_to_the_training_seeds(logged):
    seen = []

    class Spy(gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            seen.append(seed)
            return self.env.reset(seed=seed, options=options)

    env = meta_train.SeedCycle(Spy(logged["env"]), [100, 101], start=1)
    for s in (0, None, 5):
        env.reset(seed=s)
    assert seen == [101, 100, 101]
