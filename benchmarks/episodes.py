"""Declared schedules trained as whole episodes, shared by the headroom studies.

A schedule is a list of stages, each a dict of hyperparameter values (the names it leaves out
keep the defaults: `full` completes them). `phases` builds one from shares of the episode;
`Episodes` trains a seed's schedules from the base model, once each, sharing their common prefixes
(training is deterministic, so this is exact), and keeps every finished episode in a JSONL log so
that a re-run resumes; `paired` compares two schedules' scores paired by seed. `command` and
`write_report` are the studies' command line and output.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym

from benchmarks.leaderboard.stats import t_interval
from metaenv.hparams import HParamSpace

Schedule = list[dict[str, Any]]


def phases(stages: int, *parts: tuple[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """A schedule of `stages` from (share of the episode, values) parts, in order."""
    out: list[dict[str, Any]] = []
    total, done = sum(share for share, _ in parts), 0.0
    for j, (share, values) in enumerate(parts):
        done += share
        end = stages if j == len(parts) - 1 else round(stages * done / total)
        out += [dict(values)] * max(end - len(out), 0)
    return out


def full(space: HParamSpace, schedule: Schedule) -> Schedule:
    """Every stage with every controlled value (the default for those it leaves out)."""
    return [space.complete(stage) for stage in schedule]


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of a - b paired by seed and its 95% t-interval (the leaderboard's ``t_interval``)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci": [mean, mean], "diffs": diffs}
    lo, hi, _ = t_interval(diffs)
    return {"mean": mean, "ci": [lo, hi], "diffs": diffs}


# ---- episodes, cached and resumable ------------------------------------------------------------

def episode_key(env: gym.Env, task: str, seed: int, schedule: Schedule) -> str:
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
        todo = sorted({episode_key(env, task, seed, s): s for s in schedules
                       if episode_key(env, task, seed, s) not in self.done}.items())
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
        return [self.done[episode_key(env, task, seed, s)] for s in schedules]


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


# ---- the studies' command line and output -------------------------------------------------------

def command(module: str, argv: list[str] | None) -> str:
    """The command line that ran `module` with `argv` (the process's own when None)."""
    given = argv if argv is not None else sys.argv[1:]
    return f"python -m {module} {' '.join(given)}".strip()


def write_report(out: Path, stem: str, report: dict[str, Any],
                 markdown: Callable[[dict[str, Any]], str]) -> None:
    """`out/<stem>.json` and `out/<stem>.md`, and the markdown printed."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
