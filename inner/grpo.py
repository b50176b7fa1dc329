"""GRPO as pure functions: group-relative advantages, per-token log-probs, the clipped loss.

Semantics follow TRL 1.16 `GRPOTrainer` (`_generate_and_score_completions` and `_compute_loss`)
exactly; tests/test_grpo_loss.py checks loss and gradients against it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from inner.rollout import positions_from_mask


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[Tensor, Tensor]:
    """Return (advantages, group_std): reward minus group mean, scaled by group or batch std.

    Rows are grouped consecutively (prompt-major). scale_rewards="none" only centres, as in TRL.
    """
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    if num_generations > 1:
        group_std = grouped.std(dim=1).repeat_interleave(num_generations)
    else:
        group_std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale_rewards == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return advantages, group_std


def completion_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion_tokens: int,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    num_generations: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of the last num_completion_tokens of each row.

    Logits are divided by the sampling temperature, as TRL does. Position ids come from the
    attention mask so left-padded rows see the positions they were sampled with. With
    num_generations > 1, consecutive groups of rows share one prompt: it is run once per group and
    its KV cache is shared by the group's completions (same function, and the gradient still
    flows through the shared prompt; fewer FLOPs than recomputing it for every row).
    """
    n = num_completion_tokens
    positions = positions_from_mask(attention_mask)
    if num_generations == 1:
        # Only the completion's logits are needed: logits_to_keep skips the LM head on the prompt.
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=n + 1,
        ).logits[:, :-1]
    else:
        prompt_len = input_ids.size(1) - n
        cache = DynamicCache(config=model.config)
        prefix = model(
            input_ids=input_ids[::num_generations, :prompt_len],
            attention_mask=attention_mask[::num_generations, :prompt_len],
            position_ids=positions[::num_generations, :prompt_len],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the last prompt position predicts the first completion token
        )
        first = prefix.logits[:, -1:].repeat_interleave(num_generations, dim=0)
        logits = first
        if n > 1:  # with one completion token the prefix alone predicts it (no zero-width pass)
            cache.batch_repeat_interleave(num_generations)
            rest = model(
                input_ids=input_ids[:, prompt_len:-1],
                attention_mask=attention_mask[:, :-1],
                position_ids=positions[:, prompt_len:-1],
                cache=cache,
                use_cache=True,
            )
            logits = torch.cat([first, rest.logits], dim=1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps_all = logits.log_softmax(-1)
    targets = input_ids[:, -n:]
    logps = logps_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if compute_entropy:
        # Entropy from the log-softmax we already have; no gradient needed for a metric.
        with torch.no_grad():
            entropy = -(logps_all.exp() * logps_all).sum(-1)
    return logps, entropy


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    max_completion_length: int,
    use_bias_correction_kl: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio GRPO loss with optional k3 KL; returns (loss, detached per-batch statistics).

    old_logps=None means one update per batch: the ratio is exp(logps - logps.detach()) == 1,
    exactly what TRL does, so the old-policy forward pass is skipped.
    """
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    per_token_kl = None
    if beta != 0.0:
        # k3 estimator of KL(policy || reference), per token.
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":  # mean over all tokens of the batch
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":  # constant normaliser: no length bias
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:
        raise ValueError(f"loss_type must be grpo, dapo or dr_grpo, not {loss_type!r}")

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)

        def masked_mean(x: Tensor) -> Tensor:
            return (x * mask).sum() / n_tokens

        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        stats = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high)),
            "kl": masked_mean(per_token_kl) if per_token_kl is not None else mask.new_zeros(()),
        }
    return loss, stats
