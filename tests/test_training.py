"""The sampler and the training signal: KV-cache decoding matches transformers; GRPO learns."""

from __future__ import annotations

import pytest
import torch

from inner.base_model import load_base_model
from inner.config import GRPOConfig
from inner.decode import gpt2_decode_step
from inner.grpo import completion_logps
from inner.models import autocast_forward, tiny_gpt2
from inner.rollout import generate, make_cache, positions_from_mask, sample_next
from inner.sft import sft
from inner.trainer import Trainer


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


PROMPTS = ["12+34=", "5+6=", "70+19=", "3+88="]  # different lengths: left padding matters
PROMPTS_OF_ALL_TASKS = [
    "What is 2+7-5?\n",
    "Compute 6*9.\n",
    "Use 3,4,5 to make 17.\n",
    "A: B knight; B: A knave and C knight; C: C knight\n",
]


def transformers_greedy(model, ids, mask, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    """The completions of transformers' own greedy `generate` (the reference for ours)."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=model.config.pad_token_id,
    )[:, ids.size(1) :]


def test_greedy_matches_transformers_generate_with_eos(causal_lm):
    """GPT-2 decodes through the fast step, Qwen3 through model(...) with our KV cache."""
    model, tokenizer = causal_lm
    ids, mask = left_padded(tokenizer, PROMPTS)
    free, _ = generate(model, ids, mask, 12, None, tokenizer.pad_token_id, greedy=True)
    eos = int(free[0, 3])  # a token greedy decoding does emit, so rows stop at different steps
    ours, ours_mask = generate(model, ids, mask, 12, eos, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(ours, transformers_greedy(model, ids, mask, 12, eos))
    # Mask: 1 through the first EOS, 0 after; rows without EOS run to the end.
    for row, row_mask in zip(ours.tolist(), ours_mask.tolist(), strict=True):
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert row_mask == [1] * stop + [0] * (len(row) - stop)
        assert all(t == tokenizer.pad_token_id for t in row[stop:])


def test_sampling_is_seeded_and_groups_share_a_prefill(causal_lm):
    model, tokenizer = causal_lm
    ids, mask = left_padded(tokenizer, PROMPTS)

    def sample(seed: int, **kwargs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, 10, None, 0, generator=gen, **kwargs)[0]

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    # A nucleus smaller than the top token's mass is greedy decoding.
    greedy, _ = generate(model, ids, mask, 10, None, 0, greedy=True)
    assert torch.equal(sample(3, top_p=1e-6, temperature=0.8), greedy)
    # Prefill once + copy the cache G times == decoding the repeated prompts.
    grouped, _ = generate(model, ids, mask, 10, None, 0, greedy=True, num_return_sequences=3)
    assert torch.equal(grouped, greedy.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fast_gpt2_decode_step_gives_the_models_own_logits(tokenizer, autocast):
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=1).eval()
    if autocast:  # bf16 sampling keeps the fast step, inside the same autocast region
        autocast_forward(model, torch.bfloat16)
    ids, mask = left_padded(tokenizer, PROMPTS)
    fast_step = gpt2_decode_step(model)
    assert fast_step is not None
    caches = [make_cache(model, ids.size(1) + 6) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                cache=cache,
                use_cache=True,
            )
        positions = mask.sum(-1)
        tokens = torch.tensor([5, 9, 14, 30])
        for t in range(6):  # feed the same tokens to both; left padding stays masked throughout
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ours = fast_step(tokens, positions + t, mask, caches[0])
            theirs = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=(positions + t)[:, None],
                cache=caches[1],
                use_cache=True,
            ).logits[:, -1]
            # Bit-identical on this machine; other CPUs' kernels may round differently.
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"token {t}")
            assert ours.dtype == (torch.bfloat16 if autocast else torch.float32)
            tokens = theirs.argmax(-1)
    if autocast:
        return
    # Variants it does not cover decode through model(...).
    model.set_attn_implementation("eager")
    assert gpt2_decode_step(model) is None
    model.config.scale_attn_by_inverse_layer_idx = True
    model.set_attn_implementation("sdpa")
    assert gpt2_decode_step(model) is None


def test_models_without_the_fast_step_decode_through_model_forward():
    # The shipped model answers from its prompt, so wrong positions or padding change its output.
    model, tokenizer = load_base_model()
    model.set_attn_implementation("eager")  # a GPT-2 variant the fast step does not cover
    assert gpt2_decode_step(model) is None
    ids, mask = left_padded(tokenizer, PROMPTS_OF_ALL_TASKS)
    ours, _ = generate(model, ids, mask, 12, None, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(ours, transformers_greedy(model, ids, mask, 12, None))


def test_sample_next_follows_temperature_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).expand(40000, 5)
    gen = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = sample_next(logits, temperature, 1.0, gen)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        torch.testing.assert_close(freq, (logits[0] / temperature).softmax(-1), atol=0.01, rtol=0)
    probs = logits[0].softmax(-1)  # ~[.61, .22, .14, .03, .00]: top_p=0.8 keeps the first two
    draws = sample_next(logits, 1.0, 0.8, gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.zeros(5)
    expected[:2] = probs[:2] / probs[:2].sum()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("n", [7, 1])  # n=1: the prefix alone predicts the only token
def test_shared_prompt_logps_equal_full_forward(causal_lm, n):
    """Running each group's prompt once (shared KV) gives the full forward's log-probs and grads."""
    tiny_model, tokenizer = causal_lm
    gen = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = left_padded(tokenizer, PROMPTS)
    group = 3
    completions = torch.randint(3, len(tokenizer), (len(PROMPTS) * group, n), generator=gen)
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 4:] = 0  # a sequence that ended early (no-op for n=1)
    input_ids = torch.cat([prompt_ids.repeat_interleave(group, 0), completions], 1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(group, 0), completion_mask], 1)
    results = []
    for g in (1, group):
        tiny_model.zero_grad(set_to_none=True)
        logps, entropy = completion_logps(
            tiny_model, input_ids, attention_mask, n, 0.7, compute_entropy=True, num_generations=g
        )
        (logps * completion_mask).sum().backward()
        results.append((logps.detach(), entropy, [p.grad.clone() for p in tiny_model.parameters()]))
    (full_lp, full_ent, full_grads), (lp, ent, grads) = results
    torch.testing.assert_close(lp, full_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grpo_learns_and_shuffled_rewards_do_not(tokenizer, task_factory):
    """Warm start by SFT, then GRPO gains dev accuracy; the same run, rewards shuffled, does not."""
    task = task_factory(n_dev=200)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=96, n_head=4, n_positions=32, seed=0)
    pairs = [(ex.prompt, ex.answer) for ex in task.examples("train")]
    trainer = Trainer(model, tokenizer, task, seed=0, dev_size=200, eval_max_new_tokens=5)
    # SFT until the held-out *test* split shows a usable warm start (>= 35%) with room above it:
    # where a tiny model crosses that threshold varies with float details across machines and
    # library versions (50-step chunks once overshot to 65%), so stop on the outcome.
    for chunk in range(24):
        sft(model, tokenizer, pairs, steps=25, lr=4e-3, batch_size=128, seed=chunk)
        if chunk >= 4 and trainer.evaluate("test").accuracy >= 0.35:
            break
    trainer = Trainer(model, tokenizer, task, seed=0, dev_size=200, eval_max_new_tokens=5)
    base = trainer.evaluate().accuracy
    start = trainer.save_state()
    config = GRPOConfig(
        learning_rate=3e-4,
        beta=0.04,
        prompts_per_step=16,
        num_generations=8,
        max_completion_length=5,
    )
    trainer.train_stage(config, 40)
    learned = trainer.evaluate().accuracy

    trainer.load_state(start)  # same start, same prompts and sampling seed; rewards permuted
    trainer.shuffle_rewards = True
    trainer.train_stage(config, 40)
    control = trainer.evaluate().accuracy
    print(
        f"dev accuracy: base {base:.3f}, GRPO {learned:.3f}, shuffled-reward control {control:.3f}"
    )

    assert base >= 0.25  # the warm start worked
    assert learned >= base + 0.04
    assert control <= base + 0.02
    assert learned >= control + 0.15


def test_evaluating_more_items_than_the_split_holds_is_an_error(tokenizer, task_factory):
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=32, seed=0)
    trainer = Trainer(model, tokenizer, task_factory(n_dev=5), dev_size=8, eval_max_new_tokens=2)
    with pytest.raises(ValueError, match="addition: 8 dev examples asked, the dev split holds 5"):
        trainer.evaluate()
    assert len(trainer.evaluate("dev", n=5).samples) == 5


def test_dropping_finished_rows_changes_no_sample(monkeypatch):
    # The sampler drops rows once they have produced EOS; each row's noise is drawn for the
    # whole batch, so every row samples exactly what it would in the full batch.
    import inner.rollout as rollout

    model, tokenizer = load_base_model()
    ids, mask = left_padded(tokenizer, PROMPTS_OF_ALL_TASKS)
    outputs, dropped = {}, []
    select = rollout.PreallocatedLayer.batch_select_indices
    monkeypatch.setattr(rollout.PreallocatedLayer, "batch_select_indices",
                        lambda layer, keep: dropped.append(len(keep)) or select(layer, keep))
    for compact in (True, False):
        if not compact:
            assert dropped  # the first pass did drop rows
            monkeypatch.setattr(rollout, "_compactable", lambda cache: False)
        generator = torch.Generator().manual_seed(0)
        sampled = generate(model, ids, mask, 48, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           generator=generator, num_return_sequences=8)
        greedy = generate(model, ids, mask, 48, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          greedy=True)
        outputs[compact] = (*sampled, *greedy)
    lengths = outputs[True][1].sum(-1)
    assert lengths.min() < lengths.max()  # rows did finish at different times
    for ours, full in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(ours, full)
