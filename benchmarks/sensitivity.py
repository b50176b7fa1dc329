"""Hyperparameter sensitivity on the embedded envs: one parameter moved at a time from the default.

Per task, from the same base state (seed 0): one stage of the default hyperparameters, then one
stage per variant in which a single controlled parameter takes another value of its grid. Each row
gives the dev accuracy after the stage and the stage's mean training metrics (TRL names), so the
effect of each parameter reads as a difference from the default row.

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
from metaenv.hparams import DIFFICULTY

METRICS = ("reward", "frac_reward_zero_std", "completions/clipped_ratio", "kl", "entropy",
           "clip_ratio/region_mean")
# (parameter, which grid values): the grid's ends, so each parameter is moved as far as allowed.
VARIANTS = ("learning_rate", "temperature", "max_completion_length", "beta", "num_generations",
            "epsilon", DIFFICULTY)


def variants(grids: dict[str, tuple]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("default", None)]
    for name in VARIANTS:
        grid = list(grids[name])
        out += [(name, grid[0]), (name, grid[-1])]
    return out


def measure_task(task: str, seed: int, stages: int, model: str | None) -> list[dict]:
    env = gym.make(metaenv.env_ids()[task], model=model)
    uenv = env.unwrapped
    env.reset(seed=seed)
    root = uenv.save_state()
    defaults = dict(uenv.hparams.defaults)
    rows = []
    for name, value in variants(uenv.hparams.grids):
        values = defaults if name == "default" else defaults | {name: value}
        if name != "default" and value == defaults[name]:
            continue
        uenv.load_state(root)
        action = uenv.hparams.encode(values)
        steps, info = [], {}
        for _ in range(stages):
            _, _, terminated, truncated, info = env.step(action)
            steps += info["metrics"]
            if terminated or truncated:
                break
        row = {"task": task, "param": name, "value": value, "dev": info["dev_score"],
               "pathologies": info["pathologies"]}
        row |= {m: float(np.mean([s[m] for s in steps])) if steps else float("nan")
                for m in METRICS}
        rows.append(row)
        print(json.dumps(row), flush=True)
    env.close()
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| task | parameter | value | dev acc | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (4 + len(METRICS))]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"| {r['task']} | {r['param']} | {value} | {r['dev']:.3f} | "
                     + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(metaenv.env_ids()),
                        choices=list(metaenv.env_ids()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", type=int, default=1, help="stages per variant")
    parser.add_argument("--model", default=None, help="a model directory (default: shipped)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    rows = [row for task in args.tasks
            for row in measure_task(task, args.seed, args.stages, args.model)]
    table = markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sensitivity" if len(args.tasks) == len(metaenv.env_ids()) else \
        "sensitivity-" + "-".join(args.tasks)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        f"One parameter moved from the default; {args.stages} stages from the base model "
        f"(seed {args.seed}); dev = greedy accuracy on dev 64, metrics = stage means.\n\n"
        f"    python -m benchmarks.sensitivity --tasks {' '.join(args.tasks)} "
        f"--stages {args.stages}\n\n{table}\n"
    )
    print(f"rows={len(rows)} tasks={len(args.tasks)} wall_s={time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
