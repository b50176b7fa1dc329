"""metaenv: action grids, pathologies, rendering, the state store, and the env itself (tiny)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metaenv import observation as obs_layout
from metaenv.hparams import DEFAULT_GRIDS, InvalidAction, build_hparam_space
from metaenv.pathologies import (
    DIVERGENCE,
    ENTROPY_COLLAPSE,
    HIGH_TRUNCATION,
    KL_BLOWUP,
    REWARD_PLATEAU,
    ZERO_VARIANCE_GROUPS,
    detect_pathologies,
)
from metaenv.render import training_curves_png, training_curves_rgb
from metaenv.store import StateStore

REQUIRED = ("learning_rate", "beta", "epsilon", "temperature", "num_generations",
            "max_completion_length", "difficulty")


# ---------------------------------------------------------------- hyperparameter grids
@pytest.mark.parametrize("scale", ["embedded", "paper"])
@pytest.mark.parametrize("task", ["gsm8k", "math", "countdown", "logic"])
def test_default_grids_cover_required_names(task, scale):
    space, _ = build_hparam_space(task, scale, difficulty_levels=(1, 2, 3), default_difficulty=2)
    assert set(REQUIRED) <= set(space.names)
    assert space.defaults["difficulty"] == 2
    assert np.array_equal(space.nvec, [len(space.grids[n]) for n in space.names])
    assert space.decode(space.default_action()) == space.defaults


def test_encode_decode_round_trip_and_missing_keys():
    space, _ = build_hparam_space("gsm8k", difficulty_levels=(1, 2, 3), default_difficulty=1)
    a = space.encode({"learning_rate": 3e-5, "beta": 0.01, "temperature": 1.0})
    hp = space.decode(a)
    assert hp["learning_rate"] == 3e-5 and hp["beta"] == 0.01
    assert hp["epsilon"] == space.defaults["epsilon"]  # missing -> current (= default here)
    space.current = dict(hp)
    assert space.decode(space.encode({"epsilon": 0.3}))["learning_rate"] == 3e-5
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
        space.validate([0, 0, 0, 7, 0, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        space.validate([0, 0])
    with pytest.raises(InvalidAction, match="beta"):
        space.validate(np.array([0, -1, 0, 0, 0, 0, 0]))


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
    assert "learning_rate" in DEFAULT_GRIDS["embedded"]["countdown"]


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
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.3, 0.305]) == [REWARD_PLATEAU]
    assert detect_pathologies(_steps(1), dev_scores=[0.3, 0.3, 0.35]) == []
    assert detect_pathologies([], diverged="divergence: non-finite loss") == [DIVERGENCE]


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
