"""Supervised fine-tuning on (prompt, completion) pairs: the warm start a tiny model needs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from inner.rollout import positions_from_mask


def sft_tensors(tokenizer, pairs: list[tuple[str, str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded prompt+completion+EOS ids, attention mask, labels (-100 but completion+EOS)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(c) + 1 for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = p + c + [eos]
        ids[i, width - len(row) :] = torch.tensor(row)  # left padding, as the sampler sees prompts
        mask[i, width - len(row) :] = 1
        labels[i, width - len(c) - 1 :] = torch.tensor(c + [eos])
    return ids, mask, labels


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup to each group's lr over `warmup_steps` steps, then a cosine decay that
    reaches `final` x lr at `total_steps` (`final=1`: constant after the warmup).

    A scheduler of its own rather than `LambdaLR`: that one computes lr x factor, and the shipped
    base model was trained with lr x (step + 1) / warmup_steps, which differs from it in the last
    bit at some steps; this keeps `python -m inner.base_model` exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 final: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.final = warmup_steps, total_steps, final
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step, warmup = self.last_epoch, self.warmup_steps
        if step < warmup:
            return [lr * (step + 1) / warmup for lr in self.base_lrs]
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        scale = self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
        return [lr * scale for lr in self.base_lrs]


def sft(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    cosine: bool = False,
) -> list[float]:
    """Train `steps` AdamW steps of next-token loss on completion (+EOS) only; return losses.

    The learning rate warms up linearly, then stays constant (or, with cosine=True, decays to
    zero). Batches are drawn in a seeded shuffled order (a private generator: the global RNG is
    untouched).
    """
    device = next(model.parameters()).device
    all_ids, all_mask, all_labels = (t.to(device) for t in sft_tensors(tokenizer, pairs))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = WarmupCosine(optimizer, warmup_steps, steps, final=0.0 if cosine else 1.0)
    model.train()
    order, cursor, losses = torch.randperm(len(pairs), generator=generator), 0, []
    for _ in range(steps):
        if cursor + batch_size > len(order):  # new epoch, new order
            order, cursor = torch.randperm(len(pairs), generator=generator), 0
        rows = order[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        loss = batch_loss(model, all_ids[rows], all_mask[rows], all_labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def batch_loss(model: torch.nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy on the labelled (completion) tokens of one left-padded batch."""
    start = int((mask.sum(0) == 0).sum())  # drop columns that are padding in every row
    ids, mask, labels = ids[:, start:], mask[:, start:], labels[:, start:]
    positions = positions_from_mask(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )
