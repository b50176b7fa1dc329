"""Model loading: any Hugging Face causal LM (paper scale) and tiny GPT-2s (embedded, tests).

A tiny Qwen3 for the paper-scale path on CPU is built by `inner.tiny_qwen3`.
"""

from __future__ import annotations

import types

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_model(
    name_or_path: str, device: str = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or a local directory (left padding).

    Weights load in fp32 unless `dtype` says otherwise, as TRL loads them: they are the master
    weights that AdamW updates, and bf16 comes from autocast (`autocast_forward`).
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = "left"  # the sampler appends new tokens on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def seeded_model(model_class: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    """`model_class(config)` initialised from `seed` in a private RNG scope: building a model
    never disturbs the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerBase,
    n_layer: int = 2,
    n_embd: int = 144,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for CPU (defaults: ~0.5M parameters), without dropout."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # GPT-2's tanh-approximated GELU as one fused kernel instead of ~8 elementwise ops: the
        # same function, and a sizeable share of step time at this scale.
        activation_function="gelu_pytorch_tanh",
        # No dropout: GRPO's ratio and the reference KL then see the same function that sampled.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = seeded_model(GPT2LMHeadModel, config, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _autocast_forward(self: torch.nn.Module, *args, **kwargs):
    with torch.autocast(self.device.type, dtype=self.autocast_dtype):
        return type(self).forward(self, *args, **kwargs)


def autocast_forward(model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> None:
    """Run `model`'s forward under torch.autocast(dtype), as accelerate's mixed precision does.

    Parameters (and so the optimizer's moments) keep their dtype; matmuls run in `dtype`. The
    wrapper is a bound method, so a deep copy of the model (the reference model) wraps the copy.
    """
    model.autocast_dtype = dtype
    model.forward = types.MethodType(_autocast_forward, model)


# bf16 autocast pays on an accelerator. On a CPU it pays only from this many parameters
# (results/precision.md, 2 threads: a step is 0.90x as fast as fp32 at 0.84M, 1.18x at 3.25M,
# 1.28x at 10.8M; bf16 - fp32 on test of the default episode lay within +-0.02 at 0.84M, the size
# with a trained base model). None: at no size.
BF16_CPU_MIN_PARAMETERS: int | None = 3_000_000


def bf16_pays(device: torch.device, num_parameters: int) -> bool:
    """Whether `dtype="auto"` trains a model of `num_parameters` on `device` under bf16 autocast."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return BF16_CPU_MIN_PARAMETERS is not None and num_parameters >= BF16_CPU_MIN_PARAMETERS
    return False
