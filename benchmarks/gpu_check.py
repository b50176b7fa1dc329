"""GPU readiness: a paper-scale GRPO stage's tokens/s, peak memory and fork cost, in one script.

    python -m benchmarks.gpu_check                            # CUDA: Qwen/Qwen3-0.6B
    python -m benchmarks.gpu_check --model DIR --data-path data/gsm8k   # local model and data

With CUDA it takes Qwen/Qwen3-0.6B (or --model, a hub id or a local directory); without, it runs
on CPU with a tiny Qwen3 it builds itself (inner.tiny_qwen3), so that the script is tested
without a GPU (shrink it with --steps, --prompts-per-step, ...). It builds the env's Trainer at
the paper defaults (16 prompts x 8 generations, up to 512 new tokens, chat template, bf16
autocast on CUDA), trains --steps GRPO steps (a stage is 25) on GSM8K prompts (the embedded
problems, or the real ones from --data-path), halving the prompts per step after an
out-of-memory, times a greedy dev evaluation and a fork (save_state + load_state in memory, and
a state written to disk and read back), and extrapolates the state's size to Qwen3-0.6B. The
defaults are meant to finish within 8 minutes on one GPU (an estimate: not yet run on one;
--max-seconds stops the search for a batch that fits).
The last line is machine-readable: tokens_per_s=... peak_mem_gb=... fork_s=... and more.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from inner.config import GRPOConfig
from inner.models import load_model
from inner.prompts import PromptFormat
from inner.state import TrainState
from inner.tasks import get_task
from inner.trainer import Failure, StageResult, Trainer

GB = 1e9
PAPER_MODEL = "Qwen/Qwen3-0.6B"
# Qwen/Qwen3-0.6B's config.json (architecture fields): its parameters are counted from these.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, tie_word_embeddings=True)


def count_params(config_kwargs: dict) -> int:
    """Parameters of a Qwen3 built from `config_kwargs`, on the meta device (no memory)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**config_kwargs))
    return sum(p.numel() for p in model.parameters())


def state_bytes(num_params: int, weight_bytes: int = 4, moment_bytes: int = 4) -> int:
    """Bytes of one saved training state: the weights plus AdamW's two moments."""
    return num_params * (weight_bytes + 2 * moment_bytes)


