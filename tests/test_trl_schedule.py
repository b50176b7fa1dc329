"""A schedule runs in TRL 1.16's GRPOTrainer (CPU, tiny GPT-2): StageSchedule and export_trl."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from benchmarks import export_trl
from benchmarks.leaderboard.runlog import RunRecord, StageRecord, write_combined
from inner.config import GRPOConfig as EnvConfig
from inner.models import tiny_gpt2
from inner.tokenizer import build_char_tokenizer
from inner.trl_schedule import ScheduleRefused, StageSchedule

ROOT = Path(__file__).resolve().parents[1]
# Three stages that move every parameter TRL can take mid-run, beta through 0, and difficulty.
STAGES = [
    {"learning_rate": 1e-3, "beta": 0.04, "epsilon": 0.2, "temperature": 1.0,
     "max_completion_length": 6, "num_generations": 4, "difficulty": 1},
    {"learning_rate": 3e-4, "beta": 0.0, "epsilon": 0.1, "temperature": 0.7,
     "max_completion_length": 4, "num_generations": 4, "difficulty": 2},
    {"learning_rate": 1e-4, "beta": 0.1, "epsilon": 0.3, "temperature": 1.3,
     "max_completion_length": 8, "num_generations": 4, "difficulty": 1},
]
LEVELS = {1: [f"{a}+{b}=" for a in range(1, 10) for b in range(1, 4)],
          2: [f"{a}+{b}=" for a in range(10, 40) for b in range(10, 13)]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with the char tokenizer, saved as a local model directory (no network)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_char_tokenizer()
    tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=1).save_pretrained(
        path)
    tokenizer.save_pretrained(path)
    return path


class Probe(TrainerCallback):
    """Records, just before each optimizer step, what the trainer really uses."""

    def __init__(self) -> None:
        self.trainer, self.seen, self.prompts = None, [], {}

    def reward(self, completions, prompts, completion_ids, trainer_state, **kwargs):
        step = trainer_state.global_step
        self.prompts.setdefault(step, []).extend(prompts)
        self.lengths = [len(ids) for ids in completion_ids]
        return [float(len(c) % 3) for c in completions]  # varied rewards: non-zero advantages

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        t = self.trainer
        self.seen.append({
            "learning_rate": {g["lr"] for g in optimizer.param_groups},
            "beta": t.beta, "epsilon": t.epsilon_low, "epsilon_high": t.epsilon_high,
            "temperature": {t.temperature, t.generation_config.temperature},
            "logp_temperature": logp_temperature(t.model),
            "max_completion_length": {t.max_completion_length, t.generation_config.max_new_tokens},
            "longest_completion": max(self.lengths),
        })


def logp_temperature(model) -> float:
    """The temperature TRL's fused LM head divides by, measured from the log-probs it returns."""
    ids = torch.tensor([[5, 9, 14, 20, 7]])
    with torch.no_grad():
        mask = torch.ones_like(ids)
        fused = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
        fused = fused.log_probs[0]  # position i scores token i + 1
        logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1]
    for t in (0.7, 1.0, 1.3):
        plain = torch.log_softmax(logits / t, -1).gather(-1, ids[0, 1:, None])[:, 0]
        if torch.allclose(fused, plain, atol=1e-5):
            return t
    raise AssertionError("the fused head's log-probs match none of the temperatures")


def trainer_for(model_dir: Path, out: Path, callbacks: list, reward=None, **overrides):
    args = dict(output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False,
                report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                beta=0.04, learning_rate=1e-3, lr_scheduler_type="constant", top_k=0,
                max_steps=3)
    data = Dataset.from_dict({"prompt": LEVELS[1]})
    return GRPOTrainer(model=str(model_dir), reward_funcs=reward or (lambda completions, **k: [
        float(len(c) % 3) for c in completions]), args=GRPOConfig(**(args | overrides)),
        train_dataset=data, callbacks=callbacks)


