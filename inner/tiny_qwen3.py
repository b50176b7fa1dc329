"""A tiny Qwen3 built locally: the paper-scale model path, proven on CPU without the hub.

`build_tiny_qwen3(out)` writes a directory that `inner.models.load_model` loads as it loads
Qwen/Qwen3-0.6B: a `Qwen3ForCausalLM` with random weights (2 layers, hidden size 64), a
byte-level BPE tokenizer trained with `tokenizers` on the embedded tasks' text, with Qwen3's
special tokens, and a chat template with Qwen3's layout and its `enable_thinking` switch.
`sft_steps > 0` adds a short supervised warm start on the tasks' worked solutions through the
chat template, so that rewards are not all zero. Command line:

    python -m inner.tiny_qwen3 --out DIR [--sft-steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from inner.models import seeded_model
from inner.prompts import SYSTEM_PROMPT, PromptFormat
from inner.sft import sft
from inner.tasks import get_task, task_names

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")  # plain added tokens, as in Qwen3: decoding keeps them

# Qwen3's template for conversations without tools, rendering what it renders: the system
# message first, assistant turns after the last user message with their think block, and
# `enable_thinking=false` writing an empty think block after the generation prompt.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501


def task_pairs(per_task: int = 256) -> dict[str, list[tuple[str, str]]]:
    """Task name -> (prompt, worked solution) pairs of its embedded dev split (offline, cached)."""
    return {
        name: [(e.prompt, e.solution) for e in get_task(name).examples("dev")[:per_task]]
        for name in task_names()
    }


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with Qwen3's special tokens and template.

    The vocabulary stops short of `vocab_size` once every word of `texts` is one token (about
    500 on the tasks' text)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,  # Qwen3's chat eos: the end of the assistant's turn
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(list(THINK_TOKENS))
    return tokenizer


def tiny_qwen3(
    tokenizer: PreTrainedTokenizerFast,
    n_layer: int = 2,
    hidden_size: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 (grouped-query attention, tied embeddings, as Qwen3-0.6B)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        head_dim=hidden_size // n_head,
        max_position_embeddings=4096,  # room for the paper-scale completion lengths
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = seeded_model(Qwen3ForCausalLM, config, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return model


def build_tiny_qwen3(
    out: str | Path,
    *,
    vocab_size: int = 1024,
    n_layer: int = 2,
    hidden_size: int = 64,
    sft_steps: int = 0,
    sft_tasks: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write a loadable tiny Qwen3 model directory (config, weights, tokenizer) to `out`.

    The tokenizer learns from every task's text; the warm start (`sft_steps` AdamW steps) uses
    the tasks in `sft_tasks` (default: all).
    """
    pairs = task_pairs()
    unknown = sorted(set(sft_tasks or ()) - set(pairs))
    if unknown:
        raise ValueError(f"sft_tasks: unknown tasks {unknown}; choose from {sorted(pairs)}")
    # The system prompt is in every chat prompt: in the corpus it becomes a few tokens.
    corpus = [f"{SYSTEM_PROMPT}\n{p}{s}" for rows in pairs.values() for p, s in rows]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size)
    model = tiny_qwen3(tokenizer, n_layer=n_layer, hidden_size=hidden_size, seed=seed)
    if sft_steps > 0:
        chat = PromptFormat(tokenizer)
        warm = [(chat.render(p), s) for t in sft_tasks or pairs for p, s in pairs[t]]
        sft(model, tokenizer, warm, sft_steps, lr=3e-3, batch_size=16, seed=seed)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m inner.tiny_qwen3",
        description="Write a tiny Qwen3 model directory (CPU, offline) that loads as Qwen3-0.6B.")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (at most)")
    parser.add_argument("--sft-steps", type=int, default=0,
                        help="supervised warm start on the tasks' solutions (0: random weights)")
    parser.add_argument("--sft-tasks", nargs="+", metavar="TASK", help="warm-start tasks (all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_qwen3(args.out, vocab_size=args.vocab_size, n_layer=args.layers,
                           hidden_size=args.hidden_size, sft_steps=args.sft_steps,
                           sft_tasks=tuple(args.sft_tasks or ()) or None, seed=args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
