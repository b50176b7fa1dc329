"""Headroom: on the embedded envs, do stage-varying schedules beat the best constant one?

Per task, on the env's own defaults (`gym.make(env_id)`), three phases:

1. **Selection** (seeds `--selection-seeds`): a declared set of constant schedules (the default,
   each controlled hyperparameter one grid step either side of it, and each search's last stage
   held from the start: 15 on a task with six controlled names) and a declared set of adaptive
   ones (learning-rate decay, late decay and re-heating, two difficulty curricula, length and
   group growth, temperature and beta annealing, explore-then-exploit), plus the schedules chosen
   by two closed-loop searches given one episode's worth of stages (the skills agent and the
   LLMZero tree search with its offline proposer), each replayed open loop: 12 adaptive
   schedules. Every episode ends with a dev evaluation on the task's whole dev split (256 items,
   standard error <= 0.031), and "best constant" / "best adaptive" are the highest mean of that
   score over the selection seeds.
2. **Test** (fresh seeds `--test-seeds`, never used in selection): the default, the best constant
   and the best adaptive schedule, and the best adaptive's last stage held from the start (its
   control: is the gain in the change over time?), each scored with
   `env.unwrapped.evaluate_test()` after `reset(seed)` and one `step(stage)` per stage.
3. **Report**: per task the test scores and the paired gaps (best adaptive - best constant, best -
   default, best adaptive - its last stage held) with a t-interval over seeds (scipy).

    python -m benchmarks.headroom [--tasks gsm8k math countdown logic] [--test-seeds 100 101 ...]

Resumable: every finished episode is appended to `results/headroom_episodes.jsonl` (keyed by task,
seed and schedule) and a re-run skips what is there. Episodes of one seed that share a schedule
prefix train that prefix once (training is deterministic, so this is exact). Writes
`results/headroom.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym

import controllers
import metaenv
from benchmarks.episodes import (
    Episodes,
    Schedule,
    command,
    episode_key,
    full,
    paired,
    phases,
    write_report,
)
from inner.tasks import task_names
from metaenv.hparams import DIFFICULTY, HParamSpace

Family = dict[str, Schedule]  # a family of schedules (constant or adaptive) by name


@dataclass
class Args:
    tasks: tuple[str, ...] = task_names()
    selection_seeds: tuple[int, ...] = (1000,)
    test_seeds: tuple[int, ...] = (2000, 2001, 2002, 2003, 2004)
    selection_dev_size: int = 256  # the whole dev split, scored once at each episode's end
    search_budget: int = 8  # stages each closed-loop search may spend (one episode's worth)
    out: Path = Path("results")
    env_kwargs: dict[str, Any] = field(default_factory=dict)


# ---- the declared schedules ----------------------------------------------------------------------

def _grid_step(space: HParamSpace, name: str, value: Any, delta: int) -> Any | None:
    """The grid value `delta` indices from `value`, or None off the grid's ends."""
    if name not in space.names:
        return None
    return space.neighbour(name, value, delta, clamp=False)


def constant_schedules(space: HParamSpace, stages: int) -> dict[str, Schedule]:
    """The default and each controlled value one grid step either side of it (a one-factor-at-a-
    time design: 13 schedules on a task with six controlled parameters)."""
    d = space.defaults
    out: dict[str, Schedule] = {"default": [{}] * stages}
    for name in space.names:
        for delta in (-1, 1):
            value = _grid_step(space, name, d[name], delta)
            if value is not None:
                out[f"{name}={value}"] = [{name: value}] * stages
    return out


def adaptive_schedules(space: HParamSpace, stages: int) -> dict[str, Schedule]:
    """Declared stage-varying schedules (names absent from the grid keep their defaults)."""
    d = space.defaults

    def step(name: str, delta: int) -> Any:
        v = _grid_step(space, name, d[name], delta)
        return d[name] if v is None else v

    lr_hi, lr_lo = step("learning_rate", 1), step("learning_rate", -1)
    out = {
        "lr decay (up, default, down)": phases(
            stages, (1, {"learning_rate": lr_hi}), (1, {}), (1, {"learning_rate": lr_lo})),
        "lr late decay": phases(stages, (5, {}), (3, {"learning_rate": lr_lo})),
        "lr re-heat mid-episode": phases(
            stages, (2, {}), (1, {"learning_rate": lr_hi}), (1, {})),
        "length growth": phases(
            stages, (1, {"max_completion_length": step("max_completion_length", -1)}), (1, {}),
            (1, {"max_completion_length": step("max_completion_length", 1)})),
        "group growth (fewer, default, more)": phases(
            stages, (1, {"num_generations": step("num_generations", -1)}), (1, {}),
            (1, {"num_generations": step("num_generations", 1)})),
        "temperature anneal (hot, default, cold)": phases(
            stages, (1, {"temperature": step("temperature", 1)}), (1, {}),
            (1, {"temperature": step("temperature", -1)})),
        "beta anneal (high, default, 0)": phases(
            stages, (1, {"beta": step("beta", 1)}), (1, {}), (1, {"beta": space.grids["beta"][0]})),
        "explore then exploit": phases(
            stages, (3, {"temperature": step("temperature", 1),
                         "num_generations": step("num_generations", 1)}), (5, {})),
    }
    if DIFFICULTY in space.names:
        out["curriculum (easier, default, harder)"] = phases(
            stages, (1, {DIFFICULTY: step(DIFFICULTY, -1)}), (1, {}), (1, {DIFFICULTY: step(
                DIFFICULTY, 1)}))
        out["curriculum (default, then harder)"] = phases(
            stages, (5, {}), (3, {DIFFICULTY: step(DIFFICULTY, 1)}))
    return out


