"""Supervised fine-tuning on (prompt, completion) pairs: the warm start a tiny model needs."""

from __future__ import annotations

import torch
from torch import Tensor


def sft_batch(
    tokenizer, pairs: list[tuple[str, str]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded prompt+completion+EOS ids, attention mask, labels (-100 but completion+EOS)."""
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)  # left padding, as the sampler sees prompts
        mask[i, width - len(r) :] = 1
        lab[i, width - len(r) :] = torch.tensor(lb)
    return ids.to(device), mask.to(device), lab.to(device)


def sft(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train `steps` AdamW steps of next-token loss on completion (+EOS) only; return losses.

    Batches are drawn in a seeded shuffled order (a private generator: global RNG untouched).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    order = torch.randperm(len(pairs), generator=generator).tolist()
    cursor, losses = 0, []
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            cursor = 0
        batch = [pairs[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        ids, mask, labels = sft_batch(tokenizer, batch, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
    return losses
