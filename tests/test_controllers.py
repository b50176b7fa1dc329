"""Controllers on the real env, tiny: budgets, results, determinism, resume, PBT copies."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import optuna
import pytest
import torch

import controllers
import metaenv  # noqa: F401  (registers the env ids)
from controllers.base import ENDED, LLM_COST_KEYS, RunResult, Tracker
from controllers.llm_prompt import build_prompt, system_prompt
from controllers.pbt import Member, exploit
from controllers.proposers import Context
from controllers.skills import Skill, SkillLibrary, StateSummary, flagged, moves, propose
from inner.models import tiny_gpt2
from inner.sft import sft
from inner.tasks import get_task
from inner.tokenizer import build_char_tokenizer
from metaenv import pathologies as P
from metaenv.hparams import build_hparam_space

STAGES = 2
# 2 prompts x 4 generations of <= 24 chars, 8 dev examples, 1 step a stage: ~0.2 s a stage.
# lr 3e-2 wrecks the model and 1e-3 helps it, so dev scores differ between schedules.
GRID = {"learning_rate": [1e-3, 3e-2], "beta": [0.0, 0.04], "temperature": [1.0],
        "num_generations": [4], "max_completion_length": [16, 24]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A ~40k-parameter GPT-2 with 80 SFT steps: it writes '#### n', so mean scores move."""
    path = tmp_path_factory.mktemp("sft-tiny")
    tokenizer = build_char_tokenizer()
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=256, seed=0)
    pairs = [(e.prompt, e.solution) for e in get_task("gsm8k").examples("train")[:512]]
    sft(model, tokenizer, pairs, steps=80, lr=3e-3, batch_size=32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_env(model_dir: str) -> gym.Env:
    """A fresh env (a new process would build one); most tests share the module's ``env``."""
    return gym.make("LLMZero-GSM8K-v0", model=model_dir, stages=STAGES, steps_per_stage=1,
                    dev_size=8, test_size=4, eval_max_new_tokens=24, dev_metric="mean_score",
                    fixed_hparams={"prompts_per_step": 2}, hparam_grid=GRID)


@pytest.fixture(scope="module")
def env(model_dir):
    """One env for the module: every controller resets it, as the harness reuses an env."""
    env = make_env(model_dir)
    yield env
    env.close()


def stages_of(env: gym.Env) -> int:
    return env.unwrapped.budget.stages


class Recorder(gym.Wrapper):
    """The env, keeping (dev score, the episode ended there) of every stage a controller trains."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.stages: list[tuple[float, bool]] = []

    def step(self, action):
        out = self.env.step(action)
        self.stages.append((out[4]["dev_score"], out[4]["episode_end"] in ENDED))
        return out


def check_result(env: Recorder, result: RunResult, budget: int, spent: int) -> None:
    space = env.unwrapped.hparams
    assert isinstance(result, RunResult)
    assert spent <= budget and result.cost["stages"] == spent
    assert set(result.cost) >= {"stages", "tokens", "seconds", *LLM_COST_KEYS}
    assert len(result.schedule) <= STAGES
    for hp in result.schedule:
        space.encode(hp)  # every stage of the chosen path is on the grid
    # The one selection rule: the best dev score among the states whose episode ended; only
    # where none ended, the best state at any depth, the root included, and the run says so.
    ended = [dev for dev, end in env.stages if end]
    if ended:
        assert not result.select_fallback and result.dev_score == max(ended)
        assert len(result.schedule) == STAGES
    else:
        assert result.select_fallback
        assert result.dev_score == max([result.base_dev_score] + [d for d, _ in env.stages])
    # The anytime curve ends at the chosen state's score; the env is left loaded with it and the
    # harness can load it again and test it.
    xs, ys = zip(*result.anytime, strict=True)
    assert xs[0] == 0 and list(xs) == sorted(xs) and xs[-1] == spent
    assert ys[-1] == result.dev_score
    assert env.unwrapped.dev_score == result.dev_score
    env.unwrapped.load_state(result.final_state)
    assert env.unwrapped.dev_score == result.dev_score
    assert env.unwrapped.stage == len(result.schedule)


# Exact spends for budget 5 with 2-stage episodes, as each controller documents: the open-loop
# ones run one episode, PBT 2 members x 2 rounds; the others (grid: one stage for four design
# points, the best to the episode's end) spend it all.
EXPECTED_SPEND = {"fixed": 2, "progressive": 2, "grid": 5, "random": 5, "tpe": 5, "pbt": 4,
                  "skills": 5}


@pytest.mark.parametrize("name", sorted(EXPECTED_SPEND))
def test_controller_spends_within_budget_and_is_deterministic(env, name):
    budget, runs = 5, []
    for _ in range(2):
        before = stages_of(env)
        recorded = Recorder(env)
        result = controllers.make(name).run(recorded, budget, seed=3)
        spent = stages_of(env) - before
        check_result(recorded, result, budget, spent)
        assert spent == EXPECTED_SPEND[name] and result.name == name and result.seed == 3
        runs.append(result)
    a, b = runs
    assert a.schedule == b.schedule and a.dev_score == b.dev_score and a.anytime == b.anytime
    assert a.trials == b.trials
    ctrl = controllers.make(name)
    # Whoever leaves stages unspent says why (the harness copies it into the run record).
    assert spent == budget or getattr(ctrl, "unspent_reason", None)
    if name == "grid":   # halving: the design's first 4 points one stage, the best to the end
        design = ctrl.design(env.unwrapped.hparams)
        assert [t["point"] for t in a.trials] == [0, 1, 2, 3]
        assert [t["hparams"] for t in a.trials] == design[:4]
        assert sorted(t["stages"] for t in a.trials) == [1, 1, 1, 2]
        (best,) = [t for t in a.trials if t["stages"] == 2]
        assert best["dev_scores"][0] == max(t["dev_scores"][0] for t in a.trials)
        assert best["state"] == "COMPLETE" and best["episode_end"] == "stages"
        assert {t["state"] for t in a.trials if t is not best} == {"PRUNED"}


def test_harness_scores_the_chosen_state_on_test(env):
    result = controllers.make("fixed").run(env, 4, seed=0)
    env.unwrapped.load_state(result.final_state)
    assert 0.0 <= env.unwrapped.evaluate_test() <= 1.0


def test_same_seed_same_result_on_a_fresh_env(env, model_dir):
    fresh = make_env(model_dir)
    a = controllers.make("skills").run(env, 3, seed=5)
    b = controllers.make("skills").run(fresh, 3, seed=5)
    assert (a.schedule, a.dev_score, a.trials) == (b.schedule, b.dev_score, b.trials)
    fresh.close()


def test_make_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        controllers.make("nope")
    for name in EXPECTED_SPEND:
        assert name in str(err.value)
    assert isinstance(controllers.make("tpe", n_startup_trials=2), controllers.Controller)


def test_grid_runs_its_declared_design_in_order_from_the_default(env):
    grid = controllers.make("grid")
    space = env.unwrapped.hparams
    design = grid.design(space)
    default = space.decode(space.default_action())
    assert design[0] == default
    # One factor at a time, one grid step, in the declared order; every possible step is there.
    moved = []
    for point in design[1:]:
        (name,) = [n for n in space.names if point[n] != default[n]]
        step = space.index(name, point[name]) - space.index(name, default[name])
        assert abs(step) == 1
        moved.append((name, step))
    order = [n for n in grid.order if n in space.names]
    assert [n for n, _ in moved] == sorted((n for n, _ in moved), key=order.index)
    assert len(moved) == sum((space.index(n, default[n]) > 0)
                             + (space.index(n, default[n]) < len(space.grids[n]) - 1)
                             for n in space.names)
    # A budget for more episodes than the design has points runs the whole design, in order (a
    # smaller one runs its first budget // STAGES points: see the spend test).
    result = grid.run(env, 100, seed=0)
    assert [t["schedule"] for t in result.trials] == [[p] * STAGES for p in design]
    assert result.cost["stages"] == len(design) * STAGES


def test_the_grid_design_moves_every_name_both_ways_capacity_included():
    # The real GSM8K space: every name whose default is inside its grid moves down and up, the
    # capacity names (group size, completion length) too; a default at a grid's end moves once.
    space, _ = build_hparam_space("gsm8k", difficulty_levels=(0, 1, 2, 3, 4),
                                  default_difficulty=0)
    grid = controllers.make("grid")
    design = grid.design(space)
    default = space.defaults
    assert design[0] == default
    moves = {(n, space.index(n, p[n]) - space.index(n, default[n]))
             for p in design[1:] for n in space.names if p[n] != default[n]}
    for name in space.names:
        i, last = space.index(name, default[name]), len(space.grids[name]) - 1
        assert ((name, -1) in moves) == (i > 0) and ((name, 1) in moves) == (i < last), name
    for capacity in ("num_generations", "max_completion_length"):
        assert {(capacity, -1), (capacity, 1)} <= moves
    assert len(design) == 1 + len(moves)


@pytest.mark.parametrize("points, stages, budget, plan", [
    (12, 8, 96, [(8, 12)]),                       # the whole design fits: every point to the end
    (12, 8, 32, [(1, 12), (3, 4), (8, 2)]),       # halving by 3: 12 + 8 + 10 = 30 stages
    (12, 8, 35, [(1, 12), (3, 4), (8, 3)]),       # what is left takes one more to the end
    (12, 8, 19, [(1, 12), (8, 1)]),               # one stage each, the best to the end
    (12, 8, 18, [(1, 11), (8, 1)]),               # short of that: the design's first points
    (12, 3, 6, [(1, 4), (3, 1)]),
    (5, 2, 8, [(1, 5), (2, 3)]),
    (3, 1, 2, [(1, 2)]),
])
def test_halving_plan_fits_the_design_to_the_budget(points, stages, budget, plan):
    from controllers.search import halving_plan, plan_cost

    got = halving_plan(points, stages, budget, 3)
    assert got == plan and plan_cost(got) <= budget
    assert [r for r, _ in got] == sorted({r for r, _ in got}) and got[-1][0] == stages
    assert [n for _, n in got] == sorted((n for _, n in got), reverse=True)


def test_grid_fits_exactly_where_its_plan_covers_the_design():
    from controllers.search import halving_plan

    space, _ = build_hparam_space("gsm8k", difficulty_levels=(0, 1, 2, 3, 4),
                                  default_difficulty=0)
    grid = controllers.make("grid")
    points = len(grid.design(space))
    for budget in range(1, 40):
        plan = halving_plan(points, 8, budget, 3)
        covers = plan[0][1] == points and plan[-1][0] == 8
        assert (grid.fits(budget, 8, space=space) is None) == covers == (budget >= points + 7)
    assert "budget 6" in grid.fits(6, 3, space=space)


def test_fits_and_unspent_reasons_say_where_a_controller_falls_short():
    from controllers.base import fits

    standard, quick = (32, 8), (6, 3)
    for name in ("grid", "tpe", "llmzero", "random", "pbt", "skills", "fixed"):
        assert fits(controllers.make(name), *standard) is None, name
    for name in ("grid", "tpe"):            # too few design points / trials at quick's budget
        reason = fits(controllers.make(name), *quick)
        assert isinstance(reason, str) and "6" in reason
    assert fits(controllers.make("llmzero"), *quick) is None
    assert "no path reaches the end" in fits(controllers.make("llmzero"), 7, 8)
    assert "n_startup_trials" in fits(controllers.make("tpe", n_startup_trials=10), *standard)
    assert "never reaches the episode's end" in fits(controllers.make("pbt"), 12, 8)
    for name in ("fixed", "progressive", "grid", "pbt", "skills", "llmzero"):
        assert controllers.make(name).unspent_reason


def test_pruned_schedule_searches_run_at_least_min_trials_and_spend_the_budget(env):
    budget = 6
    runs = {name: controllers.make(name, min_trials=4).run(env, budget, seed=2)
            for name in ("random", "tpe")}
    for name, result in runs.items():
        trials = [t for t in result.trials if not t.get("replay")]
        assert len(trials) >= 4 and result.cost["stages"] == budget, name
        assert sum(t["stages"] for t in trials) == budget
        assert {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}
        for t in trials:     # a trial's schedule is the stages it trained, no more
            assert len(t["schedule"]) == len(t["dev_scores"]) == t["stages"] >= 1
            assert (t["state"] == "COMPLETE") == (t["stages"] == STAGES)
    # Same pruning, same seed: the two differ only where TPE leaves its random start-up.
    first = [t["schedule"][0] for t in runs["random"].trials[:1]]
    assert first == [t["schedule"][0] for t in runs["tpe"].trials[:1]]


def test_a_spent_token_budget_ends_every_run_with_the_best_state_so_far(model_dir):
    env = make_env(model_dir)
    u = env.unwrapped
    for name in ("fixed", "grid", "random", "tpe", "pbt", "skills", "llmzero"):
        u.budget.max_tokens = u.budget.tokens + 1   # the first stage goes over: then refused
        result = controllers.make(name).run(env, 5, seed=0)
        assert result.cost["stages"] == 1, name
        trained = result.trials[0]
        # No episode ended: the rule falls back to the best state at any depth, and says so.
        assert result.select_fallback, name
        assert result.dev_score == max(result.base_dev_score, result.anytime[-1][1]), name
        assert result.anytime[-1][0] == 1 and trained
    tracker = Tracker(env, 5, seed=0)
    assert tracker.remaining == 0 and "tokens is spent" in tracker.refusal
    with pytest.raises(controllers.BudgetExceeded, match="tokens is spent"):
        tracker.step([u.hparams.decode(u.hparams.default_action())])
    env.close()


def test_under_a_token_budget_the_tokens_bind_not_the_number_of_stages(model_dir):
    env = gym.make("LLMZero-GSM8K-v0", model=model_dir, stages=STAGES, steps_per_stage=1,
                   dev_size=8, test_size=4, eval_max_new_tokens=24, dev_metric="mean_score",
                   fixed_hparams={"prompts_per_step": 2},
                   hparam_grid={**GRID, "num_generations": [2, 4]})
    u = env.unwrapped
    env.reset(seed=0)
    default = u.hparams.defaults
    env.step(default)
    per_stage = u.budget.tokens              # one default stage from the base
    u.budget.max_tokens = u.budget.tokens + 4 * per_stage
    tracker = Tracker(env, 4, seed=0)        # the plan: the 4 default stages the tokens buy
    assert tracker.tokens == 4 * per_stage and tracker.remaining == 4
    cheap = {**default, "num_generations": 2}   # half the completions: about half the tokens
    stage = u.budget.stages
    path: list[dict] = []
    while tracker.remaining > 0:
        _, done = tracker.step(path + [cheap])
        path = [] if done else path + [cheap]
        if done:
            tracker.load(tracker.root)
    trained = u.budget.stages - stage
    # More stages than the plan's count, never more tokens than the budget (a stage starts only
    # while a planned stage's tokens are left) nor more than twice the plan's stages.
    assert 4 < trained <= 2 * 4
    assert tracker.spent_tokens <= 4 * per_stage
    assert tracker.units(per_stage) == 1 and tracker.units(2.5 * per_stage) == 3
    env.close()


def test_progressive_starts_at_a_length_that_holds_the_default_levels_answers(model_dir):
    # GSM8K's own length grid (16 cuts most answers), the env's tokenizer and default level.
    grid = {k: v for k, v in GRID.items() if k != "max_completion_length"}
    env = gym.make("LLMZero-GSM8K-v0", model=model_dir, stages=4, steps_per_stage=1,
                   dev_size=8, test_size=4, fixed_hparams={"prompts_per_step": 2},
                   hparam_grid=grid)
    env.reset(seed=0)
    u = env.unwrapped
    lengths = sorted(len(e.solution) + 1 for e in u.task.examples("train", u.difficulty)[:512])
    progressive = controllers.make("progressive")
    schedule = progressive.schedule(env, 4)
    got = [hp["max_completion_length"] for hp in schedule]
    options = list(u.hparams.grids["max_completion_length"])
    start = got[0]
    held = np.mean([n <= start for n in lengths])
    assert held >= progressive.coverage and start > min(options)
    shorter = [g for g in options if g < start]
    assert np.mean([n <= max(shorter) for n in lengths]) < progressive.coverage
    assert got == sorted(got) and got[-1] == max(options)
    for hp in schedule:     # the rest stays at the defaults
        assert {k: v for k, v in hp.items() if k != "max_completion_length"} == {
            k: v for k, v in u.hparams.decode(u.hparams.default_action()).items()
            if k != "max_completion_length"}
    env.close()


class Interrupt(gym.Wrapper):
    """The real env, interrupted (as by Ctrl-C) before its `at`-th step."""

    def __init__(self, env: gym.Env, at: int) -> None:
        super().__init__(env)
        self.at, self.calls = at, 0

    def step(self, action):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.env.step(action)


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))


def _chosen_by_the_rule(result: RunResult) -> float:
    """The rule over every trial of a resumed search: the best last dev score of an ended one."""
    ended = [t["dev_scores"][-1] for t in result.trials
             if not t.get("replay") and t.get("episode_end") in ENDED]
    return max(ended)


def test_interrupted_tpe_search_resumes_without_repeating_trials(model_dir, tmp_path):
    storage = str(tmp_path / "study.journal")
    # Unpruned, so that trial 0 runs both its stages whatever its dev scores.
    kwargs = {"storage": storage, "reduction_factor": None}
    # First process: trial 0 finishes (2 stages), trial 1 is interrupted after its first stage.
    env = Interrupt(make_env(model_dir), at=4)
    with pytest.raises(KeyboardInterrupt):
        controllers.make("tpe", **kwargs).run(env, 8, seed=1)
    assert stages_of(env) == 3
    first = _study(storage, "tpe-seed1").trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    env.close()

    # Second process, same storage, bigger budget: the budget is the whole study's.
    env2 = make_env(model_dir)
    result = controllers.make("tpe", **kwargs).run(env2, 9, seed=1)
    resumed = [t for t in result.trials if t.get("resumed")]
    new = [t for t in result.trials if not t.get("resumed") and not t.get("replay")]
    replay = [t for t in result.trials if t.get("replay")]
    assert [t["number"] for t in resumed] == [0, 1]
    assert resumed[0]["schedule"] == first[0].user_attrs["schedule"]
    assert resumed[0]["episode_end"] == "stages"
    assert resumed[1]["state"] == "FAIL" and resumed[1]["stages"] == 1
    # Trial 0 is never run again; the interrupted trial's parameters run again first, once.
    assert [t["number"] for t in new] == list(range(2, 2 + len(new))) and new
    assert new[0]["schedule"][:1] == first[1].user_attrs["schedule"]
    spent2 = stages_of(env2)
    assert spent2 == sum(t["stages"] for t in new) + sum(t["stages"] for t in replay)
    assert result.cost["stages"] == 3 + spent2 <= 9
    # The rule runs over both processes' trials; a chosen state of the first one is rebuilt.
    assert result.dev_score == _chosen_by_the_rule(result)
    env2.unwrapped.load_state(result.final_state)
    assert env2.unwrapped.dev_score == result.dev_score
    env2.close()


def test_interrupted_grid_resumes_the_points_no_process_finished(model_dir, tmp_path):
    from controllers.search import halving_plan

    storage = str(tmp_path / "study.journal")
    env = make_env(model_dir)
    points = len(controllers.make("grid").design(env.unwrapped.hparams))
    (_, first_rung), (_, finalists) = halving_plan(points, STAGES, 8, 3)
    assert first_rung == points and finalists >= 2
    # First process, budget 8: every point one stage, the best `finalists` on to the end; killed
    # before the second finalist's last stage: one point complete, the others pruned or under way.
    env = Interrupt(env, at=points + 2)
    with pytest.raises(KeyboardInterrupt):
        controllers.make("grid", storage=storage).run(env, 8, seed=1)
    assert stages_of(env) == points + 1
    first = _study(storage, "grid-seed1").trials
    states = [t.state.name for t in first]
    assert sorted(states) == sorted(["COMPLETE"] + ["PRUNED"] * (points - finalists)
                                    + ["RUNNING"] * (finalists - 1))
    killed = [t.params for t in first if t.state.name == "RUNNING"]
    env.close()

    # Second process: the killed points run again, each once, within what is left of the
    # budget (the whole study's), with room kept to rebuild a chosen state of the first one.
    env2 = make_env(model_dir)
    budget = points + 1 + STAGES * len(killed) + STAGES
    result = controllers.make("grid", storage=storage).run(env2, budget, seed=1)
    resumed = [t for t in result.trials if t.get("resumed")]
    new = [t for t in result.trials if not t.get("resumed") and not t.get("replay")]
    replay = [t for t in result.trials if t.get("replay")]
    assert sorted(t["state"] for t in resumed) == sorted(s.replace("RUNNING", "FAIL")
                                                         for s in states)
    assert sorted(json.dumps(t["hparams"], sort_keys=True) for t in new) == sorted(
        json.dumps(p, sort_keys=True) for p in killed)
    assert all(t["stages"] == STAGES and t["state"] == "COMPLETE" for t in new)
    spent2 = stages_of(env2)
    assert spent2 == sum(t["stages"] for t in new) + sum(t["stages"] for t in replay)
    assert result.cost["stages"] == points + 1 + spent2 <= budget
    assert result.dev_score == _chosen_by_the_rule(result) and not result.select_fallback
    env2.unwrapped.load_state(result.final_state)
    assert env2.unwrapped.dev_score == result.dev_score
    env2.close()


def test_pbt_exploit_copies_the_parents_state(env):
    u = env.unwrapped
    env.reset(seed=0)
    root = u.save_state()
    members = []
    for lr in (1e-3, 3e-2):
        u.load_state(root)
        hp = {**u.hparams.decode(u.hparams.default_action()), "learning_rate": lr}
        _, _, _, _, info = env.step(u.hparams.encode(hp))
        members.append(Member(u.save_state(), hp, [hp], info["dev_score"]))

    def weights(state):
        u.load_state(state)
        return {k: v.clone() for k, v in u.trainer.model.state_dict().items()}

    before = [weights(m.state) for m in members]
    assert any(not torch.equal(before[0][k], before[1][k]) for k in before[0])
    pairs = exploit(members, 0.5, np.random.default_rng(0))
    assert len(pairs) == 1
    child, parent = pairs[0]
    assert members[parent].dev >= members[child].dev
    assert members[child].hparams == members[parent].hparams
    copied = weights(members[child].state)
    assert all(torch.equal(before[parent][k], copied[k]) for k in copied)
    # Training the child from the copy leaves the parent's state untouched.
    u.load_state(members[child].state)
    env.step(u.hparams.encode(members[child].hparams))
    trained = u.trainer.model.state_dict()
    assert any(not torch.equal(before[parent][k], trained[k]) for k in trained)
    assert all(torch.equal(before[parent][k], v) for k, v in weights(members[parent].state).items())


# ---- the skills library (the real action space, no training) ------------------------------------

# The clip range is controlled here (with two updates per batch, where it acts) so that the
# skills' clip moves are exercised.
SPACE, _ = build_hparam_space("gsm8k", hparam_grid={"epsilon": [0.1, 0.2, 0.3]},
                              fixed_hparams={"num_iterations": 2}, difficulty_levels=(1, 2, 3),
                              default_difficulty=2)
DEFAULTS = SPACE.decode(SPACE.default_action())


def test_propose_returns_k_distinct_on_grid_candidates_ranked_by_priority():
    summary = StateSummary(DEFAULTS, metrics=[{"kl": 2.0, "entropy": 1.0}], dev_scores=(0.3, 0.31))
    assert summary.pathologies == (P.KL_BLOWUP,)     # detected from the metrics when not given
    out = propose(summary, SPACE, 5)
    assert len(out) == 5 and all(a != b for i, a in enumerate(out) for b in out[i + 1:])
    for hp in out:
        SPACE.encode(hp)
    top = out[0]  # kl blow-up: beta up, lr down, epsilon tighter, all at once
    assert (top["beta"], top["learning_rate"], top["epsilon"]) == (0.1, 3e-5, 0.1)
    assert out[1] == DEFAULTS                        # then "keep", then exploration moves


def test_skills_fire_on_their_diagnoses():
    def first(**kw):
        return SkillLibrary().proposals(StateSummary(DEFAULTS, **kw), SPACE, 1)[0]

    assert first(pathologies=[P.DIVERGENCE]).skill == "divergence"
    assert first(pathologies=[P.ENTROPY_COLLAPSE]).hparams["temperature"] == 1.3
    lengths = SPACE.grids["max_completion_length"]
    next_length = lengths[lengths.index(DEFAULTS["max_completion_length"]) + 1]
    assert first(pathologies=[P.HIGH_TRUNCATION]).hparams["max_completion_length"] == next_length
    zero = [{"frac_reward_zero_std": 1.0, "reward": 0.0}]
    assert first(metrics=zero, pathologies=[P.ZERO_VARIANCE_GROUPS]).hparams["difficulty"] == 1
    saturated = [{"frac_reward_zero_std": 1.0, "reward": 1.0}]
    assert first(metrics=saturated, pathologies=[P.ZERO_VARIANCE_GROUPS]).hparams[
        "difficulty"] == 3
    assert first(dev_scores=(0.5, 0.4), pathologies=[]).skill == "regression"
    assert first(pathologies=[]).skill == "keep"      # healthy: keep course
    # A remedy blocked at the grid's edge is skipped: at the longest length, truncation yields.
    longest = {**DEFAULTS, "max_completion_length": max(lengths)}
    got = propose({"hparams": longest, "pathologies": [P.HIGH_TRUNCATION]}, SPACE, 1)
    assert got == [longest]


def test_users_can_add_skills():
    lower_temp = Skill("cool_down", lambda s: s.mean("entropy") > 3.0,
                       moves(("temperature", -1)), priority=200)
    lib = SkillLibrary(extra=[lower_temp])
    hot = StateSummary(DEFAULTS, metrics=[{"entropy": 4.0}], pathologies=[])
    assert lib.proposals(hot, SPACE, 1)[0].skill == "cool_down"
    assert propose(hot, SPACE, 1, library=lib)[0]["temperature"] == 0.7
    assert "cool_down" not in [s.name for s in controllers.skills.DEFAULT_LIBRARY.skills]


def test_a_new_pathology_is_one_table_row_and_optionally_one_skill(monkeypatch):
    # The row: the env's detector reports it, the LLM's prompts quote its rule.
    row = P.Detector("long_answers", "stage-mean completion length > 40 tokens",
                     lambda s: s.mean("completions/mean_length") > 40, "answers ramble")
    monkeypatch.setattr(P, "DETECTORS", (*P.DETECTORS, row))
    metrics = [{"completions/mean_length": 45.0, "entropy": 1.0}]
    assert P.detect_pathologies(metrics) == ["long_answers"]
    assert f"- {row.describe()}" in system_prompt(SPACE)
    ctx = Context(task="gsm8k", node_id=1, stage=1, max_stages=2, hparams=DEFAULTS, path=[],
                  pathologies=["long_answers"])
    assert "  - `long_answers`: stage-mean completion length > 40 tokens" in build_prompt(
        ctx, SPACE, 1)
    # The skill: reacts to the name the env reports.
    shorter = Skill("shorten", flagged("long_answers"), moves(("max_completion_length", -1)), 95)
    lib = SkillLibrary(extra=[shorter])
    summary = StateSummary(DEFAULTS, metrics=metrics)  # detected from the metrics
    assert summary.pathologies == ("long_answers",)
    assert lib.proposals(summary, SPACE, 1)[0].skill == "shorten"


@pytest.mark.parametrize("name", sorted(controllers.REGISTRY))
@pytest.mark.parametrize("budget", [1.5, True, -1])
def test_a_budget_that_is_not_a_whole_number_of_stages_is_named_before_anything_runs(
        monkeypatch, name, budget):
    def refuse(self):
        raise AssertionError("a model was loaded before the budget was checked")

    monkeypatch.setattr(metaenv.LLMZeroEnv, "_load_base", refuse)
    env = gym.make("LLMZero-GSM8K-v0")
    with pytest.raises(ValueError, match=rf"budget must be >= 0 and an int.*got {budget!r}"):
        controllers.make(name).run(env, budget, seed=0)
    assert env.unwrapped.budget.stages == 0


@pytest.mark.parametrize("name, kwargs, words", [
    ("pbt", {"frac": 0.7}, ["frac", "(0.0, 0.5]", "0.7"]),
    ("pbt", {"population": 2.5}, ["population", "an int", "2.5"]),
    ("pbt", {"perturb_prob": 0.9, "resample_prob": 0.2}, ["perturb_prob + resample_prob"]),
    ("tpe", {"min_trials": 0}, ["min_trials", ">= 1", "got 0"]),
    ("random", {"reduction_factor": 1}, ["reduction_factor", ">= 2", "got 1"]),
    ("tpe", {"n_startup_trials": -1}, ["n_startup_trials", ">= 0"]),
    ("grid", {"stages": 0}, ["stages", ">= 1", "got 0"]),
    ("skills", {"width": 0}, ["width", ">= 1", "got 0"]),
    ("skills", {"max_width": 1.5}, ["max_width", "an int", "1.5"]),
    ("sb3", {"episodes": 0}, ["episodes", ">= 1", "got 0"]),
    ("progressive", {"coverage": 0.0}, ["coverage", "(0.0, 1.0]", "got 0.0"]),
    ("fixed", {"overrides": [("beta", 0.0)]}, ["overrides", "dict"]),
    ("llmzero", {"k": 2.5}, ["k must be >= 1", "2.5"]),
    ("llmzero", {"c_uct": -0.5}, ["c_uct", ">= 0", "-0.5"]),
    ("llmzero", {"margin": float("nan")}, ["margin", "finite", "nan"]),
])
def test_a_bad_controller_setting_is_named_at_construction(name, kwargs, words):
    with pytest.raises(ValueError) as caught:
        controllers.make(name, **kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_an_unknown_controller_setting_names_the_controller_and_its_settings():
    with pytest.raises(TypeError, match=r"controller 'grid' takes no setting\(s\) \['n_pointz'\]; "
                                        r"it takes \[.*'order'.*\]"):
        controllers.make("grid", n_pointz=3)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['kk'\] for llmzero"):
        controllers.make("llmzero", kk=3)
