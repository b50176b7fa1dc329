"""benchmarks.headroom: its declared schedule sets, the shared-prefix replay and the resume."""

from __future__ import annotations

import gymnasium as gym
import pytest

import metaenv  # noqa: F401  (registers the env ids)
from benchmarks import episodes, headroom, headroom_levels
from metaenv.hparams import build_hparam_space

TINY = dict(stages=3, steps_per_stage=1, dev_size=4, test_size=4, eval_max_new_tokens=16,
            fixed_hparams={"prompts_per_step": 2})


@pytest.mark.parametrize("task", ["gsm8k", "logic"])
def test_at_least_twelve_constant_and_twelve_adaptive_schedules_on_the_grid(task):
    space, _ = build_hparam_space(task, difficulty_levels=(1, 2, 3), default_difficulty=2)
    constant = headroom.constant_schedules(space, 8)
    adaptive = headroom.adaptive_schedules(space, 8)
    assert "default" in constant and len(constant) >= 12 and len(adaptive) >= 10  # + 2 searches
    for schedules, varying in ((constant, False), (adaptive, True)):
        for name, schedule in schedules.items():
            stages = episodes.full(space, schedule)  # every stage encodes: all values on the grid
            assert len(stages) == 8, name
            assert any(s != stages[0] for s in stages) == varying, name


def test_shared_prefixes_replay_exactly_and_a_rerun_resumes_from_the_log(tmp_path):
    env = gym.make("LLMZero-GSM8K-v0", **TINY)
    space = env.unwrapped.hparams
    lr_up = {"learning_rate": 1e-3}
    a = episodes.full(space, [{}, {}, {}])
    b = episodes.full(space, [{}, {}, lr_up])     # shares two stages with a
    c = episodes.full(space, [{}, lr_up, lr_up])  # shares one stage with both

    def score(e):
        return {"test": e.unwrapped.evaluate_test()}

    shared = episodes.Episodes(tmp_path / "shared.jsonl").run(env, "gsm8k", 3, [a, b, c], score)
    stages_shared = env.unwrapped.budget.stages
    alone = [episodes.Episodes(tmp_path / f"{i}.jsonl").run(env, "gsm8k", 3, [s], score)[0]
             for i, s in enumerate((a, b, c))]
    assert stages_shared == 3 + 1 + 2  # a whole, then b's and c's unshared stages
    for x, y in zip(shared, alone, strict=True):
        assert (x["dev_scores"], x["test"], x["tokens"]) == (y["dev_scores"], y["test"],
                                                             y["tokens"])
    assert shared[1]["dev_scores"][:3] == shared[0]["dev_scores"][:3]

    def no_training(*_):
        raise AssertionError("a logged episode was trained again")

    env.unwrapped.step = no_training
    again = episodes.Episodes(tmp_path / "shared.jsonl").run(env, "gsm8k", 3, [c, a], score)
    assert again == [shared[2], shared[0]]


def test_paired_gap_has_a_t_interval_and_fresh_test_seeds_are_enforced():
    gap = episodes.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    assert gap["mean"] == pytest.approx(0.1333, abs=1e-3) and gap["ci"][0] < 0.133 < gap["ci"][1]
    assert episodes.paired([0.5, 0.5], [0.4, 0.4])["ci"] == [pytest.approx(0.1)] * 2
    with pytest.raises(SystemExit, match="test seeds must be fresh"):
        headroom.main(["--selection-seeds", "1", "--test-seeds", "1", "2", "--out", "unused"])


def test_the_per_level_probe_holds_every_level_and_picks_each_familys_best_on_its_score():
    space, _ = build_hparam_space("math", difficulty_levels=(1, 2, 3, 4), default_difficulty=2)
    held = {"schedule": [{"learning_rate": 3e-4}] * 8}
    schedules = headroom_levels.level_schedules(space, 8, (1, 2, 3, 4),
                                                {"best_constant": held, "best_adaptive": held})
    levels_held = {s[0]["difficulty"] for n, (f, s) in schedules.items() if n.endswith("held")}
    assert levels_held == {1, 3, 4}
    for name, (family, schedule) in schedules.items():
        if name.startswith(("curriculum", "every")):
            assert family == "adaptive" and len({s["difficulty"] for s in schedule}) > 1, name
    assert [s["difficulty"] for s in schedules["every level, easiest first"][1]] == \
        [1, 1, 2, 2, 3, 3, 4, 4]
    table = {"c": {"family": "constant", "mixture": [0.2, 0.3], "levels": {1: [0.9, 0.9]}},
             "a": {"family": "adaptive", "mixture": [0.25, 0.35], "levels": {1: [0.5, 0.6]}},
             "a2": {"family": "adaptive", "mixture": [0.1, 0.1], "levels": {1: [0.95, 0.97]}}}
    gaps = headroom_levels._in_sample_gaps(table, (1,))
    assert gaps["mixture"]["adaptive"] == "a" and gaps["mixture"]["mean"] == pytest.approx(0.05)
    assert gaps["1"]["adaptive"] == "a2" and gaps["1"]["mean"] == pytest.approx(0.06)
