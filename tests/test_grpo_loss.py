"""Our GRPO loss, gradients and advantages equal TRL 1.16 GRPOTrainer's on the same batch, for a
tiny GPT-2 and a tiny Qwen3 (the paper-scale architecture)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer as TRLTrainer

from inner.grpo import completion_logps, group_advantages, grpo_loss
from inner.models import tiny_gpt2

B, G, P, C = 8, 4, 5, 6  # rows, generations per prompt, prompt and completion lengths
PRESET_REWARDS: list[float] = []  # what the TRL reward function returns on its next call


def preset_reward(completions, **kwargs) -> list[float]:
    return list(PRESET_REWARDS)


@pytest.fixture(scope="module", params=["gpt2", "qwen3"])
def trl_trainer(request, tmp_path_factory):
    """One real TRL GRPOTrainer per architecture (CPU, fp32); tests flip its loss settings."""
    from inner.tokenizer import build_char_tokenizer

    # TRL (beta > 0) rebuilds its reference model from the model's path, so give it one.
    if request.param == "qwen3":
        path = request.getfixturevalue("tiny_qwen3_dir")
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = build_char_tokenizer()
        path = tmp_path_factory.mktemp("tiny")
        tiny = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=1)
        tiny.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = TRLConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        activation_checkpointing=False,
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=B,
        num_generations=G,
        max_completion_length=C,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        temperature=0.7,
        top_k=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = Dataset.from_dict({"prompt": ["12+34=", "5+67=", "8+9=", "70+1="]})
    trainer = TRLTrainer(
        model=model,
        reward_funcs=preset_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by HF's training loop otherwise
    trainer.model.train()
    return trainer


def make_batch(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A batch with ragged completions, plus off-policy old log-probs so clipping engages."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=gen)
    completion_ids = torch.randint(3, vocab, (B, C), generator=gen)
    lengths = torch.randint(1, C + 1, (B,), generator=gen)
    completion_mask = (torch.arange(C) < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
        logps, _ = completion_logps(model, input_ids, attention_mask, C, temperature=0.7)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": logps + 0.3 * torch.randn(B, C, generator=gen),
        "ref_per_token_logps": logps + 0.5 * torch.randn(B, C, generator=gen),
    }


def loss_and_grads(model, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.04, 0.0])
@pytest.mark.parametrize("off_policy", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_loss_and_gradients_match_trl(trl_trainer, loss_type, beta, off_policy, bias_correction):
    trainer, model = trl_trainer, trl_trainer.model
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = bias_correction
    inputs = make_batch(model, seed=hash((loss_type, beta, off_policy)) % 1000)
    if not off_policy:  # num_iterations == 1: TRL then uses detached current log-probs
        del inputs["old_per_token_logps"]

    trl_loss, trl_grads = loss_and_grads(model, lambda: trainer._compute_loss(model, inputs))

    def ours():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _ = completion_logps(model, input_ids, attention_mask, C, temperature=0.7)
        loss, _ = grpo_loss(
            logps,
            inputs.get("old_per_token_logps"),
            inputs["ref_per_token_logps"] if beta else None,
            inputs["advantages"],
            inputs["completion_mask"],
            beta=beta,
            epsilon_low=0.2,
            epsilon_high=0.28,
            loss_type=loss_type,
            max_completion_length=C,
            use_bias_correction_kl=bias_correction,
        )
        return loss

    our_loss, our_grads = loss_and_grads(model, ours)
    assert trl_loss.abs() > 1e-4  # a non-trivial loss, so the comparison means something
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-5, rtol=1e-5)
    for ours_g, theirs_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, theirs_g, atol=1e-5, rtol=1e-5)


def test_metrics_match_trl(trl_trainer):
    """clip ratios, kl and entropy: TRL's logged values for the same batch."""
    trainer, model = trl_trainer, trl_trainer.model
    trainer.loss_type, trainer.beta = "grpo", 0.04
    trainer.args.use_bias_correction_kl = True
    inputs = make_batch(model, seed=7)
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer._compute_loss(model, inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, entropy = completion_logps(
            model, input_ids, attention_mask, C, temperature=0.7, compute_entropy=True
        )
        _, stats = grpo_loss(
            logps,
            inputs["old_per_token_logps"],
            inputs["ref_per_token_logps"],
            inputs["advantages"],
            inputs["completion_mask"],
            beta=0.04,
            epsilon_low=0.2,
            epsilon_high=0.28,
            loss_type="grpo",
            max_completion_length=C,
        )
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mask = inputs["completion_mask"].float()
    stats["entropy"] = (entropy * mask).sum() / mask.sum()
    assert logged["clip_ratio/region_mean"] > 0  # clipping is exercised
    for key in ["kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"]:
        assert float(stats[key]) == pytest.approx(logged[key], abs=1e-5), key
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(
        logged["clip_ratio/region_mean"], abs=1e-5
    )


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(trl_trainer, scale_rewards):
    """TRL's own reward -> advantage path (_generate_and_score_completions) on preset rewards."""
    trainer = trl_trainer
    trainer.scale_rewards = scale_rewards
    gen = torch.Generator().manual_seed(3)
    rewards = (torch.rand(B, generator=gen) > 0.5).float()
    rewards[:G] = 1.0  # one group with zero std
    PRESET_REWARDS[:] = rewards.tolist()
    prompts = ["12+34=", "5+67="]
    inputs = [{"prompt": p} for p in prompts for _ in range(G)]
    trainer._metrics["train"].clear()
    out = trainer._generate_and_score_completions(inputs)
    ours, group_std = group_advantages(rewards, G, scale_rewards)
    torch.testing.assert_close(ours, out["advantages"], atol=1e-6, rtol=1e-6)
    logged = trainer._metrics["train"]
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()
    if scale_rewards != "batch":  # TRL's logged fraction is per batch under batch scaling
        assert float(zero_std) == pytest.approx(logged["frac_reward_zero_std"][-1])
    assert float(rewards.std()) == pytest.approx(logged["reward_std"][-1])
