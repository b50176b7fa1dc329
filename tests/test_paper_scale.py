"""Paper scale on CPU: a tiny Qwen3 built locally, through its chat template, the whole env on
local data files, every controller, the full-preset leaderboard, bf16 and the GPU check."""

from __future__ import annotations

import json
import math

import datasets
import gymnasium as gym
import numpy as np
import pytest
import torch
from test_paper_data import gsm8k_row, write_jsonl

import controllers
import metaenv  # noqa: F401  (registers the env ids)
from benchmarks import gpu_check
from benchmarks.leaderboard import runlog
from benchmarks.leaderboard.harness import main as leaderboard
from benchmarks.leaderboard.harness import registered_controllers
from inner.config import GRPOConfig
from inner.models import load_model
from inner.prompts import SYSTEM_PROMPT, PromptFormat, final_answer
from inner.state import TrainState
from inner.tasks import get_task
from inner.tiny_qwen3 import build_tiny_qwen3
from inner.tiny_qwen3 import main as tiny_qwen3_cli
from inner.trainer import Trainer

# The local GSM8K rows take one or four calculation steps: difficulty levels 1 and 2 (0 = all).
GRID = {"learning_rate": [1e-3, 3e-2], "beta": [0.0, 0.04], "temperature": [1.0],
        "num_generations": [4], "max_completion_length": [16, 24],
        "difficulty": [0, 2]}
# Two stages of one step, 2 prompts x 4 completions of <= 24 tokens, 8 dev and 4 test answers.
PAPER = dict(scale="paper", stages=2, steps_per_stage=1, dev_size=8, test_size=4,
             eval_max_new_tokens=24, dev_metric="mean_score",
             fixed_hparams={"prompts_per_step": 2}, hparam_grid=GRID)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Local files only: the hub is switched off for `datasets`."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """DIR/gsm8k/{train,test}.jsonl in the hub dataset's columns (dev is carved from train)."""
    root = tmp_path_factory.mktemp("paper-data")
    write_jsonl(root / "gsm8k" / "train.jsonl", [gsm8k_row(i) for i in range(40)])
    write_jsonl(root / "gsm8k" / "test.jsonl", [gsm8k_row(i) for i in range(100, 112)])
    return root


def make_env(model_dir: str, data_root, **overrides) -> gym.Env:
    return gym.make("LLMZero-GSM8K-v0", model=model_dir, data_path=str(data_root / "gsm8k"),
                    **(PAPER | overrides))


@pytest.fixture(scope="module")
def env(tiny_qwen3_dir, data_root):
    env = make_env(tiny_qwen3_dir, data_root)
    yield env
    env.close()


# ---------------------------------------------------------------- the model and its template


