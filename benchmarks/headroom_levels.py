"""Headroom per difficulty level: would a mixed-difficulty test give adaptive schedules room?

The headroom study (`benchmarks.headroom`) scores every schedule on each task's test split, which
sits at the task's default difficulty. Its first untried lever is a test that mixes levels, where
a curriculum and a growing completion length could pay. This probe measures that lever before
anyone rebuilds the env around it: per task it trains

* the default, and the best constant and best adaptive schedules of `results/headroom.json`;
* each difficulty level held from the start;
* three curricula: (easier, default, harder), (default, then harder), and every level in turn
  from the easiest;

on fresh seeds, and scores the final state on `--per-level` held-out problems at every level
(`Task.held_out_at`: disjoint from dev and from every level's train split). The equal mixture of
levels is the mean over levels.

The verdict is deliberately optimistic: the best schedule of each family is picked on the same
test scores it is reported on. If even that in-sample gap of adaptive over constant stays under
3 points on the mixture, a mixed test cannot meet the headroom target with this base model.

    python -m benchmarks.headroom_levels [--tasks ...] [--seeds 2000 2001] [--per-level 128]

Resumable (`results/headroom_levels_episodes.jsonl`). Writes `results/headroom_levels.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import gymnasium as gym

import metaenv
from benchmarks.episodes import Episodes, Schedule, command, full, paired, phases, write_report
from inner.tasks import task_names
from metaenv.hparams import DIFFICULTY

MIN_HELD_OUT = 32  # problems a level needs apart from every train split to be scored at all


def level_schedules(space: Any, stages: int, levels: tuple[int, ...],
                    headroom: dict[str, Any]) -> dict[str, tuple[str, Schedule]]:
    """The probe's schedules by name, each with its family (constant or adaptive)."""
    out: dict[str, tuple[str, Schedule]] = {
        "default": ("constant", [{}] * stages),
        "best constant (headroom)": ("constant", headroom["best_constant"]["schedule"]),
        "best adaptive (headroom)": ("adaptive", headroom["best_adaptive"]["schedule"]),
    }
    default = space.defaults[DIFFICULTY]
    easier = [lv for lv in levels if lv < default]
    harder = [lv for lv in levels if lv > default]
    for lv in levels:
        if lv != default:
            out[f"difficulty {lv} held"] = ("constant", [{DIFFICULTY: lv}] * stages)
    if easier and harder:
        out["curriculum (easier, default, harder)"] = ("adaptive", phases(
            stages, (1, {DIFFICULTY: easier[-1]}), (1, {}), (1, {DIFFICULTY: harder[0]})))
    if harder:
        out["curriculum (default, then harder)"] = ("adaptive", phases(
            stages, (5, {}), (3, {DIFFICULTY: harder[0]})))
    out["every level, easiest first"] = ("adaptive", phases(
        stages, *((1, {DIFFICULTY: lv}) for lv in levels)))
    return {k: (family, full(space, s)) for k, (family, s) in out.items()}


def run_task(task: str, seeds: list[int], per_level: int, headroom: dict[str, Any],
             log: Episodes) -> dict[str, Any]:
    env = gym.make(metaenv.env_ids()[task])
    u = env.unwrapped
    trainable = tuple(u.task.difficulty_levels)
    schedules = level_schedules(u.hparams, u.stages, trainable, headroom)
    held_out = {lv: u.task.held_out_at(lv, per_level) for lv in trainable}
    # A level whose every problem sits in some train split cannot be tested apart from training.
    levels = tuple(lv for lv in trainable if len(held_out[lv]) >= MIN_HELD_OUT)

    def per_level_scores(e: gym.Env) -> dict[str, Any]:
        trainer = e.unwrapped.trainer
        return {"levels": {str(lv): trainer.evaluate_examples(held_out[lv]).accuracy
                           for lv in levels}}

    rows = {name: [] for name in schedules}
    for seed in seeds:
        done = log.run(env, task, seed, [s for _, s in schedules.values()], per_level_scores)
        for name, row in zip(schedules, done, strict=True):
            rows[name].append(row["levels"])
    env.close()
    table = {}
    for name, (family, schedule) in schedules.items():
        by_level = {lv: [r[str(lv)] for r in rows[name]] for lv in levels}
        mixture = [statistics.fmean(r[str(lv)] for lv in levels) for r in rows[name]]
        table[name] = {"family": family, "schedule": schedule, "mixture": mixture,
                       "levels": by_level}
    return {"levels": list(levels), "held_out": {lv: len(held_out[lv]) for lv in trainable},
            "seeds": seeds, "schedules": table,
            "gap": _in_sample_gaps(table, levels)}


def _in_sample_gaps(table: dict[str, Any], levels: tuple[int, ...]) -> dict[str, Any]:
    """Best adaptive minus best constant, each picked on the scores reported (optimistic)."""
    def scores(name: str, score: str | int) -> list[float]:
        return table[name]["mixture"] if score == "mixture" else table[name]["levels"][score]

    def best(family: str, score: str | int) -> str:
        names = [n for n, t in table.items() if t["family"] == family]
        return max(names, key=lambda n: statistics.fmean(scores(n, score)))

    out = {}
    for score in ("mixture", *levels):
        a, c = best("adaptive", score), best("constant", score)
        out[str(score)] = {"adaptive": a, "constant": c} | paired(scores(a, score),
                                                                  scores(c, score))
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Per-level test accuracy after one episode, mean over seeds "
             f"{report['seeds']} ({report['per_level']} held-out problems per level); the "
             "mixture is the mean over levels.", "", f"    {report['command']}", ""]
    for task, t in report["tasks"].items():
        levels = t["levels"]
        lines += [f"### {task}", "", "Held-out problems per level: " + ", ".join(
            f"{lv}: {n}" for lv, n in t["held_out"].items()) + f" (a level needs {MIN_HELD_OUT}"
            " to be scored; below that its problems are all in train splits).", "",
                  "| schedule | family | " + " | ".join(f"level {lv}" for lv in levels)
                  + " | mixture |", "|---|---|" + "---|" * (len(levels) + 1)]
        for name, s in t["schedules"].items():
            cells = [f"{statistics.fmean(s['levels'][lv]):.3f}" for lv in levels]
            lines.append(f"| {name} | {s['family']} | " + " | ".join(cells)
                         + f" | {statistics.fmean(s['mixture']):.3f} |")
        lines += ["", "In-sample gap, best adaptive - best constant (picked on these scores): "
                  + "; ".join(f"{k}: {g['mean']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] "
                              f"({g['adaptive']} vs {g['constant']})"
                              for k, g in t["gap"].items()),
                  "(paired by seed, 95% t-interval)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(task_names()))
    p.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001])
    p.add_argument("--per-level", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("results"))
    a = p.parse_args(argv)
    headroom = json.loads((a.out / "headroom.json").read_text())["tasks"]
    log = Episodes(a.out / "headroom_levels_episodes.jsonl")
    report = {"command": command("benchmarks.headroom_levels", argv), "seeds": a.seeds,
              "per_level": a.per_level, "tasks": {}}
    for task in a.tasks:
        report["tasks"][task] = run_task(task, a.seeds, a.per_level, headroom[task], log)
        print(f"{task}: mixture gap {report['tasks'][task]['gap']['mixture']['mean']:+.3f}",
              flush=True)
    write_report(a.out, "headroom_levels", report, markdown)
    return report


if __name__ == "__main__":
    main()