def test_each_stage_boundary_applies_the_schedule_everywhere_trl_reads_it(model_dir, tmp_path):
    probe = Probe()
    datasets = {level: Dataset.from_dict({"prompt": p}) for level, p in LEVELS.items()}
    # Two steps per stage: the second step shows the rate survives the scheduler's step.
    schedule = StageSchedule(STAGES, steps_per_stage=2, datasets=datasets)
    trainer = trainer_for(model_dir, tmp_path, [schedule, probe], reward=probe.reward, max_steps=6)
    schedule.bind(trainer)
    probe.trainer = trainer
    trainer.train()

    stage_of_step = [stage for stage in STAGES for _ in range(2)]
    assert len(probe.seen) == len(stage_of_step)
    for stage, seen in zip(stage_of_step, probe.seen, strict=True):
        assert seen["learning_rate"] == {stage["learning_rate"]}
        assert seen["beta"] == stage["beta"]
        assert seen["epsilon"] == seen["epsilon_high"] == stage["epsilon"]
        assert seen["temperature"] == {stage["temperature"]} == {seen["logp_temperature"]}
        assert seen["max_completion_length"] == {stage["max_completion_length"]}
        assert seen["longest_completion"] == stage["max_completion_length"]
    for step, stage in enumerate(stage_of_step):  # each step drew prompts from its stage's level
        assert set(probe.prompts[step]) <= set(LEVELS[stage["difficulty"]])

    logged = [row for row in trainer.state.log_history if "schedule/stage" in row]
    assert [row["schedule/stage"] for row in logged] == [0, 0, 1, 1, 2, 2]
    for row, stage in zip(logged, stage_of_step, strict=True):
        assert row["learning_rate"] == pytest.approx(stage["learning_rate"])  # Trainer's own
        for name in ("learning_rate", "beta", "temperature", "epsilon", "max_completion_length",
                     "difficulty"):
            assert row[f"schedule/{name}"] == pytest.approx(stage[name])


@pytest.mark.parametrize("change, built, words", [
    ({"num_generations": 2}, {}, ["stage 1", "num_generations", "chained segments"]),
    ({"beta": 0.04}, {"beta": 0.0}, ["stage 1", "beta", "no reference model", "beta > 0"]),
    ({"difficulty": 2}, {}, ["stage 1", "difficulty", "datasets="]),
])
def test_a_schedule_trl_cannot_follow_is_refused_before_any_step(model_dir, tmp_path, change,
                                                                 built, words):
    calls = []

    def reward(completions, **kwargs):
        calls.append(len(completions))
        return [0.0] * len(completions)

    first = {"learning_rate": 1e-3, "beta": 0.0, "num_generations": 4, "difficulty": 1}
    schedule = StageSchedule([first, first | change], steps_per_stage=1)
    trainer = trainer_for(model_dir, tmp_path, [schedule], reward=reward, **built)
    with pytest.raises(ScheduleRefused) as refused:
        schedule.bind(trainer)
    for word in words:
        assert word in str(refused.value)
    with pytest.raises(RuntimeError, match="not bound"):  # training without the checks: refused
        trainer.train()
    assert calls == [] and trainer.state.global_step == 0


# ---- export_trl ------------------------------------------------------------------------------

RECORDED = EnvConfig().to_dict() | {"prompts_per_step": 2, "loss_type": "dapo", "difficulty": 2}


def leaderboard_file(tmp_path: Path) -> Path:
    """A combined leaderboard.h5 with one three-stage run and one whose schedule is empty."""
    def record(task, controller, schedule):
        stages = [StageRecord(episode=0, stage=i, hparams=RECORDED | h, dev_score=0.5,
                              reward=0.1, metrics=[]) for i, h in enumerate(schedule)]
        return RunRecord(task=task, controller=controller, seed=3, test_score=0.5, dev_score=0.5,
                         base_dev_score=0.1, budget=3, stages_spent=3, schedule=schedule,
                         stages=stages, settings={"env_kwargs": {"steps_per_stage": 5}})

    found = [  # beta 0 -> 0.04 within a segment; num_generations 8 -> 16 starts a new one
        {"learning_rate": 1e-4, "beta": 0.0, "num_generations": 8.0, "difficulty": 2.0},
        {"learning_rate": 3e-5, "beta": 0.04, "num_generations": 8.0, "difficulty": 1.0},
        {"learning_rate": 1e-5, "beta": 0.04, "num_generations": 16.0, "difficulty": 2.0},
    ]
    write_combined(tmp_path, [record("gsm8k", "skills", found), record("logic", "fixed", [])])
    return tmp_path / "leaderboard.h5"