def test_tiny_qwen3_command_writes_a_directory_that_loads_as_qwen3(tmp_path):
    tiny_qwen3_cli(["--out", str(tmp_path / "a")])
    model, tokenizer = load_model(str(tmp_path / "a"))
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.model_type == "qwen3"
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left" and 300 < len(tokenizer) <= 1024
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # Byte-level BPE: any text encodes and decodes back; the think tags are single tokens that
    # decoding keeps (as Qwen3's), while the chat's special tokens are dropped.
    text = "Größe 3×4 = 12 ✓ 🙂 \\boxed{x}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer("<think>a</think><|im_end|>")["input_ids"]
    assert len(tokenizer("</think>")["input_ids"]) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>"
    # The same seed builds the same directory.
    build_tiny_qwen3(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json").read_text()
    again, _ = load_model(str(tmp_path / "b"))
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown tasks"):
        build_tiny_qwen3(tmp_path / "c", sft_steps=1, sft_tasks=("chess",))


def test_chat_template_lays_out_turns_as_qwen3(tiny_qwen3_dir):
    _, tokenizer = load_model(tiny_qwen3_dir)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]

    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    head = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert render(chat, add_generation_prompt=True, enable_thinking=False) == (
        head + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(chat, add_generation_prompt=True, enable_thinking=True) == (
        head + "<|im_start|>assistant\n")
    assert render(chat, add_generation_prompt=True) == head + "<|im_start|>assistant\n"
    # Past assistant turns lose their thoughts; the one after the last user message keeps them.
    turns = [{"role": "user", "content": "U1"},
             {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
             {"role": "user", "content": "U2"},
             {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}]
    assert render(turns) == (
        "<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")


def test_prompts_use_the_chat_template_only_when_the_tokenizer_has_one(tiny_qwen3_dir,
                                                                       tokenizer):
    _, qwen = load_model(tiny_qwen3_dir)
    chat = PromptFormat(qwen)
    rendered = chat.render("What is 2+3?\n")
    assert chat.chat and rendered == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+3?\n"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert PromptFormat(qwen, enable_thinking=True).render("Q").endswith("assistant\n")
    assert PromptFormat(qwen, system_prompt=None).render("Q").startswith("<|im_start|>user\nQ")
    ids, mask = chat.encode(["What is 2+3?\n", "Q"], "cpu")
    assert ids[0].tolist() == qwen(rendered, add_special_tokens=False)["input_ids"]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padding
    raw = PromptFormat(tokenizer)  # the char-level tokenizer has no template: raw prompts
    assert not raw.chat and raw.render("12+34=") == "12+34="
    assert raw.encode(["12+34="], "cpu")[0][0].tolist() == tokenizer("12+34=")["input_ids"]


def test_completions_are_scored_on_the_answer_after_the_thoughts():
    task = get_task("gsm8k")
    example = task.examples("dev")[0]
    right, wrong = f"#### {example.answer}", f"#### {int(example.answer) + 1}"
    assert final_answer(f"<think>\n{wrong}\n</think>\n\n{right}") == f"\n\n{right}"
    assert final_answer(right) == right
    assert task.score(final_answer(f"<think>{right}</think>{wrong}"), example) == 0.1
    assert task.score(final_answer(f"<think>{wrong}</think>{right}"), example) == 1.0
    assert task.score(final_answer(f"<think>{right}</think>"), example) == 0.0


# ---------------------------------------------------------------- the env on the tiny Qwen3


def test_paper_env_trains_forks_and_replays_bit_identically(env):
    uenv = env.unwrapped
    obs, info = env.reset(seed=0)
    assert uenv.scale == "paper" and uenv.trainer.prompt_format.chat
    assert info["samples"][0]["prompt"].startswith("Tom has")  # the local file's question
    root = uenv.save_state()
    weights0 = {k: v.clone() for k, v in uenv.trainer.model.state_dict().items()}
    actions = [uenv.hparams.encode({"learning_rate": 3e-2, "max_completion_length": 24}),
               uenv.hparams.encode({"learning_rate": 1e-3, "beta": 0.04})]

    def run() -> tuple[list, dict]:
        out = [env.step(a) for a in actions]
        return out, {k: v.clone() for k, v in uenv.trainer.model.state_dict().items()}

    first, weights1 = run()
    history = first[-1][4]["history"]
    assert any(m["grad_norm"] > 0 for m in history)  # rewards varied: the weights really moved
    assert any(not torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert uenv._store.num_on_disk >= 1  # paper scale keeps saved states on disk
    uenv.load_state(root)
    second, weights2 = run()
    for (o1, r1, *_, i1), (o2, r2, *_, i2) in zip(first, second, strict=True):
        assert np.array_equal(o1, o2) and r1 == r2
        assert i1["history"] == i2["history"] and i1["samples"] == i2["samples"]
    assert all(torch.equal(weights1[k], weights2[k]) for k in weights1)
    score = uenv.evaluate_test()
    assert 0.0 <= score <= 1.0 and uenv.budget.test_evals == 1


def test_paper_env_forced_divergence_truncates_and_reset_recovers(tiny_qwen3_dir, data_root):
    # lr x weight_decay = 1e37: AdamW's decay overflows the weights' norm whatever the gradients.
    env = make_env(tiny_qwen3_dir, data_root, hparam_grid=GRID | {"learning_rate": [1e-3, 1e30],
                                                                  "weight_decay": [0.0, 1e7]})
    env.reset(seed=0)
    space = env.unwrapped.hparams
    obs, reward, terminated, truncated, info = env.step(
        space.encode({"learning_rate": 1e30, "weight_decay": 1e7}))
    assert truncated and not terminated and "divergence" in info["pathologies"]
    assert info["failure"] == "non_finite_weights" and info["dev_score"] == 0.0
    env.reset(seed=0)
    obs, _, _, truncated, info = env.step(space.encode({"learning_rate": 1e-3}))
    assert not truncated and np.isfinite(obs).all()
    env.close()


def test_data_path_is_refused_at_the_embedded_scale(data_root):
    with pytest.raises(ValueError, match="data_path is for scale='paper'"):
        gym.make("LLMZero-GSM8K-v0", data_path=str(data_root / "gsm8k"))


@pytest.mark.parametrize("name", registered_controllers())
def test_every_offline_controller_runs_on_the_tiny_qwen3(env, name):
    before = env.unwrapped.budget.stages
    result = controllers.make(name).run(env, 2, seed=0)  # sb3: the shipped policy
    spent = env.unwrapped.budget.stages - before
    assert 1 <= spent <= 2 and result.cost["stages"] == spent
    assert math.isfinite(result.dev_score)
    # The best dev state, the root included; a tree search chooses among whole schedules.
    whole = result.tree is not None and len(result.schedule) == env.unwrapped.stages
    assert result.dev_score >= result.base_dev_score or whole
    env.unwrapped.load_state(result.final_state)
    assert env.unwrapped.dev_score == result.dev_score


def test_full_preset_leaderboard_on_a_local_model_and_data(tiny_qwen3_dir, data_root,
                                                           tmp_path, capsys):
    env_kwargs = {k: PAPER[k] for k in ("eval_max_new_tokens", "fixed_hparams", "hparam_grid")}
    args = ["--preset", "full", "--model", tiny_qwen3_dir, "--data-path", str(data_root),
            "--tasks", "gsm8k", "--controllers", "fixed", "--seeds", "0", "--budget", "1",
            "--stages", "1", "--steps-per-stage", "1", "--dev-size", "4", "--test-size", "4",
            "--env-kwargs", json.dumps(env_kwargs), "--threads", "1", "--out", str(tmp_path),
            "--no-report"]
    assert leaderboard(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "runs=1 tasks=1 controllers=1 wall_s=")
    fixed = runlog.load_runs(tmp_path)[("gsm8k", "fixed", 0)]
    assert fixed.stages_spent == 1 and 0.0 <= fixed.test_score <= 1.0
    settings = fixed.settings["env_kwargs"]
    assert settings["scale"] == "paper" and settings["model"] == tiny_qwen3_dir
    assert settings["data_path"] == str(data_root / "gsm8k")
    with pytest.raises(SystemExit, match="no data for math"):
        leaderboard([*args[:6], "--tasks", "math", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="with the paper scale"):
        leaderboard(["--preset", "quick", "--data-path", str(data_root), "--out",
                     str(tmp_path / "y")])


# ---------------------------------------------------------------- bf16 and state sizes


@pytest.fixture(scope="module")
def gsm8k():
    """The embedded GSM8K problems: the tiny Qwen3's warm start answers some of them."""
    return get_task("gsm8k")


def test_bf16_autocast_keeps_fp32_weights_and_moments(causal_lm, task):
    model, tokenizer = causal_lm
    trainer = Trainer(model, tokenizer, task, seed=0, bf16=True, eval_max_new_tokens=4)
    seen = []
    for m in (trainer.model, trainer.ref_model):
        m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    assert trainer.ref_model.forward.__self__ is trainer.ref_model  # the copy wraps itself
    config = GRPOConfig(learning_rate=1e-3, beta=0.04, num_generations=4, prompts_per_step=2,
                        max_completion_length=8)
    result = trainer.train_stage(config, 2)
    assert result.failure is None and all(math.isfinite(m["loss"]) for m in result.metrics)
    trainer.evaluate("dev", n=2)  # GPT-2 leaves its fast decode step for the wrapped forward
    assert set(seen) == {torch.bfloat16}  # every forward, policy and reference, ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    moments = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)


def test_bf16_weights_save_and_load_through_disk_bit_identically(tiny_qwen3_dir, gsm8k,
                                                                 tmp_path):
    model, tokenizer = load_model(tiny_qwen3_dir, dtype=torch.bfloat16)
    trainer = Trainer(model, tokenizer, gsm8k, seed=0, eval_max_new_tokens=8)
    config = GRPOConfig(learning_rate=1e-3, num_generations=4, prompts_per_step=4,
                        max_completion_length=24)
    trainer.train_stage(config, 1)
    trainer.save_state_to_disk(tmp_path / "s")

    def train() -> tuple[list[dict], dict]:
        metrics = trainer.train_stage(config, 2).metrics
        kept = [{k: v for k, v in m.items() if k != "step_time"} for m in metrics]
        return kept, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    first = train()
    saved = TrainState.load(tmp_path / "s")
    params = dict(trainer.model.named_parameters())  # (the rotary buffer stays fp32)
    assert {saved.weights[name].dtype for name in params} == {torch.bfloat16}
    moment = next(iter(saved.optimizer["state"].values()))["exp_avg"]
    assert moment.dtype == torch.bfloat16
    trainer.load_state_from_disk(tmp_path / "s")
    second = train()
    assert first[0] == second[0] and any(m["grad_norm"] > 0 for m in first[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_state_size_formula_matches_a_saved_state(tiny_qwen3_dir, gsm8k, tmp_path):
    model, tokenizer = load_model(tiny_qwen3_dir)
    trainer = Trainer(model, tokenizer, gsm8k, seed=0, eval_max_new_tokens=8)
    trainer.train_stage(GRPOConfig(num_generations=2, prompts_per_step=2,
                                   max_completion_length=4), 1)
    state = trainer.save_state()
    params = sum(p.numel() for p in trainer.params)  # tied embeddings counted once
    # Beyond weights and moments a state holds only the rotary buffer and AdamW's step counts.
    formula = gpu_check.state_bytes(params)
    assert formula <= gpu_check.tensor_bytes(state) < 1.01 * formula
    state.save(tmp_path / "s")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").iterdir())
    assert 1.0 <= on_disk / gpu_check.tensor_bytes(state) < 1.1
    # Qwen3-0.6B: ~0.6B parameters (0.44B without the embeddings), 12 bytes each in a state.
    big = gpu_check.count_params(gpu_check.QWEN3_0_6B)
    assert 590e6 < big < 600e6 and gpu_check.state_bytes(big) == 12 * big


def test_gpu_check_runs_on_cpu_with_the_tiny_qwen3_it_builds(capsys):
    code = gpu_check.main(["--device", "cpu", "--steps", "2", "--prompts-per-step", "2",
                           "--num-generations", "2", "--max-completion-length", "8",
                           "--dev-size", "2", "--probe-mb", "4", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].startswith("no GPU: built a tiny Qwen3")
    values = dict(item.split("=", 1) for item in lines[-1].split())
    assert float(values["tokens_per_s"]) > 0 and float(values["peak_mem_gb"]) > 0
    assert float(values["fork_s"]) > 0 and float(values["state_mb"]) > 1
    assert values["device"] == "cpu" and values["model"] == "tiny-qwen3"
    assert values["oom"] == "0" and values["prompts_per_step"] == "2"
    assert any("Qwen3-0.6B (596M params" in line for line in lines)
