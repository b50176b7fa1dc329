"""The standard preset and what it adds to a run: the transfer replay, the equal-token budget,
controllers left out where they cannot do what their name says, and sb3's disjoint seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import gymnasium as gym
import h5py
import pytest

import controllers
from benchmarks.leaderboard import executors, report, runlog
from benchmarks.leaderboard.executors import RunSpec, make_executor
from benchmarks.leaderboard.harness import (
    PRESETS,
    build_specs,
    default_out,
    fingerprint,
    header,
    main,
    parse_args,
    resolve,
)
from controllers.base import RunResult, Tracker, default_hparams
from controllers.fixed import Fixed
from metaenv.config import SCALE_DEFAULTS

# Two-stage episodes of one GRPO step of 2 prompts x 4 completions, 8 dev/test examples scored
# by mean score, and a learning rate at which two stages move the test score of the shipped
# model (0.10 -> 0.21 on seed 0): the harness is under test here, not the learning.
TINY_ENV = {"dev_metric": "mean_score", "fixed_hparams": {"prompts_per_step": 2},
            "hparam_grid": {"learning_rate": [3e-3], "num_generations": [4],
                            "temperature": [1.0], "max_completion_length": [32],
                            "beta": [0.04]}}
TINY = ["--tasks", "gsm8k", "--seeds", "0", "--budget", "4", "--stages", "2",
        "--steps-per-stage", "1", "--dev-size", "8", "--test-size", "8", "--threads", "1",
        "--env-kwargs", json.dumps(TINY_ENV), "--no-report",
        "--workers", "1"]  # controllers registered here exist only in this process


@dataclass
class OpenLoop:
    """One episode of default stages; returns its last state (not the best on dev), so that the
    chosen schedule is never empty. It says why it leaves the rest of its budget."""

    name: str = "open-loop"
    unspent_reason = "a fixed schedule gains nothing from being trained twice"

    def run(self, env, budget, seed=0):
        tracker = Tracker(env, budget, seed)
        path = []
        for _ in range(env.unwrapped.stages):
            path.append(default_hparams(tracker.space))
            dev, _ = tracker.step(path)
        return RunResult(name=self.name, seed=seed, final_state=env.unwrapped.save_state(),
                         dev_score=dev, schedule=path, cost=tracker.cost())


@dataclass
class UntilRefused:
    """Trains default stages, episode after episode, until the env refuses the next one."""

    name: str = "until-refused"

    def run(self, env, budget, seed=0):
        tracker = Tracker(env, 10**6, seed)  # the env's budget is the only limit
        hp, path = default_hparams(tracker.space), []
        while env.unwrapped.budget.refusal() is None:
            _, done = tracker.step(path + [hp])
            path.append(hp)
            if done:
                tracker.load(tracker.root)
                path = []
        return tracker.result(self.name)


@dataclass
class NeedsBudget:
    """Does what its name says only with at least `need` stages."""

    name: str = "needs-budget"
    need: int = 8

    def fits(self, budget, stages):
        return None if budget >= self.need else f"needs {self.need} stages, got {budget}"

    def run(self, env, budget, seed=0):
        return OpenLoop(name=self.name).run(env, budget, seed)


@pytest.fixture
def registered(monkeypatch):
    for name, cls in (("open-loop", OpenLoop), ("until-refused", UntilRefused),
                      ("needs-budget", NeedsBudget)):
        monkeypatch.setitem(controllers.REGISTRY, name, cls)
    monkeypatch.delenv("LLMZERO_BASE_URL", raising=False)


def _records(out: Path) -> dict[tuple, runlog.RunRecord]:
    return runlog.load_runs(out)


# ---- the preset ----------------------------------------------------------------------------------


def test_standard_preset_is_the_envs_embedded_episode_with_paired_seeds_and_replay():
    std, quick = PRESETS["standard"], PRESETS["quick"]
    emb = SCALE_DEFAULTS["embedded"]
    assert set(std.tasks) == {"gsm8k", "math", "countdown", "logic"}
    assert std.controllers is None  # every registered controller
    assert std.scale == "embedded" and std.seeds == tuple(range(10))  # 10 paired seeds
    assert (std.stages, std.steps_per_stage) == (emb["stages"], emb["steps_per_stage"])
    # A budget in tokens, by default four default episodes' worth, with the episode cap on.
    assert std.budget_unit == "tokens" and std.budget_tokens is None
    assert std.budget == 4 * std.stages and std.env_kwargs["episode_token_cap"] == "default"
    assert quick.env_kwargs["episode_token_cap"] == "default"
    assert std.dev_size >= 128 and std.test_size == emb["test_size"]
    fresh = {s + std.replay_seed_offset for s in std.seeds}
    assert not fresh & set(std.seeds)
    assert std.out == "results/standard" and std.conclusions and std.stage_cache
    assert quick.out == "results" and not quick.conclusions and quick.replay_seed_offset is None
    assert quick.budget_unit == "stages"
    standard = resolve(parse_args(["--preset", "standard"]))
    assert default_out(standard) == "results/standard"
    stages = resolve(parse_args(["--preset", "standard", "--budget-unit", "stages"]))
    assert default_out(stages) == "results/standard-stages"
    head = header(standard, "cmd")
    assert "Budget in tokens, the same for every controller" in head
    assert "32 x one default stage's tokens (4 default episodes' worth)" in head
    assert "episode token cap in force" in head
    quick_head = header(resolve(parse_args(["--preset", "quick"])), "cmd")
    assert "not for conclusions" in quick_head
    assert "Budget in stages (kept in stages so that the smoke run stays short)" in quick_head
    assert not resolve(parse_args(["--preset", "quick", "--no-stage-cache"])).stage_cache


def test_bad_budget_settings_are_clear_errors():
    with pytest.raises(SystemExit, match="--budget-unit tokens"):
        resolve(parse_args(["--preset", "standard", "--budget-unit", "stages",
                            "--budget-tokens", "1000"]))
    with pytest.raises(SystemExit, match="fresh seeds"):
        resolve(parse_args(["--preset", "standard", "--seeds", "0", "5",
                            "--replay-seed-offset", "5"]))


# ---- the replay (transfer) -----------------------------------------------------------------------


def test_replay_is_recorded_on_a_fresh_seed_and_reproduces(tmp_path, registered):
    out = tmp_path / "std"
    argv = ["--preset", "standard", *TINY, "--controllers", "fixed", "open-loop",
            "--out", str(out)]
    assert main(argv) == 0
    runs = _records(out)
    base = runs[("gsm8k", "base", 0)]
    assert "transfer" not in base.extra  # nothing was chosen
    assert not list((out / "stage_cache").rglob("result.json"))  # the seed's stages, dropped
    a = parse_args(argv)
    specs = {s.key: s for s in build_specs(resolve(a), a)}
    for name in ("fixed", "open-loop"):
        rec = runs[("gsm8k", name, 0)]
        (t,) = rec.extra["transfer"]
        assert t["seed"] == 1000 and 0.0 <= t["test_score"] <= 1.0
        assert t["stages"] == len(rec.schedule) and rec.extra["episode_stages"] == 2
        assert rec.extra["transfer_seconds"] >= 0.0
        assert rec.stages_spent <= rec.budget  # the replay is not charged to the budget
        spec = specs[rec.key]
        assert spec.replay_seeds == (1000,) and "replay_seeds" in fingerprint(spec)
        assert t["episode_end"] == "stages"   # replayed under the same episode cap
        # Deterministic: the replay again gives the same numbers, trained (the finished seed's
        # entries were dropped) and then loaded from the stage cache.
        for _ in range(2):
            executors._replay.cache_clear()
            (again,) = executors.transfer(spec, rec.schedule)
            assert {k: v for k, v in again.items() if k not in ("seconds", "stage_cache")} == \
                {k: v for k, v in t.items() if k not in ("seconds", "stage_cache")}
        assert again["stage_cache"]["hits"] == again["stages"] == 2

    # Replayed on the run's own seed, the schedule rebuilds the chosen state and scores what the
    # run scored; on the fresh seed it is another training run.
    loop = runs[("gsm8k", "open-loop", 0)]
    assert len(loop.schedule) == 2 and loop.test_score != base.test_score
    (own,) = executors.transfer(replace(specs[loop.key], replay_seeds=(0,)), loop.schedule)
    assert own["test_score"] == loop.test_score
    assert loop.extra["unspent_reason"] == OpenLoop.unspent_reason
    assert runs[("gsm8k", "fixed", 0)].extra["unspent_reason"] == Fixed.unspent_reason
    with h5py.File(out / "leaderboard.h5", "r") as f:
        assert "seed + 1000" in f.attrs["header"]

    # An empty schedule (the root chosen) replays as the base model: the base test score.
    (empty,) = executors.transfer(specs[loop.key], [])
    assert empty["stages"] == 0 and empty["test_score"] == base.test_score


# ---- the equal-token budget ----------------------------------------------------------------------


def test_tokens_mode_gives_every_controller_the_same_token_budget(tmp_path, registered):
    out = tmp_path / "tok"
    assert main(["--preset", "standard", *TINY, "--controllers", "fixed", "until-refused",
                 "--out", str(out)]) == 0
    runs = {r.controller: r for r in _records(out).values() if r.controller != "base"}
    (t,) = {r.extra["tokens_per_default_stage"] for r in runs.values()}  # measured once
    (cap,) = {r.extra["episode_token_cap"] for r in runs.values()}
    # The default: budget / stages = 2 default episodes' worth, `budget` default stages' tokens;
    # the episode cap is in force beside it.
    env = gym.make("LLMZero-GSM8K-v0", **{**TINY_ENV, "stages": 2, "steps_per_stage": 1,
                                          "dev_size": 8, "test_size": 8,
                                          "episode_token_cap": "default"})
    env.reset(seed=0)
    assert cap == env.unwrapped.episode_token_cap
    env.close()
    budget = 4 * t
    for r in runs.values():
        assert r.settings["budget_unit"] == "tokens" and r.extra["budget_tokens"] == budget
        assert r.settings["env_kwargs"]["max_tokens"] == budget
        # The plan: the stages the tokens buy at one default stage's tokens.
        assert r.budget == r.extra["planned_stages"] == budget // t
        assert r.settings["env_kwargs"]["max_stages"] == 2 * r.budget
        # No stage starts once the budget is spent (only the last one may end past it).
        assert r.tokens - r.stages[-1].tokens < budget
    # The measure is the run's own first default stage from the base model.
    fixed = runs["fixed"]
    assert fixed.stages[0].tokens == t
    # The returned schedule's stages and tokens: fixed's whole episode, which ended it.
    assert fixed.extra["schedule_stages"] == 2 and fixed.extra["episode_end"] == "stages"
    assert fixed.extra["schedule_tokens"] == sum(s.tokens for s in fixed.stages)
    assert not fixed.extra["select_fallback"] and fixed.extra["select_rule"] == "final"
    # A controller that trains until the env refuses spends the whole token budget.
    assert runs["until-refused"].tokens >= budget


# ---- the stage cache -----------------------------------------------------------------------------


def test_runs_share_the_stage_cache_and_score_what_they_score_without_it(tmp_path, registered):
    # fixed and open-loop train the same default episode on seed 0: the second loads it.
    args = ["--preset", "standard", *TINY, "--controllers", "fixed", "open-loop",
            "--replay-seed-offset", "1000"]
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    assert main([*args, "--budget-unit", "stages", "--out", str(cached)]) == 0
    assert main([*args, "--budget-unit", "stages", "--no-stage-cache", "--out", str(plain)]) == 0
    assert (cached / "stage_cache").is_dir() and not (plain / "stage_cache").exists()
    a, b = _records(cached), _records(plain)
    for key in a:
        assert a[key].test_score == b[key].test_score and a[key].schedule == b[key].schedule
        assert a[key].tokens == b[key].tokens   # a loaded stage is charged as trained
    stats = [a["gsm8k", c, 0].extra["stage_cache"] for c in ("fixed", "open-loop")]
    assert sorted((s["hits"], s["misses"]) for s in stats) == [(0, 2), (2, 0)]
    assert all(b["gsm8k", c, 0].extra["stage_cache"] == {"hits": 0, "misses": 0,
                                                         "seconds_saved": 0.0}
               for c in ("fixed", "open-loop"))
    # The report's header gives the totals over every run and replay (the replays of the two
    # runs' one schedule: one trains it, and in this process the other is memoized).
    totals = report.stage_cache_totals(list(a.values()))
    assert (totals["hits"], totals["misses"]) == (2, 4)
    # The folder is never committed.
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "stage_cache/" in ignored


# ---- controllers that cannot do what their name says ---------------------------------------------


def test_a_controller_that_does_not_fit_the_budget_is_left_out_with_its_reason(registered):
    small = resolve(parse_args(["--preset", "standard", "--budget", "4"]))
    assert "needs-budget" not in small.controllers and "fixed" in small.controllers
    (note,) = [n for n in small.notes if n.startswith("needs-budget")]
    assert "needs 8 stages, got 4" in note and note in header(small, "cmd")
    assert "needs-budget" in resolve(parse_args(["--preset", "standard"])).controllers
    # Named on the command line, it runs, and the header says it does not fit.
    named = resolve(parse_args(["--preset", "standard", "--budget", "4",
                                "--controllers", "needs-budget"]))
    assert named.controllers == ("needs-budget",)
    assert any("does not fit" in n and "needs 8 stages" in n for n in named.notes)


# ---- sb3's meta-training seeds -------------------------------------------------------------------


def _policy(tmp_path: Path, train_seeds) -> list[str]:
    (tmp_path / "policy.zip").write_bytes(b"")
    meta = {} if train_seeds is None else {"train_seeds": train_seeds}
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    return ["--controller-kwargs",
            json.dumps({"sb3": {"policy_path": str(tmp_path / "policy.zip")}})]


@pytest.mark.parametrize("train_seeds, shared", [([3, 100], "[3]"), ([1002], "[1002]"),
                                                 (None, "does not declare")])
def test_sb3_meta_trained_on_an_evaluated_seed_is_left_out_or_refused(tmp_path, train_seeds,
                                                                      shared, registered):
    kwargs = _policy(tmp_path, train_seeds)
    preset = resolve(parse_args(["--preset", "standard", *kwargs]))
    assert "sb3" not in preset.controllers
    (note,) = [n for n in preset.notes if n.startswith("sb3")]
    assert shared in note and "meta_train" in note
    with pytest.raises(SystemExit, match="sb3 cannot be scored"):
        resolve(parse_args(["--preset", "standard", "--controllers", "sb3", *kwargs]))


def test_sb3_on_disjoint_seeds_runs_and_the_header_declares_them(tmp_path, registered):
    kwargs = _policy(tmp_path, [100, 101, 102, 103, 104])
    preset = resolve(parse_args(["--preset", "standard", *kwargs]))
    assert "sb3" in preset.controllers
    assert any("[100, 101, 102, 103, 104]" in n for n in preset.notes)
    assert "[100, 101, 102, 103, 104]" in header(preset, "cmd")


# ---- worker processes ----------------------------------------------------------------------------


def test_local_workers_run_runs_in_parallel_processes_with_the_same_results():
    env_kwargs = {**TINY_ENV, "stages": 1, "steps_per_stage": 1, "dev_size": 8, "test_size": 8,
                  "device": "cpu"}
    specs = [RunSpec("gsm8k", "fixed", seed, 1, "LLMZero-GSM8K-v0", env_kwargs, threads=1,
                     replay_seeds=(seed + 1000,)) for seed in (0, 1)]
    seen: list[tuple] = []
    outcomes = list(make_executor("local", workers=2).map(
        specs, on_stage=lambda key, n: seen.append((key, n))))
    assert sorted(s.seed for s, _, _ in outcomes) == [0, 1]
    for spec, rec, err in outcomes:
        assert err is None, err
        assert rec.key == spec.key and rec.stages_spent == 1
        assert rec.extra["transfer"][0]["seed"] == spec.seed + 1000
        # The same numbers as in this process.
        here = executors.execute(spec)
        assert (here.test_score, here.schedule, here.extra["transfer"][0]["test_score"]) == \
            (rec.test_score, rec.schedule, rec.extra["transfer"][0]["test_score"])
    assert {(k, n) for k, n in seen} >= {(s.key, 1) for s in specs}  # progress came back
    with pytest.raises(SystemExit, match="--workers must be >= 1"):
        make_executor("local", workers=0)


def test_a_worker_process_importing_the_cli_module_does_not_start_a_leaderboard():
    # spawn re-imports `python -m benchmarks.leaderboard`'s main module as __mp_main__ in each
    # worker; only the real __main__ may run the harness.
    import runpy

    runpy.run_module("benchmarks.leaderboard", run_name="__mp_main__")


def test_a_worker_ends_when_the_harness_that_started_it_is_gone():
    # The "harness" starts a worker that watches it, prints the worker's pid and dies at once
    # without any cleanup, as a killed process does.
    worker = ("import os, time\n"
              "from benchmarks.leaderboard.executors import exit_with_parent\n"
              "exit_with_parent(os.getppid(), every_s=0.05)\n"
              "print(os.getpid(), flush=True)\n"
              "time.sleep(120)\n")
    harness = ("import os, subprocess, sys\n"
               f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.PIPE)\n"
               "print(p.stdout.readline().decode().strip(), flush=True)\n"
               "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the orphaned worker kept running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its exit status is left for a parent to collect.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
