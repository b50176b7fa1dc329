"""Fork cost: save_state + load_state time as a fraction of one stage's wall time (target <= 0.02).

At the embedded default scale: one stage = env.step (train steps_per_stage GRPO steps, then the
dev evaluation), timed from the same saved state several times; the fork is save_state followed by
load_state of that handle, repeated many times. Medians. The last line is machine-readable.

    python -m benchmarks.fork_cost [--task gsm8k] [--stage-reps 3] [--fork-reps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import gymnasium as gym
import torch

import metaenv


def time_stage(env: gym.Env, reps: int) -> tuple[float, float]:
    """Median wall time of env.step and of its training part, replaying the same stage."""
    uenv = env.unwrapped
    root = uenv.save_state()
    action = uenv.hparams.defaults
    walls, trains = [], []
    for _ in range(reps):
        uenv.load_state(root)
        t0 = time.perf_counter()
        env.step(action)
        walls.append(time.perf_counter() - t0)
        trains.append(uenv.last_stage_seconds)
    uenv.load_state(root)
    return statistics.median(walls), statistics.median(trains)


def time_fork(env: gym.Env, reps: int) -> float:
    """Median of save_state() + load_state(handle), dropping each handle as a search does."""
    uenv = env.unwrapped
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state = uenv.save_state()
        uenv.load_state(state)
        times.append(time.perf_counter() - t0)
        del state
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gsm8k", choices=list(metaenv.env_ids()))
    parser.add_argument("--stage-reps", type=int, default=3)
    parser.add_argument("--fork-reps", type=int, default=200)
    parser.add_argument("--disk-reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env_id = metaenv.env_ids()[args.task]

    env = gym.make(env_id)  # the embedded default configuration
    uenv = env.unwrapped
    env.reset(seed=0)
    env.step(uenv.hparams.defaults)  # fork a state with AdamW moments, as in a search
    n_params = sum(p.numel() for p in uenv.trainer.model.parameters())
    stage_s, train_s = time_stage(env, args.stage_reps)
    fork_s = time_fork(env, args.fork_reps)
    env.close()

    # The on-disk store (what large models use): every saved state is written and read back.
    with tempfile.TemporaryDirectory() as tmp:
        disk_env = gym.make(env_id, max_states_in_memory=0, state_dir=tmp)
        disk_env.reset(seed=0)
        disk_env.step(disk_env.unwrapped.hparams.defaults)
        disk_fork_s = time_fork(disk_env, args.disk_reps)
        disk_env.close()

    ratio = fork_s / stage_s
    print(f"env={env_id} params={n_params} stages={uenv.stages} "
          f"steps_per_stage={uenv.steps_per_stage} dev_size={uenv.dev_size}")
    print(f"stage (train + dev eval) median of {args.stage_reps}: {stage_s:.3f} s "
          f"(train+eval timed by the env: {train_s:.3f} s)")
    print(f"fork (save_state + load_state) median of {args.fork_reps}: {fork_s * 1e3:.2f} ms; "
          f"on-disk store: {disk_fork_s * 1e3:.2f} ms")
    print(f"stage_s={stage_s:.4f} fork_ms={fork_s * 1e3:.3f} disk_fork_ms={disk_fork_s * 1e3:.3f} "
          f"disk_fork_cost_ratio={disk_fork_s / stage_s:.5f} fork_cost_ratio={ratio:.5f}")


if __name__ == "__main__":
    main()
