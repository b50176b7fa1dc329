"""Training state: bit-identical save/restore (memory, disk); hyperparameter changes per stage."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from inner.config import GRPOConfig
from inner.models import tiny_gpt2
from inner.state import CorruptStateError, TrainState, sha256
from inner.trainer import Failure, Trainer

STAGE_A = GRPOConfig(prompts_per_step=4, num_generations=4, max_completion_length=6, beta=0.0)
STAGE_B = GRPOConfig(
    prompts_per_step=3,
    num_generations=2,
    max_completion_length=8,
    beta=0.1,
    learning_rate=3e-3,
    num_iterations=2,
    loss_type="dapo",
    top_p=0.9,
    temperature=1.3,
)


def make_trainer(tokenizer, task, **kwargs) -> Trainer:
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=0)
    return Trainer(model, tokenizer, task, seed=0, **kwargs)


def deterministic(metrics: list[dict]) -> list[dict]:
    """Everything but the wall-clock step time."""
    return [{k: v for k, v in m.items() if k != "step_time"} for m in metrics]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_restore_is_bit_identical_in_memory_and_on_disk(tokenizer, task, tmp_path):
    trainer = make_trainer(tokenizer, task)
    trainer.train_stage(STAGE_A, 2)
    state = trainer.save_state()
    trainer.save_state_to_disk(tmp_path / "ckpt")
    first = trainer.train_stage(STAGE_B, 2)
    first_weights, first_history = weights(trainer), deterministic(trainer.history)
    assert first.failure is None and len(first.metrics) == 2

    # Restore in memory twice: the state must survive being loaded and trained from.
    for _ in range(2):
        trainer.load_state(state)
        again = trainer.train_stage(STAGE_B, 2)
        assert deterministic(again.metrics) == deterministic(first.metrics)
        assert again.num_tokens == first.num_tokens
        assert_same_weights(weights(trainer), first_weights)
        assert deterministic(trainer.history) == first_history
        assert trainer.step == 4

    # Restore from disk into a brand-new Trainer built from the same base model.
    fresh = make_trainer(tokenizer, task)
    fresh.load_state_from_disk(tmp_path / "ckpt")
    assert fresh.step == 2 and len(fresh.history) == 2
    from_disk = fresh.train_stage(STAGE_B, 2)
    assert deterministic(from_disk.metrics) == deterministic(first.metrics)
    assert_same_weights(weights(fresh), first_weights)


def test_saved_state_is_independent_of_later_training(tokenizer, task):
    trainer = make_trainer(tokenizer, task)
    trainer.train_stage(STAGE_A, 1)
    state = trainer.save_state()
    snapshot = {k: v.clone() for k, v in state.weights.items()}
    moments = [s["exp_avg"].clone() for s in state.optimizer["state"].values()]
    trainer.train_stage(STAGE_B, 1)
    trainer.load_state(state)
    trainer.train_stage(STAGE_B, 1)  # trains the restored tensors: must not write into `state`
    assert_same_weights(state.weights, snapshot)
    for saved, before in zip(state.optimizer["state"].values(), moments, strict=True):
        assert torch.equal(saved["exp_avg"], before)
        assert all(saved["exp_avg"] is not s["exp_avg"] for s in trainer.optimizer.state.values())


def test_learning_rate_change_takes_effect(tokenizer, task):
    trainer = make_trainer(tokenizer, task)
    before = weights(trainer)
    result = trainer.train_stage(GRPOConfig(**{**STAGE_A.to_dict(), "learning_rate": 0.0}), 2)
    assert [m["learning_rate"] for m in result.metrics] == [0.0, 0.0]
    assert_same_weights(weights(trainer), before)

    result = trainer.train_stage(GRPOConfig(**{**STAGE_A.to_dict(), "learning_rate": 1e-2}), 1)
    assert result.metrics[0]["learning_rate"] == 1e-2
    moved = weights(trainer)
    assert any(not torch.equal(moved[k], before[k]) for k in before)

    # Back down to zero: the new value is really used (the Adam moments are non-zero now).
    trainer.train_stage(GRPOConfig(**{**STAGE_A.to_dict(), "learning_rate": 0.0}), 1)
    assert_same_weights(weights(trainer), moved)


def test_any_hyperparameter_may_change_between_stages(tokenizer, task):
    trainer = make_trainer(tokenizer, task)
    a = trainer.train_stage(STAGE_A, 2)
    # beta == 0: the loss skips the reference pass; only the stage's last step probes the KL.
    assert "kl" not in a.metrics[0] and a.metrics[-1]["kl"] >= 0.0
    b = trainer.train_stage(STAGE_B, 2)  # beta 0 -> 0.1, more iterations, other loss and sampler
    assert b.failure is None
    assert b.metrics[-1]["kl"] > 0.0  # the reference was kept and now differs from the policy
    assert all(m["completions/mean_length"] <= 8 for m in b.metrics)
    c = trainer.train_stage(
        GRPOConfig(num_generations=3, prompts_per_step=2, max_completion_length=3), 1
    )
    assert c.metrics[0]["completions/mean_length"] <= 3
    assert trainer.step == 5 and len(trainer.history) == 5
    assert trainer.history[-1]["num_tokens"] == trainer.num_tokens


def test_divergence_is_reported_not_raised(tokenizer, task):
    trainer = make_trainer(tokenizer, task)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")
    result = trainer.train_stage(STAGE_A, 3)
    assert result.failure is Failure.NON_FINITE_LOSS
    assert result.metrics == [] and trainer.step == 0


def test_out_of_memory_is_reported_not_raised(tokenizer, task, monkeypatch):
    trainer = make_trainer(tokenizer, task)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr("inner.trainer.generate", oom)
    assert trainer.train_stage(STAGE_A, 2).failure is Failure.OUT_OF_MEMORY


def test_prompts_follow_a_seeded_shuffled_order(tokenizer, task):
    trainer = make_trainer(tokenizer, task)
    n = len(task.examples("train"))
    first_epoch = trainer._next_examples(n, None)
    assert len({ex.prompt for ex in first_epoch}) == n  # every example once per epoch
    assert first_epoch[:5] != task.examples("train")[:5]  # shuffled
    assert trainer.cursors["None"] == (1, 0)
    other = make_trainer(tokenizer, task)
    assert [ex.prompt for ex in other._next_examples(7, None)] == [
        ex.prompt for ex in first_epoch[:7]
    ]


def test_load_model_from_a_local_directory(tokenizer, task, tmp_path):
    """The paper-scale loader on a local save_pretrained directory: left padding, pad fallback."""
    from inner.models import load_model

    tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(tmp_path)
    tokenizer.pad_token = None  # as for many hub models: the loader falls back to EOS
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.padding_side == "left" and loaded.pad_token_id == loaded.eos_token_id
    assert model.config.pad_token_id is not None
    trainer = Trainer(model, loaded, task)
    assert trainer.evaluate(n=4).accuracy >= 0.0  # decodes end to end


# ---- states on disk carry a digest ---------------------------------------------------------------


def saved_state(tokenizer, task, path):
    trainer = make_trainer(tokenizer, task)
    trainer.train_stage(STAGE_A, 1)  # optimizer moments, history, cursors: a full trainer.pt
    trainer.save_state_to_disk(path)
    return trainer


def reseal(path) -> None:
    """Record the current files' digests, as a tamperer who also rewrites the manifest would."""
    digests = {n: sha256(path / n) for n in ("model.safetensors", "trainer.pt")}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "sha256": digests}))


