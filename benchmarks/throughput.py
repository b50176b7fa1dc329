"""GRPO step throughput: our Trainer vs TRL's GRPOTrainer doing the same work, in one run.

Same GPT-2 (char tokenizer) and initial weights, by default the shipped model's shape (4 layers x
128, 0.84M parameters), same prompts (8 per step, 32 tokens each), num_generations=8 (64
sequences), exactly max_completion_length=48 new tokens for every sequence (EOS disabled for both:
its id is set to one the model can never sample), same beta, num_iterations=1, temperature 1,
top_p 1, top_k off, AdamW, grad clipping 1.0. Warm-up steps are excluded; the per-step wall time
(sampling + reward + reference + loss + backward + update) is the median over the timed steps.
tokens/s counts generated completion tokens.

Precision: fp32, or bf16 as TRL's `bf16=True` does it (forward passes under bf16 autocast, fp32
weights and AdamW moments), for both.

    python -m benchmarks.throughput          # fp32, bf16 at the default size: results/throughput.*
    python -m benchmarks.throughput --sizes  # 0.84M, 3M, 10M: results/precision_speed.json

The last line: speedup_vs_trl=<ours fp32 / TRL fp32> ... bf16_vs_fp32=<ours bf16 / ours fp32 in
tokens/s, at the default size>.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from inner.config import GRPOConfig
from inner.models import tiny_gpt2
from inner.tasks import Example
from inner.tokenizer import build_char_tokenizer
from inner.trainer import Trainer

PROMPT_CHARS = 32
# wall: elapsed time. cpu: this process's CPU time, the fair measure on a machine shared with
# other jobs (use it with --threads 1, where it equals the work done, without waiting).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# name -> (layers, width); 4 heads each. "0.84M" is the shipped base model's shape.
SIZES = {"0.84M": (4, 128), "3M": (4, 256), "10M": (6, 384)}
DEFAULT_SIZE = "0.84M"
DTYPES = ("fp32", "bf16")


def bench_model(tokenizer, size: str):
    layers, width = SIZES[size]
    return tiny_gpt2(tokenizer, n_layer=layers, n_embd=width, n_head=4, seed=0)


def make_prompts(n: int) -> list[str]:
    """n distinct prompts of exactly PROMPT_CHARS characters (= tokens, no padding)."""
    prompts = [
        f"Q{i:05d}: add {(i * 7919) % 1000:>3} and {(i * 31) % 1000:>3}; answer=" for i in range(n)
    ]
    assert all(len(p) == PROMPT_CHARS for p in prompts)
    return prompts


def parity_reward(completion: str) -> float:
    """A cheap verifiable reward that varies within groups, so advantages are non-zero."""
    return float(sum(ch.isdigit() for ch in completion) % 2)


class BenchTask:
    """Just enough of the Task protocol for the Trainer: train prompts and the reward."""

    name, scale, difficulty_levels, default_difficulty = "bench", "embedded", (1,), 1

    def __init__(self, prompts: list[str]):
        self.train = [Example(p, answer="", solution="") for p in prompts]

    def examples(self, split: str, difficulty: int | None = None) -> list[Example]:
        return self.train

    def score(self, completion: str, example: Example) -> float:
        return parity_reward(completion)

    def is_correct(self, completion: str, example: Example) -> bool:
        return parity_reward(completion) == 1.0


def time_ours(args, prompts: list[str], beta: float, size: str = DEFAULT_SIZE,
              dtype: str = "fp32") -> list[float]:
    clock = CLOCKS[args.clock]
    tokenizer = build_char_tokenizer()
    model = bench_model(tokenizer, size)
    trainer = Trainer(model, tokenizer, BenchTask(prompts), seed=0, bf16=dtype == "bf16")
    trainer.eos_token_id = None  # EOS disabled: every completion is exactly 48 tokens, as for TRL
    config = GRPOConfig(
        learning_rate=1e-4,
        beta=beta,
        num_generations=8,
        prompts_per_step=8,
        max_completion_length=args.max_completion_length,
        loss_type="grpo",
        num_iterations=1,
    )
    trainer.train_stage(config, args.warmup)
    times = []
    for _ in range(args.steps):
        start = clock()
        result = trainer.train_stage(config, 1)
        times.append(clock() - start)
        assert result.failure is None
        assert result.metrics[0]["completions/mean_length"] == args.max_completion_length
    return times


def time_trl(args, prompts: list[str], beta: float, size: str = DEFAULT_SIZE,
             dtype: str = "fp32") -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    clock = CLOCKS[args.clock]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.start = clock()

        def on_step_end(self, *a, **k):
            self.times.append(clock() - self.start)

    tokenizer = build_char_tokenizer()
    never = len(tokenizer)  # an id outside the vocabulary: sampling can never produce it
    with tempfile.TemporaryDirectory() as tmp:
        # TRL rebuilds its reference model from the model's path, so save the same init there.
        bench_model(tokenizer, size).save_pretrained(f"{tmp}/model")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/model")
        config = TRLConfig(
            output_dir=f"{tmp}/out",
            use_cpu=True,
            bf16=dtype == "bf16",
            report_to=[],
            activation_checkpointing=False,
            per_device_train_batch_size=64,
            num_generations=8,
            max_completion_length=args.max_completion_length,
            beta=beta,
            loss_type="grpo",
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_iterations=1,
            max_grad_norm=1.0,
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            generation_kwargs={"eos_token_id": never},
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [parity_reward(c) for c in completions],
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.eos_token_ids = [never]  # TRL's post-generation EOS masking uses this list
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        trainer.train()
    lengths = trainer._metrics["train"]["completions/mean_length"]
    assert all(x == args.max_completion_length for x in lengths), lengths
    return timer.times[args.warmup :]


def timed(args, prompts: list[str], beta: float, size: str, dtype: str) -> tuple[float, float]:
    """Median seconds per step of ours and of TRL, alternated over rounds to share the noise."""
    ours, trl = [], []
    for _ in range(args.rounds):
        ours += time_ours(args, prompts, beta, size, dtype)
        trl += time_trl(args, prompts, beta, size, dtype)
    return statistics.median(ours), statistics.median(trl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternate ours/TRL to share noise")
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--betas", default="0.04,0.0", help="first one is the headline")
    parser.add_argument("--sizes", action="store_true",
                        help=f"time fp32 and bf16 at every size of {list(SIZES)} (beta: the first)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    prompts = make_prompts(8 * (args.warmup + args.steps) * 2)
    tokens_per_step = 64 * args.max_completion_length
    betas = [float(b) for b in args.betas.split(",")]

    seconds: dict[tuple[str, str, float], tuple[float, float]] = {}
    runs = ([(size, dtype, betas[0]) for size in SIZES for dtype in DTYPES] if args.sizes else
            [(DEFAULT_SIZE, "fp32", b) for b in betas] + [(DEFAULT_SIZE, "bf16", betas[0])])
    for size, dtype, beta in runs:
        ours_s, trl_s = seconds[size, dtype, beta] = timed(args, prompts, beta, size, dtype)
        print(
            f"size={size} dtype={dtype} beta={beta}: ours {ours_s:.3f} s/step "
            f"({tokens_per_step / ours_s:.0f} tok/s), TRL {trl_s:.3f} s/step "
            f"({tokens_per_step / trl_s:.0f} tok/s), speedup {trl_s / ours_s:.2f}x"
            f"  [{args.rounds * args.steps} + {args.rounds * args.steps} steps, "
            f"threads={args.threads}, clock={args.clock}]",
            flush=True,
        )
    ours, trl = seconds[DEFAULT_SIZE, "fp32", betas[0]]
    extra = " ".join(f"speedup_beta{b:g}={t / o:.2f}" for (size, dtype, b), (o, t)
                     in seconds.items() if size == DEFAULT_SIZE and dtype == "fp32"
                     and b != betas[0])
    bf16 = seconds[DEFAULT_SIZE, "bf16", betas[0]][0]
    last = (f"speedup_vs_trl={trl / ours:.2f} ours_tok_s={tokens_per_step / ours:.0f} "
            f"trl_tok_s={tokens_per_step / trl:.0f} {extra} bf16_vs_fp32={ours / bf16:.2f} "
            f"size={DEFAULT_SIZE} threads={args.threads} clock={args.clock}").replace("  ", " ")
    write(args, seconds, tokens_per_step, last)
    print(last)


def write(args, seconds: dict, tokens_per_step: int, last: str) -> None:
    """results/precision_speed.json (--sizes), or results/throughput.{json,md}."""
    command = "python -m benchmarks.throughput" + (" --sizes" if args.sizes else "") + (
        f" --threads {args.threads}" if args.threads != 2 else "") + (
        f" --clock {args.clock}" if args.clock != "wall" else "")
    rows = [{"size": size, "dtype": dtype, "beta": beta, "ours_s_per_step": o,
             "trl_s_per_step": t} for (size, dtype, beta), (o, t) in seconds.items()]
    record = {"command": command, "threads": args.threads, "clock": args.clock,
              "tokens_per_step": tokens_per_step, "sizes": SIZES if args.sizes else
              {DEFAULT_SIZE: SIZES[DEFAULT_SIZE]}, "rows": rows, "last_line": last}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "precision_speed" if args.sizes else "throughput"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.sizes:
        return
    lines = [f"    {command}", "", "| size | dtype | beta | ours s/step | TRL s/step | speedup |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['dtype']} | {r['beta']:g} | {r['ours_s_per_step']:.3f} | "
              f"{r['trl_s_per_step']:.3f} | {r['trl_s_per_step'] / r['ours_s_per_step']:.2f}x |"
              for r in rows]
    lines += ["", f"Last line: `{last}`", ""]
    (args.out / "throughput.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