def test_export_turns_a_leaderboard_run_into_trl_stages_and_segments(tmp_path):
    out = tmp_path / "export"
    export_trl.main(["--run", str(leaderboard_file(tmp_path)), "--task", "gsm8k", "--model",
                     "Qwen/Qwen3-0.6B", "--out", str(out)])
    plan = json.loads((out / "schedule.json").read_text())
    assert (plan["task"], plan["seed"], plan["steps_per_stage"]) == ("gsm8k", 3, 5)
    assert plan["stages"] == [
        {"learning_rate": 1e-4, "beta": 0.0, "num_generations": 8,
         "per_device_train_batch_size": 16, "difficulty": 2},
        {"learning_rate": 3e-5, "beta": 0.04, "num_generations": 8,
         "per_device_train_batch_size": 16, "difficulty": 1},
        {"learning_rate": 1e-5, "beta": 0.04, "num_generations": 16,
         "per_device_train_batch_size": 32, "difficulty": 2},
    ]
    assert [seg["stages"] for seg in plan["segments"]] == [[0, 2], [2, 3]]
    configs = [plan["grpo_config"] | seg["grpo_config"] for seg in plan["segments"]]
    assert [c["beta"] for c in configs] == [0.04, 0.04]  # built with a reference model
    assert [c["num_generations"] for c in configs] == [8, 16]
    assert configs[0]["loss_type"] == "dapo"  # the run's recorded value, not the env default
    assert configs[0]["lr_scheduler_type"] == "constant" and configs[0]["epsilon_high"] is None
    script = (out / "train_trl.py").read_text()
    compile(script, "train_trl.py", "exec")
    assert "'Qwen/Qwen3-0.6B'" in script and "chained" in script


