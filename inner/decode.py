"""One-token GPT-2 forward for the sampler: transformers' arithmetic without its per-layer Python.

At the embedded scale a decode step is a few tiny matmuls, and transformers' GPT-2 forward spends
more time in Python (mask building, cache bookkeeping, output objects) than in them. This step
calls the model's own modules in the same order with the same SDPA call, so its logits are the
ones `model(...)` gives (tests/test_training.py compares them); any other model, or a GPT-2
variant it does not cover, decodes through `model(...)` (`decode_step` picks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import GPT2LMHeadModel
from transformers.cache_utils import Cache

# (tokens (B,), position ids (B,), attention mask (B, L) over cache + new token, cache) -> logits
DecodeStep = Callable[[Tensor, Tensor, Tensor, Cache], Tensor]


def decode_step(model: torch.nn.Module) -> DecodeStep:
    """The sampler's one-token forward: the GPT-2 fast path when it applies, else `model(...)`."""
    fast = gpt2_decode_step(model)
    if fast is not None:
        return fast

    def step(tokens: Tensor, positions: Tensor, attention_mask: Tensor, cache: Cache) -> Tensor:
        output = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            cache=cache,
            use_cache=True,
        )
        return output.logits[:, -1]

    return step


def gpt2_decode_step(model: torch.nn.Module) -> DecodeStep | None:
    """The fast step for a plain GPT2LMHeadModel in SDPA mode, or None when it does not apply."""
    if type(model) is not GPT2LMHeadModel:
        return None
    autocast_dtype = getattr(model, "autocast_dtype", None)  # set by inner.models.autocast_forward
    if "forward" in vars(model) and autocast_dtype is None:
        return None  # a wrapped forward that this step would skip
    config = model.config
    plain_gpt2 = (
        config._attn_implementation == "sdpa"
        and config.scale_attn_weights
        and not config.scale_attn_by_inverse_layer_idx
        and not config.reorder_and_upcast_attn
        and not config.add_cross_attention
    )
    if not plain_gpt2:
        return None
    body = model.transformer
    heads = config.n_head
    head_dim = config.n_embd // heads
    scale = head_dim**-0.5

    def step(tokens: Tensor, positions: Tensor, attention_mask: Tensor, cache: Cache) -> Tensor:
        batch = tokens.size(0)
        x = body.wte(tokens) + body.wpe(positions)
        mask = attention_mask.bool()[:, None, None, :]
        for block, layer in zip(body.h, cache.layers, strict=True):
            qkv = block.attn.c_attn(block.ln_1(x)).view(batch, 3, heads, 1, head_dim)
            keys, values = layer.update(qkv[:, 1], qkv[:, 2])
            attn = torch.nn.functional.scaled_dot_product_attention(
                qkv[:, 0], keys, values, attn_mask=mask, scale=scale
            )
            x = x + block.attn.c_proj(attn.view(batch, heads * head_dim))
            x = x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))
        return model.lm_head(body.ln_f(x))

    if autocast_dtype is None:
        return step
    device_type = next(model.parameters()).device.type

    def autocast_step(tokens: Tensor, positions: Tensor, attention_mask: Tensor,
                      cache: Cache) -> Tensor:
        # The same autocast region as the wrapped model(...) forward, so bf16 sampling keeps the
        # fast path (its logits are compared with model(...)'s in tests/test_training.py).
        with torch.autocast(device_type, dtype=autocast_dtype):
            return step(tokens, positions, attention_mask, cache)

    return autocast_step