def searched_schedule(env: gym.Env, name: str, seed: int, budget: int, log: Episodes,
                      task: str) -> Schedule:
    """A closed-loop search's chosen schedule, extended to the episode's length by repeating its
    last stage (a search may choose a state short of the episode's end); kept in the log."""
    key = json.dumps(["search", episode_key(env, task, seed, []), name, budget])
    if key not in log.done:
        result = controllers.make(name).run(env, budget, seed=seed)
        chosen = [dict(stage) for stage in result.schedule] or [{}]
        stages = env.unwrapped.stages
        log.add({"key": key, "task": task, "seed": seed, "search": name,
                 "chosen_stages": len(result.schedule),
                 "schedule": chosen + [chosen[-1]] * (stages - len(chosen))})
    return log.done[key]["schedule"]


# ---- one task ------------------------------------------------------------------------------------

def run_task(task: str, args: Args, log: Episodes, say: Callable[[str], None]) -> dict:
    """Select the best constant and adaptive schedules on dev, then test them on fresh seeds."""
    env_id = metaenv.env_ids()[task]
    env = gym.make(env_id, **args.env_kwargs)
    families = candidates(env, task, args, log)
    selection = select(env, task, args, log, families, say)
    # max keeps the first of equals: the default among constants, the declared order otherwise.
    best_c = max(selection["constant"], key=selection["constant"].get)
    best_a = max(selection["adaptive"], key=selection["adaptive"].get)
    # The best adaptive schedule's last stage held from the start is its own control on test: is
    # the gain in the change over time, or in the values it ends at?
    held = [families["adaptive"][best_a][-1]] * env.unwrapped.stages
    chosen = {"default": ("default", families["constant"]["default"]),
              "best_constant": (best_c, families["constant"][best_c]),
              "best_adaptive": (best_a, families["adaptive"][best_a]),
              "best_adaptive_last_stage_held": (f"{best_a}, last stage held", held)}
    out: dict[str, Any] = {"env_id": env_id, "env_kwargs": dict(args.env_kwargs),
                           "seeds": list(args.test_seeds)}
    out |= score_on_test(env, task, args, log, chosen, selection)
    out["selection"] = selection
    out["stage_seconds_median"] = statistics.median(
        r["seconds"] / max(len(r["schedule"]), 1) for r in log.done.values()
        if r["task"] == task and "seconds" in r)
    env.close()
    return out


def candidates(env: gym.Env, task: str, args: Args, log: Episodes) -> dict[str, Family]:
    """The constant and the truly varying adaptive schedules, every stage complete, with each
    search's chosen schedule (adaptive) and its last stage held from the start (constant)."""
    space, stages = env.unwrapped.hparams, env.unwrapped.stages
    constant = {k: full(space, s) for k, s in constant_schedules(space, stages).items()}
    adaptive = {k: full(space, s) for k, s in adaptive_schedules(space, stages).items()}
    for seed in args.selection_seeds:
        for search in ("skills", "llmzero"):
            label = f"{search} search (seed {seed}, budget {args.search_budget})"
            chosen = full(space, searched_schedule(env, search, seed, args.search_budget, log,
                                                   task))
            adaptive[label] = chosen
            # Its control: the search's last stage held from the start. A search moves several
            # names at once, which the one-at-a-time constants never do; without this control a
            # better constant point would pass for an adaptive gain.
            constant[f"{label}, last stage held"] = [chosen[-1]] * stages
    adaptive = {k: s for k, s in adaptive.items() if any(st != s[0] for st in s)}  # truly varying
    return {"constant": constant, "adaptive": adaptive}


