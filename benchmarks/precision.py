"""Precision: is bf16 faster, and is it faithful? Writes results/precision.{md,json}.

Speed comes from `python -m benchmarks.throughput --sizes` (results/precision_speed.json): one GRPO
step of ours and of TRL, fp32 and bf16 (autocast, fp32 weights and AdamW moments, as TRL's
`bf16=True`), at 0.84M, 3M and 10M parameters. Faithfulness is measured here: the default episode
of a task (`gym.make(env_id)`, every stage at the default hyperparameters) is trained on each
seed in fp32 and in bf16, and the final state is scored on test; the paired bf16 - fp32
difference, with its 95% t-interval over seeds, must lie inside +-`--tolerance`. The episodes run
at the shipped model's size (the only size with a trained base model).

    python -m benchmarks.precision [--task gsm8k] [--seeds 0 1 2 3 4]

The last line: bf16_minus_fp32=<mean> ci_low=<x> ci_high=<y> faithful=<yes|no>
fastest_bf16_size=<size or none>.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import inner.models as models
import metaenv
from benchmarks.episodes import command, paired, write_report


def default_episode(task: str, seed: int, dtype: str) -> dict[str, Any]:
    """Train the default schedule on `seed` in `dtype`; the final state's test score."""
    env = gym.make(metaenv.env_ids()[task], dtype=dtype)
    env.reset(seed=seed)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step({})
        done = terminated or truncated
    result = {"test": env.unwrapped.evaluate_test(), "dev": info["dev_score"],
              "seconds": env.unwrapped.budget.seconds}
    env.close()
    return result


def speed_rows(path: Path) -> tuple[list[str], str | None]:
    """The speed table's markdown rows, and the size where ours is fastest in bf16 vs fp32."""
    if not path.exists():
        return [f"(no speed table: run `python -m benchmarks.throughput --sizes` for {path})"], None
    data = json.loads(path.read_text())
    seconds = {(r["size"], r["dtype"]): r for r in data["rows"]}
    rows = ["| size | ours fp32 s/step | ours bf16 s/step | ours bf16 / fp32 speed | TRL fp32 "
            "s/step | TRL bf16 s/step | ours fp32 vs TRL fp32 |", "|---|---|---|---|---|---|---|"]
    best, best_gain = None, 1.0
    for size in data["sizes"]:
        fp32, bf16 = seconds[size, "fp32"], seconds[size, "bf16"]
        gain = fp32["ours_s_per_step"] / bf16["ours_s_per_step"]
        if gain > best_gain:
            best, best_gain = size, gain
        rows.append(f"| {size} | {fp32['ours_s_per_step']:.3f} | {bf16['ours_s_per_step']:.3f} | "
                    f"{gain:.2f}x | {fp32['trl_s_per_step']:.3f} | {bf16['trl_s_per_step']:.3f} | "
                    f"{fp32['trl_s_per_step'] / fp32['ours_s_per_step']:.2f}x |")
    rows += ["", f"Timed with `{data['command']}`, {data['threads']} threads, "
             f"{data['tokens_per_step']} completion tokens per step."]
    return rows, best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = {dtype: [default_episode(a.task, s, dtype) for s in a.seeds]
            for dtype in ("fp32", "bf16")}
    gap = paired([r["test"] for r in runs["bf16"]], [r["test"] for r in runs["fp32"]])
    faithful = -a.tolerance <= gap["ci"][0] and gap["ci"][1] <= a.tolerance
    table, fastest = speed_rows(a.out / "precision_speed.json")
    report = {"command": command("benchmarks.precision", argv),
              "task": a.task, "seeds": a.seeds, "runs": runs, "gap": gap,
              "tolerance": a.tolerance, "faithful": faithful, "fastest_bf16_size": fastest}
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(a.out, "precision", report, lambda r: markdown(r, table))
    print(f"bf16_minus_fp32={gap['mean']:+.4f} ci_low={gap['ci'][0]:+.4f} "
          f"ci_high={gap['ci'][1]:+.4f} faithful={'yes' if faithful else 'no'} "
          f"fastest_bf16_size={fastest or 'none'}")
    return report


def markdown(report: dict[str, Any], speed: list[str]) -> str:
    gap, runs = report["gap"], report["runs"]
    mean = {d: statistics.fmean(r["test"] for r in runs[d]) for d in runs}
    return "\n".join([
        "## Speed: one GRPO step, ours and TRL, fp32 and bf16", "", *speed, "",
        f"## Faithfulness: the default {report['task']} episode, bf16 - fp32", "",
        f"    {report['command']}", "",
        f"Final test accuracy over seeds {report['seeds']}: fp32 {mean['fp32']:.3f}, bf16 "
        f"{mean['bf16']:.3f}; paired bf16 - fp32 {gap['mean']:+.4f}, 95% t-interval "
        f"[{gap['ci'][0]:+.4f}, {gap['ci'][1]:+.4f}] (per seed: "
        + ", ".join(f"{d:+.3f}" for d in gap["diffs"]) + f"). Within +-{report['tolerance']}: "
        f"{'yes' if report['faithful'] else 'no'}.", "",
        "`dtype=\"auto\"` picks bf16 on a CPU only from `inner.models.BF16_CPU_MIN_PARAMETERS` = "
        f"{models.BF16_CPU_MIN_PARAMETERS} parameters (the size where bf16 is fastest here: "
        f"{report['fastest_bf16_size'] or 'none'}); the shipped model runs fp32.", ""])


if __name__ == "__main__":
    main()
