"""metaenv: action grids, pathologies, rendering, the state store, and the env itself (tiny)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import inner.tasks as tasks
import metaenv
from inner.state import CorruptStateError
from inner.tasks.gsm8k import GSM8KTask
from metaenv import BudgetExhausted
from metaenv import observation as obs_layout
from metaenv.config import EnvConfig
from metaenv.env import LLMZeroEnv
from metaenv.hparams import InvalidAction, build_hparam_space, default_grids
from metaenv.pathologies import (
    DEV_PLATEAU,
    DIVERGENCE,
    ENTROPY_COLLAPSE,
    HIGH_TRUNCATION,
    KL_BLOWUP,
    ZERO_VARIANCE_GROUPS,
    detect_pathologies,
)
from metaenv.render import training_curves_png, training_curves_rgb
from metaenv.store import StateStore


@pytest.fixture(autouse=True)
def _one_thread():
    # These tiny models are per-op overhead bound: on the shared 2-core machine two OpenMP threads
    # spin against other processes and ran this file 7-14x slower (190-356 s vs 25 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REQUIRED = ("learning_rate", "beta", "temperature", "num_generations", "max_completion_length",
            "difficulty")


# ---------------------------------------------------------------- hyperparameter grids
@pytest.mark.parametrize("scale", ["embedded", "paper"])
@pytest.mark.parametrize("task", ["gsm8k", "math", "countdown", "logic"])
def test_default_grids_cover_required_names(task, scale):
    space, _ = build_hparam_space(task, scale, difficulty_levels=(1, 2, 3), default_difficulty=2)
    assert set(REQUIRED) <= set(space.names)
    assert "epsilon" not in space.names  # inert at num_iterations = 1, so not a default action
    assert space.defaults["difficulty"] == 2
    assert np.array_equal(space.nvec, [len(space.grids[n]) for n in space.names])
    assert space.decode(space.default_action()) == space.defaults


def test_encode_decode_round_trip_and_missing_keys():
    space, _ = build_hparam_space("gsm8k", difficulty_levels=(1, 2, 3), default_difficulty=1)
    a = space.encode({"learning_rate": 3e-5, "beta": 0.01, "temperature": 1.0})
    hp = space.decode(a)
    assert hp["learning_rate"] == 3e-5 and hp["beta"] == 0.01
    assert hp["num_generations"] == space.defaults["num_generations"]  # missing -> default
    from_base = space.decode(space.encode({"num_generations": 16}, base=hp))
    assert from_base == hp | {"num_generations": 16}
    # Extra names in the base (a full GRPOConfig dict, say) are ignored; missing ones are named.
    assert space.decode(space.encode({}, base=hp | {"top_p": 0.9})) == hp
    with pytest.raises(InvalidAction, match="base lacks.*'beta'"):
        space.encode({"learning_rate": 1e-4}, base={n: v for n, v in hp.items() if n != "beta"})
    # Floats made by arithmetic still match their grid value.
    assert space.decode(space.encode({"learning_rate": 0.1 * 3e-4}))["learning_rate"] == 3e-5


def test_encode_rejects_off_grid_and_unknown_names_unless_snapping():
    space, _ = build_hparam_space("math", difficulty_levels=(1, 2), default_difficulty=1)
    with pytest.raises(ValueError, match=r"learning_rate=0\.0002 .*allowed values"):
        space.encode({"learning_rate": 2e-4})
    with pytest.raises(ValueError, match="unknown hyperparameter 'lr'"):
        space.encode({"lr": 1e-4})
    assert space.decode(space.encode({"learning_rate": 2e-4}, snap=True))["learning_rate"] == 3e-4
    with pytest.raises(ValueError, match="temperature"):
        space.validate([0, 0, 7, 0, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        space.validate([0, 0])
    with pytest.raises(InvalidAction, match="beta"):
        space.validate(np.array([0, -1, 0, 0, 0, 0]))


def test_a_clip_range_on_the_grid_needs_more_than_one_update_per_batch():
    with pytest.raises(ValueError, match="epsilon is controlled but num_iterations is 1"):
        build_hparam_space("gsm8k", hparam_grid={"epsilon": [0.1, 0.2, 0.3]})
    for extra in ({"fixed_hparams": {"num_iterations": 2}},
                  {"hparam_grid": {"epsilon": [0.1, 0.3], "num_iterations": [1, 2]}}):
        grid = extra.get("hparam_grid", {"epsilon": [0.1, 0.2, 0.3]})
        space, _ = build_hparam_space("gsm8k", hparam_grid=grid,
                                      fixed_hparams=extra.get("fixed_hparams"))
        assert "epsilon" in space.names


def test_user_grid_overrides_and_fixed_values():
    space, fixed = build_hparam_space(
        "logic",
        hparam_grid={"num_generations": [2, 4], "loss_type": ["grpo", "dapo"], "epsilon": None},
        fixed_hparams={"prompts_per_step": 2},
        difficulty_levels=(1, 2),
        default_difficulty=1,
    )
    assert space.grids["num_generations"] == (2, 4)
    assert space.defaults["num_generations"] == 4  # nearest to the usual default 8
    assert "epsilon" not in space.names and space.defaults["loss_type"] == "grpo"
    assert fixed == {"prompts_per_step": 2}
    with pytest.raises(ValueError, match="unknown hyperparameter 'bogus'"):
        build_hparam_space("logic", hparam_grid={"bogus": [1]})
    with pytest.raises(ValueError, match="difficulty grid"):
        build_hparam_space("logic", hparam_grid={"difficulty": [9]}, difficulty_levels=(1, 2))
    assert default_grids("countdown", "embedded")["max_completion_length"] == (32, 48, 64, 80)
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        build_hparam_space("chess")
    with pytest.raises(ValueError, match="scale must be one of"):
        build_hparam_space("logic", "huge")


def test_a_task_registered_after_import_gets_its_gym_id_and_its_own_grids(monkeypatch):
    monkeypatch.setattr(tasks.base, "_REGISTRY", dict(tasks.base._REGISTRY))

    class ShortGSM8K(GSM8KTask):
        name, env_id = "gsm8k-short", "LLMZero-GSM8KShort-v0"
        completion_lengths = {"embedded": ((8, 24), 24), "paper": ((128, 256), 128)}

    try:
        tasks.register(ShortGSM8K)  # after `import metaenv`: its hook registers the gym id
        assert metaenv.env_ids()["gsm8k-short"] == "LLMZero-GSM8KShort-v0"
        assert gym.spec("LLMZero-GSM8KShort-v0").kwargs == {"task": "gsm8k-short"}
        for scale, (grid, default) in ShortGSM8K.completion_lengths.items():
            space, _ = build_hparam_space("gsm8k-short", scale)
            assert space.grids["max_completion_length"] == grid
            assert space.defaults["max_completion_length"] == default
    finally:
        gym.registry.pop("LLMZero-GSM8KShort-v0", None)


# ---------------------------------------------------------------- observation and pathologies
def _steps(n, **kw):
    base = {"reward": 0.5, "reward_std": 0.3, "kl": 0.01, "entropy": 1.5, "loss": 0.1,
            "clip_ratio/region_mean": 0.0, "completions/mean_length": 20.0,
            "completions/clipped_ratio": 0.1, "frac_reward_zero_std": 0.2, "grad_norm": 0.5}
    return [base | kw for _ in range(n)]


def test_observation_is_bounded_and_never_nan():
    space = obs_layout.observation_space(3)
    bad = _steps(2, kl=math.nan, entropy=math.inf, grad_norm=math.inf, reward=7.0)
    d = obs_layout.stage_diagnostics(bad, 48, dev_score=0.5, dev_before=0.2)
    o = obs_layout.build_observation(d, 0.5, np.array([0.0, 0.5, math.nan]), 1.0)
    assert o.dtype == np.float32 and o in space and not np.isnan(o).any()
    names = obs_layout.observation_names(["a", "b", "c"])
    assert len(names) == space.shape[0] == o.shape[0]
    assert o[names.index("kl")] == obs_layout.KL_MAX and o[names.index("reward")] == 1.0
    assert o[names.index("dev_delta")] == pytest.approx(0.3)
    assert obs_layout.build_observation(None, 0.25, np.zeros(3), 0.0)[names.index("dev_score")] \
        == 0.25


def test_pathologies_fire_on_their_thresholds_only():
    assert detect_pathologies(_steps(3), _steps(3), [0.1, 0.2]) == []
    assert detect_pathologies(_steps(3, entropy=0.01)) == [ENTROPY_COLLAPSE]
    assert ENTROPY_COLLAPSE in detect_pathologies(_steps(3, entropy=0.2), _steps(1, entropy=2.0))
    assert detect_pathologies(_steps(3, kl=3.0)) == [KL_BLOWUP]
    assert detect_pathologies(_steps(3, **{"completions/clipped_ratio": 0.9})) == [HIGH_TRUNCATION]
    assert detect_pathologies(_steps(3, frac_reward_zero_std=1.0)) == [ZERO_VARIANCE_GROUPS]
    # Without a dev size there is no noise margin: a plateau is two stages below the start.
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.29, 0.28]) == [DEV_PLATEAU]
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.3, 0.305]) == []
    # The plateau margin is one standard error of the dev score: 0.0625 at 64 items, 0.016 at 1024.
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.3, 0.35], dev_size=64) == [DEV_PLATEAU]
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.3, 0.35], dev_size=1024) == []
    assert detect_pathologies(_steps(2, grad_norm=math.inf)) == [DIVERGENCE]


def test_render_gives_an_rgb_image_and_png():
    hist = _steps(6)
    hist[2] = hist[2] | {"kl": math.nan}
    img = training_curves_rgb(hist, [3, 6], [0.1, 0.2, 0.3], "t")
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and img.std() > 0
    assert training_curves_png([], [], [0.1]).startswith(b"\x89PNG")


# ---------------------------------------------------------------- state store
def test_store_spills_to_disk_beyond_its_memory_bound(tmp_path):
    saved = []

    def save(payload, path):
        path.mkdir()
        (path / "x").write_text(str(payload))
        saved.append(payload)

    store = StateStore(2, save, lambda p: int((p / "x").read_text()), directory=str(tmp_path))
    keys = [store.put(i) for i in range(5)]
    assert store.num_in_memory == 2 and store.num_on_disk == 3 and saved == [0, 1, 2]
    assert [store.get(k) for k in keys] == [0, 1, 2, 3, 4]  # read back, LRU promotion
    assert store.num_in_memory == 2 and len(store) == 5
    store.drop(keys[0])
    assert keys[0] not in store and len(store) == 4
    store.close()
    assert len(store) == 0 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the env (tiny configuration)
# Two stages of one or two steps, 2 prompts x 2 generations of <= 8 tokens, 4 dev examples.
TINY = dict(
    stages=2,
    steps_per_stage=1,
    dev_size=4,
    test_size=4,
    eval_max_new_tokens=16,
    hparam_grid={"learning_rate": [1e-4, 1e-3], "num_generations": [2], "temperature": [1.0],
                 "max_completion_length": [4, 8], "beta": [0.0, 0.04]},
    fixed_hparams={"prompts_per_step": 2},
)


def make(env_id="LLMZero-GSM8K-v0", **overrides) -> gym.Env:
    return gym.make(env_id, **(TINY | overrides))


def _no_model_loads(monkeypatch):
    def refuse(self):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(LLMZeroEnv, "_load_base", refuse)


@pytest.mark.parametrize("kwargs, words", [
    ({"dev_size": 5000}, ["dev_size=5000", "'gsm8k'", "distinct problems", "or less"]),
    ({"hparam_grid": {"learning_rate": [1e-4, math.inf]}},
     ["hparam_grid['learning_rate']", "inf", "finite"]),
    ({"hparam_grid": {"beta": []}}, ["hparam_grid['beta']=[]", "non-empty list"]),
    ({"fixed_hparams": {"beta": math.nan}}, ["fixed_hparams['beta']", "nan", "finite"]),
    ({"eval_max_new_tokens": 0}, ["eval_max_new_tokens", ">= 1", "got 0"]),
    ({"eval_max_new_tokens": -3}, ["eval_max_new_tokens", ">= 1", "got -3"]),
    ({"stages": 2.7}, ["stages", "an int", "got 2.7"]),
    ({"stages": True}, ["stages", "not a float or a bool", "got True"]),
    ({"steps_per_stage": 0}, ["steps_per_stage", ">= 1", "got 0"]),
    ({"device": "tpu"}, ["device='tpu'", "not a torch device", "allowed: 'cpu'"]),
    ({"device": "cuda:99" if torch.cuda.is_available() else "cuda"},
     ["device='cuda", "not available", "allowed: 'cpu'"]),
    ({"difficulty": 9}, ["difficulty=9", "'gsm8k'", "allowed: [1, 2, 3, 4]"]),
    ({"dev_metric": "f1"}, ["dev_metric", "'f1'", "'accuracy'"]),
    ({"seed": -1}, ["seed", ">= 0", "got -1"]),
])
def test_a_bad_argument_is_named_before_any_model_loads(monkeypatch, kwargs, words):
    _no_model_loads(monkeypatch)
    with pytest.raises(ValueError) as caught:
        gym.make("LLMZero-GSM8K-v0", **kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_a_split_shorter_than_the_env_asks_is_an_error_not_a_smaller_split(monkeypatch, tmp_path):
    # Paper scale, a local file of 40 train rows: dev is carved from it (10 problems), and the
    # env's default dev_size (128) is under the task's own default (200), which only caps.
    _no_model_loads(monkeypatch)
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}.\n#### {2 * i}"}
            for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    with pytest.raises(tasks.SplitSizeError,
                       match=r"dev_size=128 is more than task 'gsm8k' holds at scale 'paper': "
                             r"10 distinct dev problems; pass dev_size=10 or less"):
        gym.make("LLMZero-GSM8K-v0", scale="paper", data_path=str(tmp_path))
    env = gym.make("LLMZero-GSM8K-v0", scale="paper", data_path=str(tmp_path), dev_size=10,
                   test_size=4)
    assert len(env.unwrapped.task.examples("dev")) == 10   # no model loaded: none was needed


def test_a_state_dir_that_cannot_be_created_is_named_at_construction(monkeypatch, tmp_path):
    _no_model_loads(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"state_dir=.*a-file/states.* cannot be created"):
        gym.make("LLMZero-GSM8K-v0", state_dir=str(blocker / "states"))
    made = tmp_path / "new" / "states"
    gym.make("LLMZero-GSM8K-v0", state_dir=str(made))
    assert made.is_dir()


def test_unknown_arguments_and_a_config_object():
    with pytest.raises(TypeError, match="unknown argument.*'stagez'.*'stages'"):
        gym.make("LLMZero-GSM8K-v0", stagez=3)
    env = LLMZeroEnv(config=EnvConfig(task="logic", stages=3))
    assert env.config.stages == env.stages == 3 and env.config.dev_size == 64  # scale default
    with pytest.raises(TypeError, match="either config"):
        LLMZeroEnv(config=EnvConfig(), stages=3)
    assert EnvConfig(model=Path("models") / "tiny").model == str(Path("models") / "tiny")
    with pytest.raises(ValueError, match="model must be a Hugging Face id or a local path"):
        EnvConfig(model="")


@pytest.mark.parametrize("env_id", list(metaenv.env_ids().values()))
def test_gymnasium_and_sb3_env_checkers_pass(env_id):
    env = make(env_id)
    assert isinstance(env.unwrapped, LLMZeroEnv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    checker_warnings = [str(w.message) for w in caught if "gymnasium" in w.filename
                        or "stable_baselines3" in w.filename]
    assert checker_warnings == []
    env.close()


def _rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append(obs)
    return out, info


def test_same_seed_same_observations():
    env_a, env_b = make(), make()
    space = env_a.unwrapped.hparams
    actions = [space.encode({"learning_rate": 1e-3}), space.encode({"max_completion_length": 4})]
    obs_a, info_a = _rollout(env_a, 7, actions)
    obs_b, info_b = _rollout(env_b, 7, actions)
    assert all(np.array_equal(x, y) for x, y in zip(obs_a, obs_b, strict=True))
    assert info_a["history"] == info_b["history"] and info_a["samples"] == info_b["samples"]
    # A cached reset replays the same episode without reloading the base model.
    calls = []
    original = env_a.unwrapped._load_base
    env_a.unwrapped._load_base = lambda: (calls.append(1), original())
    obs_c, _ = _rollout(env_a, 7, actions)
    assert calls == [] and all(np.array_equal(x, y) for x, y in zip(obs_a, obs_c, strict=True))
    # Another seed trains differently; coming back to seed 7 replays it exactly.
    obs_d, _ = _rollout(env_a, 8, actions)
    assert not all(np.array_equal(x, y) for x, y in zip(obs_a, obs_d, strict=True))
    obs_e, _ = _rollout(env_a, 7, actions)
    assert all(np.array_equal(x, y) for x, y in zip(obs_a, obs_e, strict=True))
    assert env_a.unwrapped.observation_names[0] == "reward"
    assert len(env_a.unwrapped.observation_names) == env_a.observation_space.shape[0]


def test_save_step_load_step_is_identical_and_budget_is_not_rewound():
    env = make(steps_per_stage=2)
    uenv = env.unwrapped
    env.reset(seed=1)
    state = uenv.save_state()
    a = uenv.hparams.encode({"learning_rate": 1e-3, "beta": 0.0})
    obs1, r1, _, _, info1 = env.step(a)
    obs_loaded, info_loaded = uenv.load_state(state)
    assert uenv.stage == 0 and info_loaded["history"] == [] and info_loaded["cost"]["stages"] == 0
    obs2, r2, _, _, info2 = env.step(a)
    assert np.array_equal(obs1, obs2) and r1 == r2
    assert info1["metrics"] == info2["metrics"] and info1["samples"] == info2["samples"]
    assert uenv.budget.stages == 2  # both stages were paid for
    assert uenv.current_hparams["learning_rate"] == 1e-3
    # The env, not the space, holds the episode's values: loading restores the state's.
    uenv.load_state(state)
    assert uenv.current_hparams == state.hparams == uenv.hparams.defaults
    assert uenv.hparams.decode(uenv.hparams.encode({}, base=uenv.current_hparams)) == state.hparams


def test_a_dict_of_values_trains_exactly_as_its_indices_do_and_keeps_left_out_names():
    env_a, env_b = make(), make()
    env_a.reset(seed=3)
    env_b.reset(seed=3)
    space = env_a.unwrapped.hparams
    values = {"learning_rate": 1e-3, "beta": 0.0}
    by_index = env_a.step(space.encode(values))
    # A float made by arithmetic trains as its grid value; the names left out keep their values.
    by_value = env_b.step({"learning_rate": 0.1 * 1e-2, "beta": 0.0})
    assert np.array_equal(by_index[0], by_value[0]) and by_index[1:4] == by_value[1:4]
    assert by_index[4]["metrics"] == by_value[4]["metrics"]
    assert by_index[4]["hparams"] == by_value[4]["hparams"]
    assert env_b.unwrapped.current_hparams == space.defaults | values
    env_b.step({"max_completion_length": 4})   # a partial stage: the last stage's lr and beta
    assert env_b.unwrapped.current_hparams == space.defaults | values | {
        "max_completion_length": 4}
    with pytest.raises(InvalidAction, match=r"learning_rate=0\.5 is not on the grid"):
        env_a.step({"learning_rate": 0.5})
    with pytest.raises(InvalidAction, match="unknown hyperparameter 'lr'"):
        env_a.step({"lr": 1e-3})
    assert env_a.unwrapped.budget.stages == 1  # rejected actions cost nothing


def test_neighbour_moves_along_the_grid_and_positions_place_values_on_it():
    space, _ = build_hparam_space("gsm8k", difficulty_levels=(1, 2, 3), default_difficulty=1)
    lrs = space.grids["learning_rate"]
    assert space.neighbour("learning_rate", lrs[1], 1) == lrs[2]
    assert space.neighbour("learning_rate", lrs[1], -1) == lrs[0]
    assert space.neighbour("learning_rate", lrs[0], -1) == lrs[0]   # clamped at the end
    assert space.neighbour("learning_rate", lrs[0], -1, clamp=False) is None
    assert space.neighbour("learning_rate", lrs[-1], 3, clamp=False) is None
    assert space.neighbour("learning_rate", 2e-4, 1) == 1e-3       # off-grid: snapped first
    assert space.complete({"learning_rate": 0.1 * 3e-4})["learning_rate"] == 3e-5
    top = {n: g[-1] for n, g in space.grids.items()}
    assert np.array_equal(space.positions(top), np.ones(len(space.names), np.float32))
    assert space.positions(space.defaults)[space.names.index("learning_rate")] == pytest.approx(
        lrs.index(space.defaults["learning_rate"]) / (len(lrs) - 1))


def test_invalid_action_names_the_parameter():
    env = make()
    env.reset(seed=0)
    names = env.unwrapped.hparams.names
    bad = np.zeros(len(names), dtype=np.int64)
    bad[names.index("learning_rate")] = 5
    with pytest.raises(ValueError, match="learning_rate"):
        env.step(bad)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(len(names) + 1, dtype=np.int64))
    with pytest.raises(ValueError, match="max_completion_length=9 is not on the grid"):
        env.unwrapped.hparams.encode({"max_completion_length": 9})
    assert env.unwrapped.budget.stages == 0  # rejected actions cost nothing


@pytest.mark.parametrize("where", ["inner.trainer.generate", "inner.trainer.Trainer.evaluate"])
def test_out_of_memory_in_training_or_dev_eval_truncates_as_out_of_memory(monkeypatch, where):
    env = make()
    env.reset(seed=0)
    stages_before = env.unwrapped.budget.stages

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12")

    monkeypatch.setattr(where, oom)
    obs, reward, terminated, truncated, info = env.step(env.unwrapped.hparams.default_action())
    assert truncated and not terminated
    assert info["failure"] == "out_of_memory"
    assert info["pathologies"][-1] == "out_of_memory" and "divergence" not in info["pathologies"]
    assert obs in env.observation_space and info["dev_score"] == 0.0
    assert env.unwrapped.budget.stages == stages_before + 1  # a failed stage is still paid for


def test_forced_divergence_truncates_with_a_named_pathology_and_reset_recovers():
    # AdamW's decoupled decay scales every weight by 1 - lr x weight_decay = -1e37: the weights'
    # norm overflows whatever the gradients are (a large lr alone moves nothing while every
    # group's advantages are 0, as they are for this tiny model).
    env = make(hparam_grid=TINY["hparam_grid"] | {"learning_rate": [1e-4, 1e30],
                                                  "weight_decay": [0.0, 1e7]})
    env.reset(seed=0)
    space = env.unwrapped.hparams
    obs, reward, terminated, truncated, info = env.step(
        space.encode({"learning_rate": 1e30, "weight_decay": 1e7}))
    assert truncated and not terminated
    assert "divergence" in info["pathologies"] and info["failure"] == "non_finite_weights"
    assert obs in env.observation_space and info["dev_score"] == 0.0
    assert reward == -info["base_dev_score"]
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(space.encode({"learning_rate": 1e-4}))
    env.reset(seed=0)
    obs, _, _, truncated, info = env.step(space.encode({"learning_rate": 1e-4}))
    assert not truncated and info["pathologies"].count("divergence") == 0
    assert np.isfinite(obs).all()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_does_not_grow_over_50_save_load_cycles():
    env = make()
    uenv = env.unwrapped
    env.reset(seed=0)
    env.step(uenv.hparams.encode({"learning_rate": 1e-3}))
    entries = len(uenv._store)
    for _ in range(5):  # warm up allocator pools
        uenv.load_state(uenv.save_state())
    rss = _rss_bytes()
    for _ in range(50):
        uenv.load_state(uenv.save_state())
    growth = _rss_bytes() - rss
    assert len(uenv._store) == entries  # every dropped handle freed its stored state
    state_bytes = sum(p.numel() * p.element_size() for p in uenv.trainer.model.parameters())
    # 50 leaked states would need 150x the weights (weights + two AdamW moments each).
    assert growth < max(3 * state_bytes, 4 << 20), f"RSS grew by {growth} bytes"


def test_states_spill_to_disk_beyond_the_memory_bound(tmp_path):
    env = make(max_states_in_memory=1, state_dir=str(tmp_path))
    uenv = env.unwrapped
    env.reset(seed=0)
    a = uenv.hparams.encode({"learning_rate": 1e-3})
    first = uenv.save_state()
    obs1 = env.step(a)[0]
    later = [uenv.save_state() for _ in range(3)]
    assert uenv._store.num_in_memory <= 1 and uenv._store.num_on_disk >= 3
    uenv.load_state(first)
    assert np.array_equal(env.step(a)[0], obs1)
    del later
    env.close()
    assert not any(tmp_path.iterdir())


def test_a_spilled_state_changed_on_disk_is_refused_naming_the_file(tmp_path):
    env = make(max_states_in_memory=0, state_dir=str(tmp_path))  # every state goes to disk
    uenv = env.unwrapped
    env.reset(seed=0)
    state = uenv.save_state()
    [weights] = tmp_path.glob(f"llmzero-states-*/state-{state.key}/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16  # NaNs in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match=rf"{weights} does not match the sha256"):
        uenv.load_state(state)
    env.close()


def test_budget_cannot_be_escaped_and_test_evals_are_counted_apart():
    env = make(max_stages=2)
    uenv = env.unwrapped
    env.reset(seed=0)
    root = uenv.save_state()
    a = uenv.hparams.default_action()
    env.step(a)
    uenv.load_state(root)
    env.step(a)
    for escape in (lambda: uenv.load_state(root), lambda: env.reset(seed=0)):
        escape()
        with pytest.raises(BudgetExhausted, match="2 stages"):
            env.step(a)
    assert uenv.last_test_correct == ()  # nothing scored on test yet
    score = uenv.evaluate_test()
    assert 0.0 <= score <= 1.0
    # Each test item's correctness, in order; the (accuracy) score is their mean.
    correct = uenv.last_test_correct
    assert len(correct) == uenv.test_size and all(isinstance(c, bool) for c in correct)
    assert score == pytest.approx(sum(correct) / len(correct))
    assert uenv.budget.stages == 2 and uenv.budget.test_evals == 1 and uenv.budget.seconds > 0


def test_token_budget_refuses_the_stage_after_it_is_spent_whatever_the_path():
    probe = make()
    probe.reset(seed=0)
    probe.step(probe.unwrapped.hparams.default_action())
    one_stage = probe.unwrapped.budget.tokens
    env = make(max_tokens=one_stage + 1)  # the second stage may start, and overshoots
    uenv = env.unwrapped
    env.reset(seed=0)
    root = uenv.save_state()
    a = uenv.hparams.default_action()
    env.step(a)
    assert uenv.budget.tokens == one_stage and uenv.budget.remaining_tokens == 1
    uenv.load_state(root)
    env.step(a)
    for escape in (lambda: uenv.load_state(root), lambda: env.reset(seed=0)):
        escape()
        with pytest.raises(BudgetExhausted, match=f"{one_stage + 1} tokens is spent"):
            env.step(a)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        make(max_tokens=0)


def test_kl_to_the_reference_is_measured_at_stage_end_even_without_a_kl_penalty():
    env = make(steps_per_stage=3)
    uenv = env.unwrapped
    env.reset(seed=0)
    # Move the policy off the reference, as training would (tiny groups may carry no signal).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in uenv.trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    _, _, _, _, info = env.step(uenv.hparams.encode({"beta": 0.0, "learning_rate": 1e-3}))
    steps = info["metrics"]
    # TRL omits kl at beta = 0; the stage's last step measures it on a subsample instead.
    assert ["kl" in m for m in steps] == [False, False, True] and steps[-1]["kl"] > 0
    _, _, _, _, info = env.step(uenv.hparams.encode({"beta": 0.04, "learning_rate": 1e-3}))
    assert all(m["kl"] > 0 for m in info["metrics"])  # with the penalty, every step has it


def test_render_returns_the_training_curves():
    env = make(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(env.unwrapped.hparams.default_action())
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert env.unwrapped.render_png().startswith(b"\x89PNG")


def test_the_episode_token_cap_ends_an_episode_and_prices_compute():
    tiny = dict(stages=4, steps_per_stage=1, dev_size=8, test_size=8)
    env = gym.make("LLMZero-GSM8K-v0", **tiny, episode_token_cap="default")
    u = env.unwrapped
    env.reset(seed=0)
    assert u.episode_token_cap == u.default_episode_tokens() > 0
    for _ in range(4):  # the default schedule runs its stages under its own cap
        _, _, terminated, truncated, info = env.step({})
    assert terminated and not truncated and info["episode_end"] == "stages"
    assert info["cost"]["tokens"] < u.episode_token_cap == info["episode_token_cap"]
    # Twice the group: a cap of three default stages' tokens buys two stages or fewer.
    per_stage = info["cost"]["tokens"] // 4
    capped = gym.make("LLMZero-GSM8K-v0", **tiny, episode_token_cap=3 * per_stage)
    capped.reset(seed=0)
    while not capped.unwrapped.done:
        end = capped.step({"num_generations": 16})[4]["episode_end"]
    assert end == "token_cap" and capped.unwrapped.stage <= 2
    with pytest.raises(RuntimeError, match="episode is over"):
        capped.step({})
    # and no cap, the default: the episode runs its stages whatever they cost
    free = gym.make("LLMZero-GSM8K-v0", **tiny)
    free.reset(seed=0)
    assert free.unwrapped.episode_token_cap is None
    assert [free.step({"num_generations": 16})[4]["episode_end"] for _ in range(4)][-1] == "stages"


@pytest.mark.parametrize("cap", ["lots", 0, -5, 2.5, True])
def test_a_bad_episode_token_cap_is_named(cap):
    with pytest.raises(ValueError, match="episode_token_cap must be 'default', None"):
        gym.make("LLMZero-GSM8K-v0", episode_token_cap=cap)


@pytest.mark.parametrize("dtype", ["fp16", "float32", None])
def test_a_bad_dtype_is_named(dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        gym.make("LLMZero-GSM8K-v0", dtype=dtype)