def tensor_bytes(state: TrainState) -> int:
    """Bytes of every tensor a TrainState holds (weights and optimizer moments)."""
    tensors = list(state.weights.values())
    tensors += [v for s in state.optimizer["state"].values() for v in s.values()
                if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def train_with_fallback(trainer: Trainer, config: GRPOConfig, steps: int,
                        deadline: float) -> tuple[StageResult, GRPOConfig]:
    """Train `steps` steps; after an out-of-memory halve prompts_per_step and try again."""
    while True:
        if trainer.device.type == "cuda":  # the peak of the batch that fits, not of a failed one
            torch.cuda.reset_peak_memory_stats(trainer.device)
        result = trainer.train_stage(config, steps)
        if result.failure != Failure.OUT_OF_MEMORY:
            return result, config
        print(f"out of memory at {config.prompts_per_step} prompts x "
              f"{config.num_generations} generations", flush=True)
        if config.prompts_per_step == 1 or time.perf_counter() > deadline:
            return result, config
        config = GRPOConfig(**{**config.to_dict(),
                               "prompts_per_step": config.prompts_per_step // 2})


def tokens_per_second(result: StageResult) -> float:
    """Prompt + completion tokens per second, leaving out the first (warm-up) step if possible."""
    steps = result.metrics
    if not steps:
        return 0.0
    if len(steps) == 1:
        return result.num_tokens / steps[0]["step_time"]
    tokens = steps[-1]["num_tokens"] - steps[0]["num_tokens"]  # num_tokens is cumulative
    return tokens / sum(m["step_time"] for m in steps[1:])


def time_fork(trainer: Trainer) -> dict[str, float]:
    """Seconds of a fork in memory and through disk, and the state's bytes in memory and on disk."""
    t0 = time.perf_counter()
    state = trainer.save_state()
    trainer.load_state(state)
    fork_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state"
        t0 = time.perf_counter()
        state.save(path)
        save_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in path.iterdir())
        t0 = time.perf_counter()
        TrainState.load(path, device=str(trainer.device))
        load_s = time.perf_counter() - t0
    return {"fork_s": fork_s, "save_s": save_s, "load_s": load_s,
            "state_mb": tensor_bytes(state) / 1e6, "disk_mb": disk / 1e6}


def probe_rates(mb: float, device: torch.device) -> dict[str, float]:
    """Seconds per GB of a fork in memory and through disk, timed on a state of `mb` MB: the
    tiny model's own state is too small to measure anything but fixed overheads."""
    n = max(int(mb * 1e6 / 12), 1)  # fp32 weights and two fp32 moments: 12 bytes a parameter
    moments = {"step": torch.tensor(1.0), "exp_avg": torch.randn(n, device=device),
               "exp_avg_sq": torch.rand(n, device=device)}
    state = TrainState(weights={"w": torch.randn(n, device=device)},
                       optimizer={"state": {0: moments}, "param_groups": []},
                       rng={}, cursors={}, step=0, num_tokens=0)
    size = tensor_bytes(state) / GB
    t0 = time.perf_counter()  # a fork: save_state clones every tensor, load_state copies back
    tensors = [*state.weights.values(), moments["exp_avg"], moments["exp_avg_sq"]]
    for t in tensors:
        t.copy_(t.clone())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    memory_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        state.save(Path(tmp) / "probe")
        TrainState.load(Path(tmp) / "probe", device=str(device))
        disk_s = time.perf_counter() - t0
    return {"memory_s_per_gb": memory_s / size, "disk_s_per_gb": disk_s / size}


def extrapolate(rates: dict[str, float], num_params: int) -> dict[str, float]:
    """Qwen3-0.6B's state size (fp32 weights + 2 AdamW moments) and fork seconds at `rates`."""
    big = count_params(QWEN3_0_6B)
    size = state_bytes(big) / GB
    return {"params_0_6b": big, "state_gb_0_6b": size, "ref_gb_0_6b": big * 4 / GB,
            "train_gb_0_6b": size + 2 * big * 4 / GB,  # + reference model + gradients
            "fork_s_0_6b": size * rates["memory_s_per_gb"],
            "disk_fork_s_0_6b": size * rates["disk_s_per_gb"], "scale": big / num_params}


def logits_gb(rows: int, length: int, vocab: int) -> float:
    """fp32 logits and their log-softmax of one loss pass: the largest activation at paper scale."""
    return 2 * rows * length * vocab * 4 / GB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", help=f"hub id or local dir (default: {PAPER_MODEL} on CUDA, "
                                   "a tiny Qwen3 built here on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-path", help="local GSM8K files (default: the embedded problems)")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps timed (a stage is 25)")
    p.add_argument("--steps-per-stage", type=int, default=25, help="for the stage estimate")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=512)
    p.add_argument("--dev-size", type=int, default=32, help="greedy dev prompts timed")
    p.add_argument("--paper-dev-size", type=int, default=128, help="for the stage estimate")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinks (long answers)")
    p.add_argument("--max-seconds", type=float, default=360.0,
                   help="no smaller batch is tried after this many seconds")
    p.add_argument("--probe-mb", type=float, default=64.0,
                   help="size of the state that times memory and disk rates")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    return p.parse_args(argv)


def load(args: argparse.Namespace, tmp: str) -> tuple[torch.nn.Module, object, str]:
    """The model and tokenizer to check, and their name."""
    name = args.model
    if name is None and args.device.startswith("cuda"):
        name = PAPER_MODEL
    if name is None:
        from inner.tiny_qwen3 import build_tiny_qwen3

        name = str(build_tiny_qwen3(Path(tmp) / "tiny-qwen3"))
        print(f"no GPU: built a tiny Qwen3 in {name}", flush=True)
    model, tokenizer = load_model(name, device=args.device)
    return model, tokenizer, name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, name = load(args, tmp)
        task = (get_task("gsm8k", "paper", data_path=args.data_path) if args.data_path
                else get_task("gsm8k"))
        trainer = Trainer(model, tokenizer, task, seed=0, device=args.device,
                          eval_max_new_tokens=args.max_completion_length,
                          prompt_format=PromptFormat(tokenizer, args.enable_thinking))
        num_params = sum(p.numel() for p in trainer.params)
        print(f"model={name} params={num_params} device={trainer.device} "
              f"load_s={time.perf_counter() - start:.1f}", flush=True)
        config = GRPOConfig(learning_rate=1e-6, beta=0.0, prompts_per_step=args.prompts_per_step,
                            num_generations=args.num_generations,
                            max_completion_length=args.max_completion_length)
        result, config = train_with_fallback(trainer, config, args.steps,
                                             start + args.max_seconds)
        peak_gb = peak_memory_gb(trainer.device)  # the stage's, before the fork copies a state
        report(args, trainer, result, config, num_params, name, peak_gb)
    return 0 if result.failure is None else 1


def report(args: argparse.Namespace, trainer: Trainer, result: StageResult, config: GRPOConfig,
           num_params: int, name: str, peak_gb: float) -> None:
    """Time the evaluation and the fork, then print every figure and the key=value line."""
    t0 = time.perf_counter()
    trainer.evaluate("dev", n=args.dev_size)
    eval_s = time.perf_counter() - t0
    fork = time_fork(trainer)
    rates = probe_rates(args.probe_mb, trainer.device)
    big = extrapolate(rates, num_params)
    step_s = sum(m["step_time"] for m in result.metrics) / max(len(result.metrics), 1)
    stage_s = args.steps_per_stage * step_s + eval_s * args.paper_dev_size / args.dev_size
    tok_s = tokens_per_second(result)
    lengths = [m["completions/mean_length"] for m in result.metrics] or [0.0]
    rows = config.prompts_per_step * config.num_generations
    print(f"stage: {rows} sequences ({config.prompts_per_step} prompts x "
          f"{config.num_generations}), max {config.max_completion_length} new tokens; "
          f"{len(result.metrics)} steps of {step_s:.2f} s, {tok_s:.0f} tokens/s, mean completion "
          f"{sum(lengths) / len(lengths):.0f} tokens; failure: {result.failure}")
    print(f"dev eval: {args.dev_size} greedy answers in {eval_s:.2f} s; estimated stage of "
          f"{args.steps_per_stage} steps + {args.paper_dev_size} dev answers: {stage_s:.0f} s")
    print(f"peak memory of the training steps: {peak_gb:.2f} GB")
    print(f"fork in memory: {fork['fork_s']:.4f} s; state {fork['state_mb']:.2f} MB, on disk "
          f"{fork['disk_mb']:.2f} MB written in {fork['save_s']:.3f} s, read in "
          f"{fork['load_s']:.3f} s")
    print(f"fork rates on a {args.probe_mb:.0f} MB state: {rates['memory_s_per_gb']:.3f} s/GB "
          f"in memory, {rates['disk_s_per_gb']:.2f} s/GB written and read back")
    print(f"Qwen3-0.6B ({big['params_0_6b'] / 1e6:.0f}M params, {big['scale']:.0f}x this "
          f"model): state {big['state_gb_0_6b']:.2f} GB (fp32 weights + 2 AdamW moments), "
          f"reference model {big['ref_gb_0_6b']:.2f} GB, training (state + reference + "
          f"gradients) {big['train_gb_0_6b']:.1f} GB; fork at these rates "
          f"{big['fork_s_0_6b']:.2f} s in memory, {big['disk_fork_s_0_6b']:.1f} s through disk; "
          f"loss-pass logits at {rows} x {config.max_completion_length} tokens: "
          f"{logits_gb(rows, config.max_completion_length, QWEN3_0_6B['vocab_size']):.0f} GB")
    print(f"tokens_per_s={tok_s:.1f} peak_mem_gb={peak_gb:.3f} "
          f"fork_s={fork['fork_s']:.4f} disk_save_s={fork['save_s']:.4f} "
          f"disk_load_s={fork['load_s']:.4f} state_mb={fork['state_mb']:.2f} "
          f"step_s={step_s:.3f} stage_s_est={stage_s:.1f} prompts_per_step="
          f"{config.prompts_per_step} oom={int(result.failure == Failure.OUT_OF_MEMORY)} "
          f"device={trainer.device.type} model={Path(name).name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
