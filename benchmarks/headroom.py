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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
from scipy import stats

import controllers
import metaenv
from inner.tasks import task_names
from metaenv.hparams import DIFFICULTY, HParamSpace

Schedule = list[dict[str, Any]]


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


def _phases(stages: int, *parts: tuple[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """A schedule of `stages` from (share of the episode, values) parts, in order."""
    out: list[dict[str, Any]] = []
    total, done = sum(share for share, _ in parts), 0.0
    for j, (share, values) in enumerate(parts):
        done += share
        end = stages if j == len(parts) - 1 else round(stages * done / total)
        out += [dict(values)] * max(end - len(out), 0)
    return out


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
        "lr decay (up, default, down)": _phases(
            stages, (1, {"learning_rate": lr_hi}), (1, {}), (1, {"learning_rate": lr_lo})),
        "lr late decay": _phases(stages, (5, {}), (3, {"learning_rate": lr_lo})),
        "lr re-heat mid-episode": _phases(
            stages, (2, {}), (1, {"learning_rate": lr_hi}), (1, {})),
        "length growth": _phases(
            stages, (1, {"max_completion_length": step("max_completion_length", -1)}), (1, {}),
            (1, {"max_completion_length": step("max_completion_length", 1)})),
        "group growth (fewer, default, more)": _phases(
            stages, (1, {"num_generations": step("num_generations", -1)}), (1, {}),
            (1, {"num_generations": step("num_generations", 1)})),
        "temperature anneal (hot, default, cold)": _phases(
            stages, (1, {"temperature": step("temperature", 1)}), (1, {}),
            (1, {"temperature": step("temperature", -1)})),
        "beta anneal (high, default, 0)": _phases(
            stages, (1, {"beta": step("beta", 1)}), (1, {}), (1, {"beta": space.grids["beta"][0]})),
        "explore then exploit": _phases(
            stages, (3, {"temperature": step("temperature", 1),
                         "num_generations": step("num_generations", 1)}), (5, {})),
    }
    if DIFFICULTY in space.names:
        out["curriculum (easier, default, harder)"] = _phases(
            stages, (1, {DIFFICULTY: step(DIFFICULTY, -1)}), (1, {}), (1, {DIFFICULTY: step(
                DIFFICULTY, 1)}))
        out["curriculum (default, then harder)"] = _phases(
            stages, (5, {}), (3, {DIFFICULTY: step(DIFFICULTY, 1)}))
    return out


def full(space: HParamSpace, schedule: Schedule) -> Schedule:
    """Every stage with every controlled value (the default for those it leaves out)."""
    return [space.values(stage) for stage in schedule]


def searched_schedule(env: gym.Env, name: str, seed: int, budget: int, log: Episodes,
                      task: str) -> Schedule:
    """A closed-loop search's chosen schedule, extended to the episode's length by repeating its
    last stage (a search may choose a state short of the episode's end); kept in the log."""
    key = json.dumps(["search", _key(env, task, seed, []), name, budget])
    if key not in log.done:
        result = controllers.make(name).run(env, budget, seed=seed)
        chosen = [dict(stage) for stage in result.schedule] or [{}]
        stages = env.unwrapped.stages
        log.add({"key": key, "task": task, "seed": seed, "search": name,
                 "chosen_stages": len(result.schedule),
                 "schedule": chosen + [chosen[-1]] * (stages - len(chosen))})
    return log.done[key]["schedule"]


# ---- episodes, cached and resumable ------------------------------------------------------------

def _key(env: gym.Env, task: str, seed: int, schedule: Schedule) -> str:
    u = env.unwrapped  # the episode's settings are part of the key: a changed default re-runs
    episode = [u.stages, u.steps_per_stage, u.dev_size, u.test_size, u.fixed_hparams]
    return json.dumps([task, seed, episode, schedule], sort_keys=True, default=str)


class Episodes:
    """Finished episodes in a JSONL log; replays a seed's schedules sharing their prefixes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[row["key"]] = row

    def add(self, row: dict) -> None:
        self.done[row["key"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def run(self, env: gym.Env, task: str, seed: int, schedules: list[Schedule],
            score: Callable[[gym.Env], dict[str, float]]) -> list[dict]:
        """Each schedule's episode on `seed` (from the log where it is there); `score(env)` gives
        the scores to keep at the episode's end."""
        todo = sorted({_key(env, task, seed, s): s for s in schedules
                       if _key(env, task, seed, s) not in self.done}.items())
        shared = _shared_prefixes([s for _, s in todo])
        states: dict[tuple, Any] = {}
        for key, schedule in todo:
            t0 = time.perf_counter()
            env.reset(seed=seed)
            start = _longest_saved(states, schedule)
            if start:
                env.unwrapped.load_state(states[_prefix(schedule[:start])])
            info: dict = {}
            for i in range(start, len(schedule)):
                _, _, terminated, truncated, info = env.step(schedule[i])
                if _prefix(schedule[: i + 1]) in shared:
                    states[_prefix(schedule[: i + 1])] = env.unwrapped.save_state()
                if terminated or truncated:
                    break
            u = env.unwrapped
            row = {"key": key, "task": task, "seed": seed, "schedule": schedule,
                   "dev_scores": list(u.dev_scores), "tokens": u.path_cost["tokens"],
                   "failure": info.get("failure"), "seconds": time.perf_counter() - t0,
                   **score(env)}
            self.add(row)
        return [self.done[_key(env, task, seed, s)] for s in schedules]


def _prefix(schedule: Schedule) -> str:
    return json.dumps(schedule, sort_keys=True)


def _shared_prefixes(schedules: list[Schedule]) -> set[str]:
    counts: dict[str, int] = {}
    for s in schedules:
        for i in range(1, len(s)):
            counts[_prefix(s[:i])] = counts.get(_prefix(s[:i]), 0) + 1
    return {p for p, n in counts.items() if n > 1}


def _longest_saved(states: dict, schedule: Schedule) -> int:
    return max((i for i in range(1, len(schedule)) if _prefix(schedule[:i]) in states), default=0)


# ---- one task ------------------------------------------------------------------------------------

def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of a - b paired by seed and its 95% t-interval (scipy)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return {"mean": mean, "ci": [mean, mean], "diffs": diffs}
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=stats.sem(diffs))
    return {"mean": mean, "ci": [float(lo), float(hi)], "diffs": diffs}


