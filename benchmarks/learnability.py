"""Learnability of the embedded tasks: base model, the default GRPO schedule, a shuffled control.

Per task, on the embedded default env (8 stages x 5 GRPO steps, default hyperparameters, dev 64):
greedy accuracy of the base model on dev and test, the same after the default schedule, and after
the same schedule with rewards shuffled across each batch (nothing to learn from), plus the wall
time of each stage (training + dev evaluation). Test uses the task's whole test split (512).

    python -m benchmarks.learnability [--tasks gsm8k math countdown logic] [--seeds 0]

Writes results/learnability.{md,json}; the last line is machine-readable. To try another default
schedule, `--set NAME=VALUE` holds a controlled hyperparameter at another value of its grid for
every stage and `--steps-per-stage N` changes the stage length (write those with `--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import metaenv
from metaenv.hparams import InvalidAction

TEST_SIZE = 512


def run_schedule(
    task: str,
    seed: int,
    shuffle_rewards: bool,
    model: str | None,
    overrides: dict[str, Any] | None = None,
    steps_per_stage: int | None = None,
) -> dict:
    """Base and final dev/test accuracy of the default schedule, and each stage's seconds."""
    env = gym.make(metaenv.env_ids()[task], test_size=TEST_SIZE, shuffle_rewards=shuffle_rewards,
                   model=model, steps_per_stage=steps_per_stage)
    uenv = env.unwrapped
    values = uenv.hparams.complete(uenv.hparams.defaults | (overrides or {}))
    _, info = env.reset(seed=seed)
    row = {"base_dev": info["dev_score"], "base_test": uenv.evaluate_test()}
    stage_seconds, done = [], False
    while not done:
        _, _, terminated, truncated, info = env.step(values)
        stage_seconds.append(uenv.last_stage_seconds)
        done = terminated or truncated
    row |= {"dev": info["dev_score"], "test": uenv.evaluate_test(),
            "stage_seconds": stage_seconds, "pathologies": info["pathologies"]}
    env.close()
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | seed | base dev | base test | GRPO dev | GRPO test | test gain | shuffled test "
        "| stage s (median / max) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shuffled = "-" if r["shuffled_test"] is None else f"{r['shuffled_test']:.3f}"
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['base_dev']:.3f} | {r['base_test']:.3f} "
            f"| {r['dev']:.3f} | {r['test']:.3f} | {r['test'] - r['base_test']:+.3f} | {shuffled} "
            f"| {r['stage_s_median']:.1f} / {r['stage_s_max']:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """`learning_rate=3e-4` -> ("learning_rate", 0.0003); the env checks it against the grid."""
    name, sep, text = item.partition("=")
    if not sep or not name:
        raise SystemExit(f"--set expects NAME=VALUE, got {item!r}")
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a string-valued hyperparameter, e.g. loss_type=dapo
    return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(metaenv.env_ids()),
                        choices=list(metaenv.env_ids()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default=None, help="a model directory (default: shipped)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="hold a controlled hyperparameter at a value of its grid")
    parser.add_argument("--steps-per-stage", type=int, default=None)
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the shuffled-reward control")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(parse_override(item) for item in args.set)
    for task in args.tasks:  # every task's grid, before any training (grids differ per task)
        env = gym.make(metaenv.env_ids()[task]).unwrapped
        try:
            env.hparams.complete(env.hparams.defaults | overrides)
        except InvalidAction as err:
            raise SystemExit(f"--set ({task}): {err}") from None
        finally:
            env.close()

    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            t0 = time.perf_counter()
            variant = (args.model, overrides, args.steps_per_stage)
            grpo = run_schedule(task, seed, False, *variant)
            shuffled = run_schedule(task, seed, True, *variant) if args.control else None
            seconds = grpo["stage_seconds"]
            rows.append({
                "task": task, "seed": seed, **{k: grpo[k] for k in ("base_dev", "base_test")},
                "dev": grpo["dev"], "test": grpo["test"], "pathologies": grpo["pathologies"],
                "shuffled_dev": None if shuffled is None else shuffled["dev"],
                "shuffled_test": None if shuffled is None else shuffled["test"],
                "stage_s_median": statistics.median(seconds), "stage_s_max": max(seconds),
                "wall_s": time.perf_counter() - t0,
            })
            print(json.dumps(rows[-1]), flush=True)

    table = markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learnability.json").write_text(json.dumps(rows, indent=1) + "\n")
    flags = "".join(f" --set {item}" for item in args.set)
    if args.steps_per_stage is not None:
        flags += f" --steps-per-stage {args.steps_per_stage}"
    if not args.control:
        flags += " --no-control"
    (args.out / "learnability.md").write_text(
        f"{'Modified' if flags else 'Default'} GRPO schedule on the embedded envs "
        "(greedy accuracy; dev 64, test 512).\n\n"
        f"    python -m benchmarks.learnability --tasks {' '.join(args.tasks)} "
        f"--seeds {' '.join(map(str, args.seeds))}{flags}\n\n{table}\n"
    )
    gains = [r["test"] - r["base_test"] for r in rows]
    print(f"min_test_gain={min(gains):.3f} max_stage_s={max(r['stage_s_max'] for r in rows):.1f} "
          f"tasks={len(args.tasks)} seeds={len(args.seeds)}")


if __name__ == "__main__":
    main()