def test_export_says_what_is_missing_from_its_input(tmp_path, capsys):
    h5 = leaderboard_file(tmp_path)
    no_schedule, no_length = tmp_path / "a.json", tmp_path / "b.json"
    no_schedule.write_text(json.dumps({"steps_per_stage": 5, "task": "gsm8k"}))
    no_length.write_text(json.dumps({"schedule": [{"learning_rate": 1e-4}], "task": "gsm8k"}))
    cases = [
        (dict(path=h5), "2 runs match .*--task logic --controller fixed --seed 3"),
        (dict(path=h5, task="logic"), "empty schedule"),
        (dict(path=h5, controller="tpe"), "it holds: gsm8k/skills/seed 3, logic/fixed/seed 3"),
        (dict(path=no_schedule), "has no 'schedule'"),
        (dict(path=no_length), "--steps-per-stage"),
        (dict(path=tmp_path / "missing.json"), "no such file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(export_trl.ExportError, match=message):
            export_trl.load_run(**kwargs)
    with pytest.raises(SystemExit):  # the command line reports it and exits non-zero
        export_trl.main(["--run", str(no_schedule), "--model", "m", "--out", str(tmp_path)])
    assert "has no 'schedule'" in capsys.readouterr().err


@pytest.mark.parametrize("stage, message", [
    ({"learning_rate": "fast"}, "stage 1: learning_rate must be a finite number, got 'fast'"),
    ({"learning_rate": float("inf")}, "stage 1: learning_rate must be a finite number, got inf"),
    ({"num_generations": 8.5}, "stage 1: num_generations must be a whole number, got 8.5"),
    ({"loss_type": 3}, "stage 1: loss_type must be a string, got 3"),
    ({"loss_type": "ppo"}, "stage 1: GRPOConfig.loss_type='ppo' is invalid"),
    ({"difficulty": 9}, r"stage 1: difficulty must be one of \(1, 2, 3, 4\) for gsm8k"),
    ({"learnin_rate": 1e-4}, "stage 1: unknown hyperparameter 'learnin_rate'"),
])
def test_a_schedule_value_of_the_wrong_type_names_the_stage_and_the_name(tmp_path, capsys,
                                                                         stage, message):
    found = tmp_path / "found.json"
    found.write_text(json.dumps({"task": "gsm8k", "steps_per_stage": 5,
                                 "schedule": [{"learning_rate": 1e-4}, stage]}))
    with pytest.raises(SystemExit) as e:
        export_trl.main(["--run", str(found), "--model", "m", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"{found} {message}", err), err
    assert not (tmp_path / "x").exists()


def test_a_json_run_with_bad_settings_names_them(tmp_path):
    cases = [({"steps_per_stage": "ten"}, "steps_per_stage must be an integer >= 1, got 'ten'"),
             ({"seed": -1}, "seed must be an integer >= 0, got -1"),
             ({"task": "chess"}, "unknown task 'chess'; valid tasks: gsm8k, math"),
             ({"scale": "huge"}, "scale must be one of"),
             ({"fixed": [1]}, "'fixed' must be an object"),
             ({"schedule": [1e-4]}, "schedule stage 0 must be an object")]
    for change, message in cases:
        found = tmp_path / "found.json"
        found.write_text(json.dumps({"task": "gsm8k", "steps_per_stage": 5,
                                     "schedule": [{"beta": 0.0}]} | change))
        with pytest.raises(export_trl.ExportError, match=re.escape(message)):
            export_trl.full_stages(export_trl.load_run(found))


def test_a_truncated_or_foreign_run_file_is_named(tmp_path):
    h5 = leaderboard_file(tmp_path)
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    with pytest.raises(export_trl.ExportError, match=rf"--run {h5} is neither a JSON schedule "
                                                     r"\(\.json\) nor a readable HDF5 run log"):
        export_trl.load_run(h5)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "gsm8k__x__seed0.h5").write_text("text, not HDF5")
    with pytest.raises(export_trl.ExportError, match=r"gsm8k__x__seed0\.h5 is neither"):
        export_trl.load_run(tmp_path)


def test_an_existing_export_is_not_overwritten_without_force(tmp_path, capsys):
    argv = ["--run", str(leaderboard_file(tmp_path)), "--task", "gsm8k", "--model",
            "Qwen/Qwen3-0.6B"]
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(SystemExit):
        export_trl.main([*argv, "--out", str(tmp_path / "a-file")])
    assert f"--out {tmp_path / 'a-file'}: {tmp_path / 'a-file'} is a file" in (
        capsys.readouterr().err)
    out = tmp_path / "export"
    assert export_trl.main([*argv, "--out", str(out)]) == 0
    (out / "train_trl.py").write_text("# edited by hand")
    with pytest.raises(SystemExit):
        export_trl.main([*argv, "--out", str(out)])
    assert "already holds train_trl.py and schedule.json; pass --force" in (
        capsys.readouterr().err)
    assert (out / "train_trl.py").read_text() == "# edited by hand"
    assert export_trl.main([*argv, "--out", str(out), "--force"]) == 0
    assert "GRPOTrainer" in (out / "train_trl.py").read_text()


def test_a_model_path_that_does_not_exist_is_refused(tmp_path, capsys):
    argv = ["--run", str(leaderboard_file(tmp_path)), "--task", "gsm8k", "--out",
            str(tmp_path / "x")]
    for model, message in [(str(tmp_path / "no-model"), "no such folder, and not a Hugging "
                                                         "Face hub id"),
                           ("./models/qwen", "no such folder"),
                           (str(tmp_path), "is not a model folder (it has no config.json)")]:
        with pytest.raises(SystemExit):
            export_trl.main([*argv, "--model", model])
        assert f"--model {model}" in (err := capsys.readouterr().err) and message in err
    assert not (tmp_path / "x").exists()
    assert export_trl.main([*argv, "--model", "Qwen/Qwen3-0.6B"]) == 0  # a hub id
    assert "will load it from the Hugging Face hub" in capsys.readouterr().err


def test_exported_script_runs_two_chained_stages_offline(model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "0", "difficulty": level}) + "\n"
                            for level, prompts in LEVELS.items() for p in prompts))
    found = tmp_path / "found.json"
    found.write_text(json.dumps({"task": "gsm8k", "steps_per_stage": 1,
                                 "fixed": {"prompts_per_step": 2}, "schedule": [
        {"learning_rate": 1e-3, "beta": 0.0, "num_generations": 4, "temperature": 1.0,
         "max_completion_length": 6, "difficulty": 1},
        {"learning_rate": 1e-4, "beta": 0.04, "num_generations": 2, "temperature": 0.7,
         "max_completion_length": 4, "difficulty": 2},
    ]}))
    export_trl.main(["--run", str(found), "--model", str(model_dir), "--out", str(tmp_path)])
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(tmp_path / "train_trl.py"), "--data", str(data),
                          "--output-dir", str(tmp_path / "run")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [row for row in state["log_history"] if "schedule/stage" in row]
    # The second segment resumed from the first's checkpoint at its own learning rate.
    assert [row["learning_rate"] for row in steps] == [1e-3, 1e-4]
    assert [row["schedule/num_generations"] for row in steps] == [4, 2]
    assert [row["schedule/difficulty"] for row in steps] == [1, 2]
    assert [row["completions/max_length"] for row in steps] == [6, 4]
    assert ["kl" in row for row in steps] == [False, True]  # beta 0, then the KL to the base