def select(env: gym.Env, task: str, args: Args, log: Episodes, families: dict[str, Family],
           say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Each schedule's mean final score on the whole dev split over the selection seeds."""
    def dev_at_end(e: gym.Env) -> dict[str, float]:
        return {"selection_dev": e.unwrapped.trainer.evaluate(
            "dev", n=args.selection_dev_size).accuracy}

    every = {(f, k): s for f, family in families.items() for k, s in family.items()}
    scores: dict[tuple, list[float]] = {fk: [] for fk in every}
    for seed in args.selection_seeds:
        rows = log.run(env, task, seed, list(every.values()), dev_at_end)
        for fk, row in zip(every, rows, strict=True):
            scores[fk].append(row["selection_dev"])
    selection: dict[str, dict[str, float]] = {family: {} for family in families}
    for (family, k), values in scores.items():
        selection[family][k] = statistics.fmean(values)
    for family in selection:
        say(f"{task} {family}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(
            selection[family].items(), key=lambda kv: -kv[1])[:4]))
    return selection


def score_on_test(env: gym.Env, task: str, args: Args, log: Episodes,
                chosen: dict[str, tuple[str, Schedule]],
                selection: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The chosen schedules' test scores on the fresh seeds, and their paired gaps."""
    def test_score(e: gym.Env) -> dict[str, float]:
        return {"test": e.unwrapped.evaluate_test()}

    out: dict[str, Any] = {}
    by_seed = [log.run(env, task, seed, [s for _, s in chosen.values()], test_score)
               for seed in args.test_seeds]
    for j, (role, (label, schedule)) in enumerate(chosen.items()):
        rows = [seed_rows[j] for seed_rows in by_seed]
        family = "adaptive" if role == "best_adaptive" else "constant"
        out[role] = {"label": label, "schedule": schedule, "test": [r["test"] for r in rows],
                     "selection_dev": selection[family].get(label),
                     "tokens": [r["tokens"] for r in rows]}
    out["gap"] = paired(out["best_adaptive"]["test"], out["best_constant"]["test"])
    out["gap_vs_last_stage_held"] = paired(out["best_adaptive"]["test"],
                                           out["best_adaptive_last_stage_held"]["test"])
    best = max(("best_constant", "best_adaptive"), key=lambda r: statistics.fmean(out[r]["test"]))
    out["best_vs_default"] = {"best": best} | paired(out[best]["test"], out["default"]["test"])
    return out


# ---- report --------------------------------------------------------------------------------------

def _ci(p: dict) -> str:
    return f"{p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ({statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f})"


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = [
        "Headroom on the embedded envs' defaults: test accuracy of the final state, mean (SD) over "
        f"fresh seeds {tasks[next(iter(tasks))]['seeds']}; selection on the whole dev split "
        f"(seeds {report['selection_seeds']}). Gaps are paired by seed, 95% t-interval.",
        "",
        f"    {report['command']}",
        "",
        "| task | default | best constant | best adaptive | adaptive - constant | best - default |"
        " adaptive - its last stage held | stage s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in tasks.items():
        lines.append(
            f"| {task} | {_mean_sd(t['default']['test'])} | {_mean_sd(t['best_constant']['test'])}"
            f" `{t['best_constant']['label']}` | {_mean_sd(t['best_adaptive']['test'])}"
            f" `{t['best_adaptive']['label']}` | {_ci(t['gap'])} | {_ci(t['best_vs_default'])} |"
            f" {_ci(t['gap_vs_last_stage_held'])} | {t['stage_seconds_median']:.1f} |")
    lines += ["", "Selection (mean final dev score on the whole dev split, per schedule):", ""]
    for task, t in tasks.items():
        for family in ("constant", "adaptive"):
            ranked = sorted(t["selection"][family].items(), key=lambda kv: -kv[1])
            lines.append(f"* {task}, {family}: " + "; ".join(f"{k} {v:.3f}" for k, v in ranked))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> Args:
    d = Args()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(d.tasks))
    p.add_argument("--selection-seeds", nargs="+", type=int, default=list(d.selection_seeds))
    p.add_argument("--test-seeds", nargs="+", type=int, default=list(d.test_seeds))
    p.add_argument("--search-budget", type=int, default=d.search_budget)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--env-kwargs", type=json.loads, default={},
                   help='JSON passed to gym.make, e.g. \'{"steps_per_stage": 4}\'')
    a = p.parse_args(argv)
    return Args(tasks=tuple(a.tasks), selection_seeds=tuple(a.selection_seeds),
                test_seeds=tuple(a.test_seeds), search_budget=a.search_budget, out=a.out,
                env_kwargs=a.env_kwargs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overlap = set(args.selection_seeds) & set(args.test_seeds)
    if overlap:
        raise SystemExit(f"test seeds must be fresh: {sorted(overlap)} are also selection seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    log = Episodes(args.out / "headroom_episodes.jsonl")
    report = {"command": command("benchmarks.headroom", argv),
              "selection_seeds": list(args.selection_seeds), "tasks": {}}
    for task in args.tasks:
        report["tasks"][task] = run_task(task, args, log, lambda m: print(m, flush=True))
        print(f"{task}: gap {_ci(report['tasks'][task]['gap'])}", flush=True)
    write_report(args.out, "headroom", report, markdown)
    return report


if __name__ == "__main__":
    main()
