"""Batched sampling with a KV cache, driven token by token in plain PyTorch over any causal LM."""

from __future__ import annotations

import torch
from torch import Tensor


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Sample one token per row from last-position logits with temperature and nucleus (top_p)."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (always the top token).
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Complete left-padded prompts; return (completion_ids, completion_mask), both (B, <=max_new).

    The mask is 1 up to and including the first EOS; ids after it are pad_token_id. The loop stops
    as soon as every row has produced EOS. eos_token_id=None never stops early.
    """
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    # Never run past the model's position table (absolute-position models would index out of range).
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        longest = int(prompt_mask.sum(-1).max())
        max_new_tokens = max(1, min(max_new_tokens, max_positions - longest))
    # Preallocate everything the loop writes so each step is a few tensor ops, no Python per row.
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    attn = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.long, device=device)
    attn[:, :prompt_len] = prompt_mask
    next_pos = prompt_mask.long().sum(-1, keepdim=True)  # position id of the first new token
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    past = None
    inputs = prompt_ids
    positions = positions_from_mask(prompt_mask)
    steps = 0
    for t in range(max_new_tokens):
        output = model(
            input_ids=inputs,
            attention_mask=attn[:, : prompt_len + t],
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = output.past_key_values
        logits = output.logits[:, -1]
        if greedy:
            token = logits.argmax(-1)
        else:
            token = sample_next(logits, temperature, top_p, generator)
        token = token.masked_fill(done, pad_token_id)  # finished rows only carry padding
        out[:, t] = token
        steps = t + 1
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        inputs = token.unsqueeze(-1)
        positions = next_pos + t
    model.train(was_training)
    completion_ids = out[:, :steps]
    if eos_token_id is None:
        completion_mask = torch.ones_like(completion_ids)
    else:
        is_eos = completion_ids == eos_token_id
        # Tokens strictly after the first EOS are masked: count EOS seen before each position.
        seen_before = is_eos.long().cumsum(-1) - is_eos.long()
        completion_mask = (seen_before == 0).long()
    return completion_ids, completion_mask
