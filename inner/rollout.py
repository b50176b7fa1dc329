"""Batched sampling with our own KV cache, token by token in plain PyTorch, over any causal LM."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from inner.decode import decode_step


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache, written in place into a buffer sized for the whole rollout.

    transformers' DynamicLayer concatenates (a full copy of the cache) on every token; here each
    token is one slice assignment and attention reads a view of the filled part.
    """

    def __init__(self, max_len: int, **kwargs):
        super().__init__(**kwargs)
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.max_len, dim)
        self.value_buffer = value_states.new_empty(
            batch, heads, self.max_len, value_states.size(-1)
        )
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.size(-2)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Expand each row `repeats` times (a prompt prefilled once, then sampled G times)."""
        if self.is_initialized:
            self._set_buffers(self.key_buffer.repeat_interleave(repeats, dim=0),
                              self.value_buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (the sampler drops rows that have finished)."""
        if self.is_initialized:
            self._set_buffers(self.key_buffer[indices], self.value_buffer[indices])

    def _set_buffers(self, keys: Tensor, values: Tensor) -> None:
        self.key_buffer, self.value_buffer = keys, values
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        super().reset()


def make_cache(model: torch.nn.Module, max_len: int) -> DynamicCache:
    """The model's cache layout, its plain full-attention layers replaced by preallocated ones."""
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # no layer types in the config: one full-attention layer per block
        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in range(model.config.num_hidden_layers)]
    cache.layers = [
        PreallocatedLayer(max_len) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
    rows: Tensor | None = None, batch: int | None = None,
) -> Tensor:
    """Sample one token per row from last-position logits with temperature and nucleus (top_p).

    `rows` (of a `batch`): the rows of the full batch that `logits` holds. The noise is drawn for
    the full batch and these rows take theirs, so a row's sample does not depend on which other
    rows are still decoding (the sampler drops finished ones).
    """
    logits = logits.float() / temperature
    if top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (always the top token).
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), is an exact categorical sample. Unlike
    # torch.multinomial it never raises on NaN probabilities (a diverged model), so the trainer can
    # report the divergence from the loss instead of crashing inside the sampler.
    if rows is None or len(rows) == batch:
        race = torch.empty_like(probs).exponential_(generator=generator)
    else:
        race = probs.new_empty(batch, probs.size(-1)).exponential_(generator=generator)[rows]
    return (probs / race).argmax(-1)


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
    num_return_sequences: int = 1,
) -> tuple[Tensor, Tensor]:
    """Complete left-padded prompts; return (completion_ids, completion_mask), (B * n, <=max_new).

    Each prompt is prefilled once and sampled num_return_sequences times (rows prompt-major, as
    repeat_interleave). The mask is 1 up to and including the first EOS; ids after it are
    pad_token_id. The loop stops once every row has produced EOS; eos_token_id=None never stops.
    """
    unique, prompt_len = prompt_ids.shape
    batch = unique * num_return_sequences
    device = prompt_ids.device
    # Never run past the model's position table (absolute-position models would index out of range).
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        longest = int(prompt_mask.sum(-1).max())
        max_new_tokens = max(1, min(max_new_tokens, max_positions - longest))
    # Preallocate everything the loop writes so each step is a few tensor ops, no Python per row.
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    attn = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.long, device=device)
    attn[:, :prompt_len] = prompt_mask.repeat_interleave(num_return_sequences, dim=0)
    next_pos = attn[:, :prompt_len].sum(-1)  # position id of each row's first new token
    cache = make_cache(model, prompt_len + max_new_tokens)
    decode = decode_step(model)
    # Rows that have produced EOS leave the batch (on CPU, where work scales with the rows):
    # `rows` maps the rows still decoding to their place in `out`.
    compact = device.type == "cpu" and eos_token_id is not None and _compactable(cache)
    rows = torch.arange(batch, device=device)
    was_training = model.training
    model.eval()
    logits = _prefill(model, prompt_ids, prompt_mask, cache, num_return_sequences)
    check_every = 1 if device.type == "cpu" else 8
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            token = sample_next(logits, temperature, top_p, generator, rows, batch)
        token = token.masked_fill(done, pad_token_id)  # finished rows only carry padding
        out[rows, t] = token
        steps = t + 1
        n_done = 0  # counted where checked: every token on CPU, where compaction runs
        if eos_token_id is not None:
            done |= token == eos_token_id
            # Reading `done` syncs with an accelerator, so there check it only every few tokens.
            if (t + 1) % check_every == 0:
                n_done = int(done.sum())
                if n_done == len(rows):
                    break
        if t + 1 == max_new_tokens:
            break  # the last token needs no forward pass
        if compact and 4 * n_done >= len(rows):  # a quarter done: the copy pays off
            keep = (~done).nonzero().squeeze(-1)
            rows, token, next_pos, attn = rows[keep], token[keep], next_pos[keep], attn[keep]
            cache.batch_select_indices(keep)
            done = done[keep]
        logits = decode(token, next_pos + t, attn[:, : prompt_len + t + 1], cache)
    model.train(was_training)
    return _cut_at_eos(out[:, :steps], eos_token_id)


def _compactable(cache: DynamicCache) -> bool:
    # Only our preallocated layers are known to drop rows exactly; other layer types (sliding
    # windows, quantized caches) keep every row.
    return all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def _prefill(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, cache: DynamicCache,
             num_return_sequences: int) -> Tensor:
    """Run the distinct prompts once, then copy their cache to every sample of the group; returns
    each row's next-token logits."""
    output = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions_from_mask(prompt_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if num_return_sequences > 1:
        cache.batch_repeat_interleave(num_return_sequences)
    return output.logits[:, -1].repeat_interleave(num_return_sequences, dim=0)


def _cut_at_eos(completion_ids: Tensor, eos_token_id: int | None) -> tuple[Tensor, Tensor]:
    """The completion mask (1 up to and including the first EOS), and both cut to the longest
    row (columns decoded after every row was done are dropped)."""
    if eos_token_id is None:
        return completion_ids, torch.ones_like(completion_ids)
    is_eos = completion_ids == eos_token_id
    # Tokens strictly after the first EOS are masked: count EOS seen before each position.
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()
    completion_mask = (seen_before == 0).long()
    longest = int(completion_mask.sum(-1).max())
    return completion_ids[:, :longest], completion_mask[:, :longest]