def test_a_saved_state_records_the_sha256_of_each_file(tokenizer, task, tmp_path):
    saved_state(tokenizer, task, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["sha256"] == {
        n: hashlib.sha256((tmp_path / "s" / n).read_bytes()).hexdigest()
        for n in ("model.safetensors", "trainer.pt")}
    TrainState.load(tmp_path / "s")  # and a state as saved loads


def test_changed_bytes_inside_the_weights_are_refused_naming_the_file(tokenizer, task, tmp_path):
    path = tmp_path / "s"
    trainer = saved_state(tokenizer, task, path)
    before = weights(trainer)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # NaNs in a weight, same size
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match=r"model\.safetensors does not match the sha256"):
        trainer.load_state_from_disk(path)
    assert_same_weights(weights(trainer), before)  # nothing was loaded


def test_a_truncated_weights_file_is_a_named_error_even_with_a_matching_digest(tokenizer, task,
                                                                                tmp_path):
    path = tmp_path / "s"
    saved_state(tokenizer, task, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptStateError, match=r"model\.safetensors does not match"):
        TrainState.load(path)
    reseal(path)  # the digest now matches: the reader itself must name the file
    with pytest.raises(CorruptStateError, match=r"model\.safetensors cannot be read"):
        TrainState.load(path)


def test_a_corrupt_trainer_file_never_gets_torchs_weights_only_advice(tokenizer, task, tmp_path):
    path = tmp_path / "s"
    saved_state(tokenizer, task, path)
    data = bytearray((path / "trainer.pt").read_bytes())
    data[100:400] = bytes(300)
    (path / "trainer.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match=r"trainer\.pt does not match"):
        TrainState.load(path)
    reseal(path)
    with pytest.raises(CorruptStateError, match=r"trainer\.pt cannot be read") as e:
        TrainState.load(path)
    assert "weights_only" not in str(e.value) and e.value.__suppress_context__


class Payload:
    """Runs code when unpickled, as a hostile trainer.pt would."""

    def __reduce__(self):
        return (os.makedirs, (os.environ["PAYLOAD_DIR"],))


def test_a_trainer_file_with_python_objects_is_refused_without_running_them(tokenizer, task,
                                                                             tmp_path, monkeypatch):
    path = tmp_path / "s"
    saved_state(tokenizer, task, path)
    monkeypatch.setenv("PAYLOAD_DIR", str(tmp_path / "ran"))
    torch.save({"optimizer": Payload()}, path / "trainer.pt")
    reseal(path)
    with pytest.raises(CorruptStateError, match=r"trainer\.pt cannot be read"):
        TrainState.load(path)
    assert not (tmp_path / "ran").exists()  # loaded with weights_only=True: nothing ran


def test_a_state_without_its_manifest_or_a_file_is_refused(tokenizer, task, tmp_path):
    path = tmp_path / "s"
    saved_state(tokenizer, task, path)
    (path / "trainer.pt").unlink()
    with pytest.raises(CorruptStateError, match=r"trainer\.pt is missing"):
        TrainState.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CorruptStateError, match=r"manifest\.json is missing"):
        TrainState.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptStateError, match=r"manifest\.json cannot be read"):
        TrainState.load(path)
