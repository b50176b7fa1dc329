"""The stage runner: GRPO training in stages whose hyperparameters may all change between stages.

Per-step metrics use TRL's names and meanings, with these conventions:
  * a step is one batch of prompts_per_step * num_generations completions followed by
    num_iterations optimizer updates; loss, kl, entropy, clip_ratio/* and grad_norm are averaged
    over those updates;
  * with beta == 0 the loss skips the reference pass (TRL omits its kl key); so that a KL blow-up
    stays visible, the stage's last step then measures kl on a subsample of its batch
    (KL_PROBE_SEQUENCES completions, policy before the update) and the other steps omit the key;
  * num_tokens is cumulative over the Trainer's life (prompt + completion tokens, TRL's
    num_input_tokens_seen) and is restored by load_state; StageResult.num_tokens is per stage;
  * frac_reward_zero_std is the fraction of groups whose rewards are all equal;
  * completions/clipped_ratio is the fraction of completions that hit max_completion_length
    without EOS; step_time is wall-clock seconds (the only non-deterministic metric).
"""

from __future__ import annotations

import copy
import enum
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from inner.config import GRPOConfig
from inner.grpo import completion_logps, group_advantages, grpo_loss
from inner.models import autocast_forward, bf16_pays
from inner.prompts import PromptFormat, final_answer
from inner.rollout import generate
from inner.state import TrainState

if TYPE_CHECKING:
    from inner.tasks import Example


def _own_copy(value: Any, device: torch.device) -> Any:
    """A private copy of an optimizer-state entry (tensors on the param device, steps on CPU)."""
    if not torch.is_tensor(value):
        return value
    return value.clone().to(device) if value.dim() else value.clone().cpu()


# Completions on which the KL to the reference is measured at beta == 0 (a cheap stage-end probe).
KL_PROBE_SEQUENCES = 16
STAT_KEYS = (
    "loss",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "grad_norm",
)


class Failure(enum.StrEnum):
    """Why a stage stopped early; the model of such a stage is lost (the env scores it 0)."""

    OUT_OF_MEMORY = "out_of_memory"
    NON_FINITE_LOSS = "non_finite_loss"
    NON_FINITE_GRADIENTS = "non_finite_gradients"
    NON_FINITE_WEIGHTS = "non_finite_weights"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error of torch or of the host (CPU allocators raise
    RuntimeError with "can't allocate", CUDA raises OutOfMemoryError)."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate" in msg)


