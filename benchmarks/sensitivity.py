"""Hyperparameter sensitivity on the embedded envs: one parameter moved at a time from the default.

Per task, from the same base state (seed 0): one stage of the default hyperparameters, then one
stage per variant in which a single controlled parameter takes another value of its grid. Each row
gives the dev accuracy after the stage and the stage's mean training metrics (TRL names; kl is
read at each stage's last step, where it is measured at every beta), so the effect of each
parameter reads as a difference from the default row; the last column names the largest one.
Every controlled parameter of the env is moved (to its grid's ends).

    python -m benchmarks.sensitivity [--tasks ...] [--stages 1]

Writes results/sensitivity.{md,json}; the last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import metaenv
from metaenv.pathologies import stage_mean

METRICS = ("reward", "frac_reward_zero_std", "completions/clipped_ratio", "kl", "entropy",
           "clip_ratio/region_mean")
# A change smaller than this in the dev score or a stage metric is not counted as an effect.
EFFECT_MIN = 0.005


def variants(grids: dict[str, tuple], params: list[str] | None = None) -> list[tuple[str, object]]:
    """The default, then each controlled parameter (or those in `params`) at its grid's ends."""
    out: list[tuple[str, object]] = [("default", None)]
    for name, grid in grids.items():
        if params is None or name in params:
            out += [(name, grid[0]), (name, grid[-1])]
    return out


def largest_effect(row: dict, default: dict) -> tuple[str, float]:
    """The dev score or stage metric that moved most from the default row, and by how much."""
    keys = ("dev", *METRICS)
    deltas = {k: row[k] - default[k] for k in keys if np.isfinite(row[k] - default[k])}
    if not deltas:
        return "-", 0.0
    key = max(deltas, key=lambda k: abs(deltas[k]))
    return key, deltas[key]


def measure_task(task: str, seed: int, stages: int, model: str | None,
                 params: list[str] | None = None) -> list[dict]:
    env = gym.make(metaenv.env_ids()[task], model=model)
    uenv = env.unwrapped
    env.reset(seed=seed)
    root = uenv.save_state()
    defaults = dict(uenv.hparams.defaults)
    rows = []
    unknown = sorted(set(params or ()) - set(uenv.hparams.names))
    if unknown:
        raise SystemExit(f"--params {unknown}: not controlled on {task}; "
                         f"controlled: {list(uenv.hparams.names)}")
    for name, value in variants(uenv.hparams.grids, params):
        values = defaults if name == "default" else defaults | {name: value}
        if name != "default" and value == defaults[name]:
            continue
        uenv.load_state(root)
        steps, last_steps, info = [], [], {}
        for _ in range(stages):
            _, _, terminated, truncated, info = env.step(values)
            steps += info["metrics"]
            last_steps += info["metrics"][-1:]
            if terminated or truncated:
                break
        row = {"task": task, "param": name, "value": value, "dev": info["dev_score"],
               "pathologies": info["pathologies"]}
        row |= {m: stage_mean(steps, m) for m in METRICS}
        # At beta = 0 only a stage's last step has kl (a probe); read every beta there alike.
        row["kl"] = stage_mean(last_steps, "kl")
        row["effect"], row["effect_size"] = largest_effect(row, rows[0] if rows else row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    env.close()
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| task | parameter | value | dev acc | " + " | ".join(METRICS)
            + " | largest change vs default |")
    lines = [head, "|" + "---|" * (5 + len(METRICS))]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:g}"
        effect = "" if r["param"] == "default" else f"{r['effect']} {r['effect_size']:+.3f}"
        lines.append(f"| {r['task']} | {r['param']} | {value} | {r['dev']:.3f} | "
                     + " | ".join(f"{r[m]:.3f}" for m in METRICS) + f" | {effect} |")
    return "\n".join(lines)


def without_effect(rows: list[dict]) -> list[str]:
    """`task/parameter` for each controlled parameter whose moves changed nothing by EFFECT_MIN."""
    moved: dict[str, float] = {}
    for r in rows:
        if r["param"] != "default":
            key = f"{r['task']}/{r['param']}"
            moved[key] = max(moved.get(key, 0.0), abs(r["effect_size"]))
    return [k for k, size in moved.items() if size < EFFECT_MIN]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(metaenv.env_ids()),
                        choices=list(metaenv.env_ids()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", type=int, default=1, help="stages per variant")
    parser.add_argument("--model", default=None, help="a model directory (default: shipped)")
    parser.add_argument("--params", nargs="+", default=None, metavar="NAME",
                        help="move only these controlled parameters (default: every one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    rows = [row for task in args.tasks
            for row in measure_task(task, args.seed, args.stages, args.model, args.params)]
    table = markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sensitivity" if len(args.tasks) == len(metaenv.env_ids()) else \
        "sensitivity-" + "-".join(args.tasks)
    flags = f"--stages {args.stages}"
    if args.params:
        name += "-" + "-".join(args.params)
        flags += " --params " + " ".join(args.params)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        f"One parameter moved from the default; {args.stages} stages from the base model "
        f"(seed {args.seed}); dev = greedy accuracy on dev 64, metrics = stage means.\n\n"
        f"    python -m benchmarks.sensitivity --tasks {' '.join(args.tasks)} {flags}\n\n"
        f"{table}\n\nParameters without an effect of at least {EFFECT_MIN} on the dev score or a "
        f"stage metric: {without_effect(rows) or 'none'}.\n"
    )
    print(f"rows={len(rows)} tasks={len(args.tasks)} no_effect={without_effect(rows)} "
          f"wall_s={time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