def run_task(task: str, args: Args, log: Episodes, say: Callable[[str], None]) -> dict:
    env_id = metaenv.env_ids()[task]
    env = gym.make(env_id, **args.env_kwargs)
    u = env.unwrapped
    space, stages = u.hparams, u.stages

    def dev_at_end(e: gym.Env) -> dict[str, float]:
        return {"selection_dev": e.unwrapped.trainer.evaluate(
            "dev", n=args.selection_dev_size).accuracy}

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

    selection: dict[str, dict[str, float]] = {"constant": {}, "adaptive": {}}
    every = {(f, k): s for f, family in (("constant", constant), ("adaptive", adaptive))
             for k, s in family.items()}
    scores: dict[tuple, list[float]] = {fk: [] for fk in every}
    for seed in args.selection_seeds:
        rows = log.run(env, task, seed, list(every.values()), dev_at_end)
        for fk, row in zip(every, rows, strict=True):
            scores[fk].append(row["selection_dev"])
    for (family, k), values in scores.items():
        selection[family][k] = statistics.fmean(values)
    for family in selection:
        say(f"{task} {family}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(
            selection[family].items(), key=lambda kv: -kv[1])[:4]))
    # max keeps the first of equals: the default among constants, the declared order otherwise.
    best_c = max(selection["constant"], key=selection["constant"].get)
    best_a = max(selection["adaptive"], key=selection["adaptive"].get)

    def test_score(e: gym.Env) -> dict[str, float]:
        return {"test": e.unwrapped.evaluate_test()}

    # The best adaptive schedule's last stage held from the start is its own control on test: is
    # the gain in the change over time, or in the values it ends at?
    held = [adaptive[best_a][-1]] * stages
    chosen = {"default": ("default", constant["default"]),
              "best_constant": (best_c, constant[best_c]),
              "best_adaptive": (best_a, adaptive[best_a]),
              "best_adaptive_last_stage_held": (f"{best_a}, last stage held", held)}
    out: dict[str, Any] = {"env_id": env_id, "env_kwargs": dict(args.env_kwargs),
                           "seeds": list(args.test_seeds)}
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
    out["selection"] = selection
    out["stage_seconds_median"] = statistics.median(
        r["seconds"] / max(len(r["schedule"]), 1) for r in log.done.values()
        if r["task"] == task and "seconds" in r)
    env.close()
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
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m benchmarks.headroom " + " ".join(given)
    report = {"command": command.strip(), "selection_seeds": list(args.selection_seeds),
              "tasks": {}}
    for task in args.tasks:
        report["tasks"][task] = run_task(task, args, log, lambda m: print(m, flush=True))
        print(f"{task}: gap {_ci(report['tasks'][task]['gap'])}", flush=True)
    (args.out / "headroom.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "headroom.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
