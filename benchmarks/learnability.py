"""Learnability of the embedded tasks: base model, the default GRPO schedule, a shuffled control.

Per task, on the embedded default env (4 stages x 20 GRPO steps, default hyperparameters, dev 64):
greedy accuracy of the base model on dev and test, the same after the default schedule, and after
the same schedule with rewards shuffled across each batch (nothing to learn from), plus the wall
time of each stage (training + dev evaluation). Test uses the task's whole test split (512).

    python -m benchmarks.learnability [--tasks gsm8k math countdown logic] [--seeds 0]

Writes results/learnability.{md,json}; the last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gymnasium as gym
import torch

import metaenv

TEST_SIZE = 512


def run_schedule(task: str, seed: int, shuffle_rewards: bool, model: str | None) -> dict:
    """Base and final dev/test accuracy of the default schedule, and each stage's seconds."""
    env = gym.make(metaenv.ENV_IDS[task], test_size=TEST_SIZE, shuffle_rewards=shuffle_rewards,
                   model=model)
    uenv = env.unwrapped
    _, info = env.reset(seed=seed)
    row = {"base_dev": info["dev_score"], "base_test": uenv.evaluate_test()}
    stage_seconds, done = [], False
    while not done:
        _, _, terminated, truncated, info = env.step(uenv.hparams.default_action())
        stage_seconds.append(uenv.last_stage_seconds)
        done = terminated or truncated
    row |= {"dev": info["dev_score"], "test": uenv.evaluate_test(),
            "stage_seconds": stage_seconds, "pathologies": info["pathologies"]}
    env.close()
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | base dev | base test | GRPO dev | GRPO test | test gain | shuffled test "
        "| stage s (median / max) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['base_dev']:.3f} | {r['base_test']:.3f} | {r['dev']:.3f} "
            f"| {r['test']:.3f} | {r['test'] - r['base_test']:+.3f} | {r['shuffled_test']:.3f} "
            f"| {r['stage_s_median']:.1f} / {r['stage_s_max']:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(metaenv.ENV_IDS),
                        choices=list(metaenv.ENV_IDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default=None, help="a model directory (default: shipped)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            t0 = time.perf_counter()
            grpo = run_schedule(task, seed, False, args.model)
            shuffled = run_schedule(task, seed, True, args.model)
            seconds = grpo["stage_seconds"]
            rows.append({
                "task": task, "seed": seed, **{k: grpo[k] for k in ("base_dev", "base_test")},
                "dev": grpo["dev"], "test": grpo["test"], "pathologies": grpo["pathologies"],
                "shuffled_dev": shuffled["dev"], "shuffled_test": shuffled["test"],
                "stage_s_median": statistics.median(seconds), "stage_s_max": max(seconds),
                "wall_s": time.perf_counter() - t0,
            })
            print(json.dumps(rows[-1]), flush=True)

    table = markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learnability.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "learnability.md").write_text(
        "Default GRPO schedule on the embedded envs (greedy accuracy; dev 64, test 512).\n\n"
        f"    python -m benchmarks.learnability --tasks {' '.join(args.tasks)} "
        f"--seeds {' '.join(map(str, args.seeds))}\n\n{table}\n"
    )
    gains = [r["test"] - r["base_test"] for r in rows]
    print(f"min_test_gain={min(gains):.3f} max_stage_s={max(r['stage_s_max'] for r in rows):.1f} "
          f"tasks={len(args.tasks)} seeds={len(args.seeds)}")


if __name__ == "__main__":
    main()