@dataclass
class Rollout:
    """One step's batch: prompts + sampled completions (one row each), rewards, advantages."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    rewards: Tensor
    group_std: Tensor
    advantages: Tensor


@dataclass
class EvalResult:
    """Greedy evaluation: accuracy (is_correct), mean reward (score), every sample, and the
    accuracy at each difficulty level of the examples (their `meta["difficulty"]`)."""

    accuracy: float
    mean_score: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    by_level: dict[int, float] = field(default_factory=dict)


def accuracy_by_level(samples: list[dict[str, Any]]) -> dict[int, float]:
    """Accuracy over the samples of each difficulty level, in level order (samples without a
    level are left out)."""
    correct: dict[int, list[bool]] = {}
    for s in samples:
        if s.get("difficulty") is not None:
            correct.setdefault(int(s["difficulty"]), []).append(bool(s["correct"]))
    return {lv: sum(c) / len(c) for lv, c in sorted(correct.items())}


@dataclass
class StageResult:
    """Per-step metrics (TRL names), the failure that stopped the stage early (or None), tokens,
    seconds, and the dev evaluation when one was asked for and the stage did not fail."""

    metrics: list[dict[str, float]]
    failure: Failure | None
    num_tokens: int  # prompt + completion tokens processed in this stage
    seconds: float
    evaluation: EvalResult | None = None


class Trainer:
    """Holds the policy, a frozen reference copy, AdamW, RNGs, the data cursor and the history.

    One `step` = one batch of prompts_per_step * num_generations sampled completions, followed by
    num_iterations optimizer updates on it (its metrics are averaged over those updates).
    Prompts are rendered by `prompt_format` (default: the tokenizer's chat template if it has
    one); bf16 runs forward passes under bf16 autocast (default: where `bf16_pays`, the rule
    of the env's `dtype="auto"`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Any,
        *,
        seed: int = 0,
        device: str = "cpu",
        difficulty: int | None = None,
        dev_size: int = 64,
        shuffle_rewards: bool = False,
        eval_max_new_tokens: int = 128,
        eval_batch_size: int = 64,
        prompt_format: PromptFormat | None = None,
        bf16: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if bf16 is None:
            bf16 = bf16_pays(self.device, sum(p.numel() for p in self.model.parameters()))
        if bf16:  # as TRL: weights and AdamW moments stay fp32, forward passes run in bf16
            autocast_forward(self.model, torch.bfloat16)
        # Frozen reference = the model as given; always kept so beta may go from 0 to > 0 later.
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat(tokenizer)
        self.task = task
        self.seed = seed
        self.difficulty = difficulty
        self.dev_size = dev_size
        self.shuffle_rewards = shuffle_rewards
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        defaults = GRPOConfig()
        self.optimizer = torch.optim.AdamW(self.params, lr=defaults.learning_rate)
        # Sampling uses its own generator on the model's device; data shuffles use a CPU one.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cpu_generator = torch.Generator().manual_seed(seed + 1)
        self.cursors: dict[str, tuple[int, int]] = {}
        self.step = 0
        self.num_tokens = 0  # cumulative prompt + completion tokens (TRL's num_input_tokens_seen)
        self.history: list[dict[str, float]] = []
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    # ------------------------------------------------------------------ data
    def _epoch_order(self, key: str, epoch: int, n: int) -> np.ndarray:
        """The shuffled order of epoch `epoch`, a pure function of (seed, difficulty, epoch)."""
        if (key, epoch) not in self._orders:
            salt = 0 if key == "None" else int(key) + 1
            rng = np.random.default_rng([self.seed, salt, epoch])
            self._orders = {(key, epoch): rng.permutation(n)}  # keep only the current epoch's order
        return self._orders[(key, epoch)]

    def _next_examples(self, n: int, difficulty: int | None) -> list:
        """Draw n train examples at the cursor and advance it (wrapping into a new epoch)."""
        examples = self.task.examples("train", difficulty)
        if not examples:  # the loop below would never end
            raise ValueError(f"{self.task.name}: no train examples at difficulty {difficulty}")
        key = str(difficulty)
        epoch, pos = self.cursors.get(key, (0, 0))
        out = []
        while len(out) < n:
            order = self._epoch_order(key, epoch, len(examples))
            take = min(n - len(out), len(examples) - pos)
            out.extend(examples[i] for i in order[pos : pos + take])
            pos += take
            if pos == len(examples):
                epoch, pos = epoch + 1, 0
        self.cursors[key] = (epoch, pos)
        return out

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.prompt_format.encode(prompts, self.device)

    def _decode(self, completion_ids: Tensor) -> list[str]:
        # Rows are already cut at EOS (pad after it); special tokens (EOS, pad) are dropped.
        return self.tokenizer.batch_decode(completion_ids.tolist(), skip_special_tokens=True)

    # ------------------------------------------------------------------ training
    def _set_optimizer_hparams(self, config: GRPOConfig) -> None:
        # Written into every param group each stage, so any change (up or down) really takes effect.
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate
            group["weight_decay"] = config.weight_decay
            group["betas"] = (config.adam_beta1, config.adam_beta2)
            group["eps"] = config.adam_epsilon

    def _weights_finite(self) -> bool:
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(self.params)))

    def train_stage(
        self,
        config: GRPOConfig,
        num_steps: int,
        difficulty: int | None = None,
        dev_n: int | None = None,
    ) -> StageResult:
        """Train num_steps GRPO steps with one config, then evaluate `dev_n` dev examples.

        Stops early and never raises on a non-finite loss, gradient or weight, or on running out
        of memory (in training or in the evaluation): `StageResult.failure` says which.
        difficulty=None uses the Trainer's difficulty (itself None = the task's default).
        """
        difficulty = self.difficulty if difficulty is None else difficulty
        self._set_optimizer_hparams(config)
        start, tokens_before = time.perf_counter(), self.num_tokens
        metrics: list[dict[str, float]] = []
        failure, evaluation = None, None
        try:
            for i in range(num_steps):
                step_metrics, failure = self._train_step(config, difficulty, i == num_steps - 1)
                if failure is not None:
                    break
                metrics.append(step_metrics)
                self.history.append(step_metrics)
            if failure is None and dev_n is not None:
                evaluation = self.evaluate("dev", n=dev_n)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            failure = Failure.OUT_OF_MEMORY
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if failure is Failure.OUT_OF_MEMORY and self.device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        return StageResult(metrics, failure, self.num_tokens - tokens_before, seconds, evaluation)

    def _train_step(
        self, config: GRPOConfig, difficulty: int | None, probe_kl: bool = False
    ) -> tuple[dict[str, float], Failure | None]:
        """One GRPO step: rollout, reference and old log-probs, num_iterations updates, metrics."""
        t0 = time.perf_counter()
        batch = self._rollout(config, difficulty)
        ref_logps, old_logps = self._frozen_logps(config, batch)
        # Measured before the update, like the loss's kl: after it, the batch just trained on
        # reads several times further from the reference than fresh samples do.
        probed = self._probe_kl(config, batch) if probe_kl and config.beta == 0.0 else None
        stats, failure = self._update(config, batch, ref_logps, old_logps)
        if failure is not None:
            return {}, failure
        self.step += 1
        metrics = self._step_metrics(config, batch, stats)
        if config.beta == 0.0:
            del metrics["kl"]
            if probed is not None:
                metrics["kl"] = probed
        metrics["step_time"] = time.perf_counter() - t0
        return metrics, None

    def _rollout(self, config: GRPOConfig, difficulty: int | None) -> Rollout:
        """Sample num_generations completions per prompt and score them with the task's reward."""
        group = config.num_generations
        examples = self._next_examples(config.prompts_per_step, difficulty)
        prompt_ids, prompt_mask = self._encode([ex.prompt for ex in examples])
        completion_ids, completion_mask = generate(
            self.model,
            prompt_ids,
            prompt_mask,
            config.max_completion_length,
            self.eos_token_id,
            self.pad_token_id,
            temperature=config.temperature,
            top_p=config.top_p,
            generator=self.sample_generator,
            num_return_sequences=group,
        )
        prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
        texts = self._decode(completion_ids)
        rewards = torch.tensor(
            [
                self.task.score(final_answer(text), examples[i // group])
                for i, text in enumerate(texts)
            ],
            dtype=torch.float32,
        )
        if self.shuffle_rewards:  # control: rewards no longer match completions
            rewards = rewards[torch.randperm(len(rewards), generator=self.cpu_generator)]
        advantages, group_std = group_advantages(rewards, group, config.scale_rewards)
        return Rollout(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            rewards=rewards,
            group_std=group_std,
            advantages=advantages.to(self.device),
        )

    def _logps(
        self, model: torch.nn.Module, config: GRPOConfig, batch: Rollout, entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return completion_logps(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.completion_ids.size(1),
            config.temperature,
            compute_entropy=entropy,
            num_generations=config.num_generations,
        )

    @torch.no_grad()
    def _frozen_logps(
        self, config: GRPOConfig, batch: Rollout
    ) -> tuple[Tensor | None, Tensor | None]:
        """Reference and old-policy log-probs, each skipped when it is an exact no-op."""
        ref_logps = old_logps = None
        if config.beta != 0.0:  # with beta == 0 the KL term is exactly zero
            ref_logps, _ = self._logps(self.ref_model, config, batch)
        if config.num_iterations > 1:  # with one update, old == current: an exp(0) ratio
            old_logps, _ = self._logps(self.model, config, batch)
        return ref_logps, old_logps

    @torch.no_grad()
    def _probe_kl(self, config: GRPOConfig, batch: Rollout) -> float:
        """Mean per-token k3 KL of the sampling policy to the reference on the batch's first
        completions (what the loss's kl measures at beta > 0, on a subsample)."""
        rows = KL_PROBE_SEQUENCES
        # Whole groups share one prompt pass; a group size that does not divide the probe does not.
        group = config.num_generations if rows % config.num_generations == 0 else 1
        args = (batch.input_ids[:rows], batch.attention_mask[:rows],
                batch.completion_ids.size(1), config.temperature)
        logps, _ = completion_logps(self.model, *args, num_generations=group)
        ref_logps, _ = completion_logps(self.ref_model, *args, num_generations=group)
        diff = ref_logps - logps
        mask = batch.completion_mask[:rows].to(diff.dtype)
        return float(((torch.exp(diff) - diff - 1) * mask).sum() / mask.sum().clamp(min=1.0))

    def _update(
        self,
        config: GRPOConfig,
        batch: Rollout,
        ref_logps: Tensor | None,
        old_logps: Tensor | None,
    ) -> tuple[dict[str, float], Failure | None]:
        """num_iterations AdamW updates on one batch; stats summed over them, or the failure."""
        self.model.train()
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        for _ in range(config.num_iterations):
            logps, entropy = self._logps(self.model, config, batch, entropy=True)
            loss, stats = grpo_loss(
                logps,
                old_logps,
                ref_logps,
                batch.advantages,
                batch.completion_mask,
                beta=config.beta,
                epsilon_low=config.epsilon_low,
                epsilon_high=config.epsilon_upper,
                loss_type=config.loss_type,
                max_completion_length=config.max_completion_length,
                use_bias_correction_kl=config.use_bias_correction_kl,
            )
            if not torch.isfinite(loss):
                return sums, Failure.NON_FINITE_LOSS
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                return sums, Failure.NON_FINITE_GRADIENTS
            self.optimizer.step()
            if not self._weights_finite():
                return sums, Failure.NON_FINITE_WEIGHTS
            mask = batch.completion_mask.to(entropy.dtype)
            stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1.0)
            stats["loss"] = loss.detach()
            stats["grad_norm"] = grad_norm
            for key in STAT_KEYS:
                sums[key] += float(stats[key])
        return sums, None

    def _step_metrics(
        self, config: GRPOConfig, batch: Rollout, sums: dict[str, float]
    ) -> dict[str, float]:
        """TRL-named metrics of one step; counts the step's tokens into num_tokens."""
        lengths = batch.completion_mask.sum(-1).float()
        self.num_tokens += int(batch.prompt_mask.sum()) + int(lengths.sum())
        if self.eos_token_id is None:
            truncated = torch.ones(len(batch.rewards), dtype=torch.bool)
        else:
            truncated = ~(batch.completion_ids == self.eos_token_id).any(-1)
        zero_std = torch.isclose(batch.group_std, torch.zeros_like(batch.group_std))
        rewards = batch.rewards
        return {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": float(zero_std.float().mean()),
            **{key: value / config.num_iterations for key, value in sums.items()},
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            "num_tokens": float(self.num_tokens),
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "dev", n: int | None = None) -> EvalResult:
        """Greedy, batched decoding on `split` (first n examples; dev defaults to dev_size)."""
        examples = self.task.examples(split)
        if n is None:
            n = self.dev_size if split == "dev" else len(examples)
        if n > len(examples):  # a smaller split would give a score on fewer items than asked
            raise ValueError(f"{self.task.name}: {n} {split} examples asked, the {split} split "
                             f"holds {len(examples)}")
        return self.evaluate_examples(examples[:n])

    @torch.no_grad()
    def evaluate_examples(self, examples: list[Example]) -> EvalResult:
        """Greedy, batched decoding on `examples`, scored by the task."""
        samples = []
        for start in range(0, len(examples), self.eval_batch_size):
            batch = examples[start : start + self.eval_batch_size]
            prompt_ids, prompt_mask = self._encode([ex.prompt for ex in batch])
            completion_ids, _ = generate(
                self.model,
                prompt_ids,
                prompt_mask,
                self.eval_max_new_tokens,
                self.eos_token_id,
                self.pad_token_id,
                greedy=True,
            )
            for ex, text in zip(batch, self._decode(completion_ids), strict=True):
                answer = final_answer(text)
                samples.append(
                    {
                        "prompt": ex.prompt,
                        "completion": text,
                        "answer": ex.answer,
                        "correct": bool(self.task.is_correct(answer, ex)),
                        "score": float(self.task.score(answer, ex)),
                        "difficulty": ex.meta.get("difficulty"),
                    }
                )
        count = max(len(samples), 1)
        accuracy = sum(s["correct"] for s in samples) / count
        mean_score = sum(s["score"] for s in samples) / count
        return EvalResult(accuracy, mean_score, samples, accuracy_by_level(samples))

    # ------------------------------------------------------------------ state
    def save_state(self) -> TrainState:
        """A deep snapshot of the whole training state; later training never alters it."""
        weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        weights |= {name: b.detach().clone() for name, b in self.model.named_buffers()}
        opt_state = {}
        for i, p in enumerate(self.params):
            if p in self.optimizer.state and self.optimizer.state[p]:
                opt_state[i] = {
                    k: v.clone() if torch.is_tensor(v) else v
                    for k, v in self.optimizer.state[p].items()
                }
        groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in self.optimizer.param_groups
        ]
        rng = {
            "sample": self.sample_generator.get_state(),
            "cpu": self.cpu_generator.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return TrainState(
            weights=weights,
            optimizer={"state": opt_state, "param_groups": groups},
            rng=rng,
            cursors=dict(self.cursors),
            step=self.step,
            num_tokens=self.num_tokens,
            history=[dict(m) for m in self.history],
        )

    @torch.no_grad()
    def load_state(self, state: TrainState) -> None:
        """Restore a snapshot by copying into this Trainer's tensors; `state` stays reusable."""
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        missing = set(tensors) ^ set(state.weights)
        if missing:
            raise ValueError(f"state does not match the model: {sorted(missing)[:5]}")
        for name, tensor in tensors.items():
            tensor.copy_(state.weights[name])
        # Copy moments into the live optimizer tensors (never share them with the state:
        # Optimizer.load_state_dict would, and two branches would then corrupt each other).
        for i, p in enumerate(self.params):
            saved = state.optimizer["state"].get(i)
            if saved is None:
                self.optimizer.state.pop(p, None)
                continue
            live = self.optimizer.state.get(p)
            same = (
                live
                and live.keys() == saved.keys()
                and all(
                    not torch.is_tensor(v) or live[k].shape == v.shape for k, v in saved.items()
                )
            )
            if same:
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        live[k].copy_(v)
                    else:
                        live[k] = v
            else:
                self.optimizer.state[p] = {k: _own_copy(v, p.device) for k, v in saved.items()}
        saved_groups = state.optimizer["param_groups"]
        for group, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
            group.update(copy.deepcopy(saved))
        self.sample_generator.set_state(state.rng["sample"])
        self.cpu_generator.set_state(state.rng["cpu"])
        torch.set_rng_state(state.rng["torch"])
        if "cuda" in state.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(state.rng["cuda"], self.device)
        self.cursors = dict(state.cursors)
        self.step = state.step
        self.num_tokens = state.num_tokens
        self.history = [dict(m) for m in state.history]

    def save_state_to_disk(self, path: str | os.PathLike) -> None:
        """Write the current state to directory `path` (atomically)."""
        self.save_state().save(path)

    def load_state_from_disk(self, path: str | os.PathLike) -> None:
        """Restore a state written by save_state_to_disk."""
        self.load_state(TrainState.load(path, device=str(self.device)))
