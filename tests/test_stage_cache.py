"""The stage cache (metaenv.stage_cache): a stage whose path was trained is loaded, bit for bit,
charged as trained; a broken entry is trained again; concurrent writers are safe."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import metaenv  # noqa: F401  (registers the env ids)
from metaenv.stage_cache import StageCache, stage_key

ENV = "LLMZero-GSM8K-v0"
TINY = dict(stages=3, steps_per_stage=1, dev_size=8, test_size=8)
PATH = ({"learning_rate": 3e-4}, {"beta": 0.0, "num_generations": 4})


def train(cache: Path | None, seed: int = 3, path=PATH, **kwargs):
    """Reset, train `path`; return the env, each step's outputs and the trainer's final state."""
    env = gym.make(ENV, **TINY, stage_cache=None if cache is None else str(cache), **kwargs)
    env.reset(seed=seed)
    steps = [env.step(dict(values)) for values in path]
    return env.unwrapped, steps, env.unwrapped.trainer.save_state()


def assert_same_state(a, b) -> None:
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for i, moments in a.optimizer["state"].items():
        for k, v in moments.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizer["state"][i][k]))
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    for k in a.rng:
        assert torch.equal(a.rng[k], b.rng[k]), k
    assert (a.cursors, a.step, a.num_tokens) == (b.cursors, b.step, b.num_tokens)
    assert [without_times(m) for m in a.history] == [without_times(m) for m in b.history]


def without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_time")}  # wall clock


def assert_same_steps(a, b) -> None:
    for (obs_a, r_a, te_a, tr_a, info_a), (obs_b, r_b, te_b, tr_b, info_b) in zip(a, b,
                                                                                 strict=True):
        assert (obs_a == obs_b).all()
        assert (r_a, te_a, tr_a) == (r_b, te_b, tr_b)
        assert info_a == info_b


def test_a_cached_path_loads_bit_for_bit_and_is_charged_as_trained(tmp_path):
    trained, trained_steps, trained_state = train(tmp_path)
    assert (trained.budget.cache_hits, trained.budget.cache_misses) == (0, 2)
    loaded, loaded_steps, loaded_state = train(tmp_path)
    assert (loaded.budget.cache_hits, loaded.budget.cache_misses) == (2, 0)
    # weights, AdamW moments, RNG states, data cursor, counters, metric history (its wall-clock
    # step times too); every observation, reward, dev score, metric and sample of info
    assert_same_state(trained_state, loaded_state)
    assert trained_state.history == loaded_state.history
    assert_same_steps(trained_steps, loaded_steps)
    # Charged as trained: stages, tokens, and the seconds the training took when it was trained.
    assert loaded.budget.stages == trained.budget.stages == 2
    assert loaded.budget.tokens == trained.budget.tokens > 0
    recorded = sum(step["step_time"] for step in loaded_state.history)
    assert loaded.budget.seconds >= recorded
    assert loaded.budget.seconds_saved > 0
    # and the same as an env without a cache
    _, plain_steps, plain_state = train(None)
    assert_same_state(plain_state, loaded_state)
    assert_same_steps(plain_steps, loaded_steps)


def test_a_different_seed_path_or_setting_is_a_miss(tmp_path):
    train(tmp_path)
    for kwargs in ({"seed": 4}, {"path": PATH[:1] + ({"beta": 0.01},)},
                   {"dev_metric": "accuracy", "eval_max_new_tokens": 16}):
        env, _, _ = train(tmp_path, **kwargs)
        hits = {"seed": 0, "path": 1, "dev_metric": 0}[next(iter(kwargs))]
        assert env.budget.cache_hits == hits, kwargs


def test_a_truncated_or_changed_entry_is_trained_again_never_loaded(tmp_path, capsys):
    _, steps, state = train(tmp_path)
    entries = sorted(p.parent for p in tmp_path.rglob("result.json"))
    assert len(entries) == 2
    weights = entries[0] / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    result = entries[1] / "result.json"
    result.write_text(result.read_text().replace('"accuracy": ', '"accuracy": 1'))  # changed
    env, again_steps, again_state = train(tmp_path)
    assert (env.budget.cache_hits, env.budget.cache_misses) == (0, 2)
    assert env._stage_cache.stats.broken == 2
    assert "is broken" in capsys.readouterr().out
    assert_same_state(state, again_state)
    assert_same_steps(steps, again_steps)
    # the retrained stages replaced the broken entries
    env, _, _ = train(tmp_path)
    assert env.budget.cache_hits == 2


def _train_in_process(cache: str, queue) -> None:
    torch.set_num_threads(1)
    _, _, state = train(Path(cache))
    digest = hashlib.sha256()
    for name in sorted(state.weights):
        digest.update(name.encode() + state.weights[name].numpy().tobytes())
    queue.put(digest.hexdigest())  # plain data: tensors would need the sender to stay alive


def test_two_processes_writing_the_same_keys_at_once_are_safe(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_train_in_process, args=(str(tmp_path), queue))
               for _ in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert results[0] == results[1]
    assert not list(tmp_path.rglob(".*tmp-*"))  # no half-written entry left behind
    env, _, _ = train(tmp_path)
    assert env.budget.cache_hits == 2


def test_a_failed_stage_is_not_cached(tmp_path):
    diverge = {"learning_rate": 1e30, "weight_decay": 1e7}
    env = gym.make(ENV, **TINY, stage_cache=str(tmp_path),
                   hparam_grid={"learning_rate": [1e-4, 1e30]},
                   fixed_hparams={"weight_decay": 1e7})
    env.reset(seed=0)
    _, _, _, truncated, info = env.step({"learning_rate": diverge["learning_rate"]})
    assert truncated and info["episode_end"] == "failure"
    assert not list(tmp_path.glob("*/*"))


def test_the_cache_folder_is_checked_where_it_enters(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="stage_cache"):
        gym.make(ENV, **TINY, stage_cache=str(blocker / "cache"))
    with pytest.raises(ValueError, match="stage_cache"):
        StageCache(blocker / "cache")


def test_the_key_is_the_whole_path_from_the_base():
    a = stage_key({"task": "t"}, 0, [{"lr": 1}, {"lr": 2}])
    assert a == stage_key({"task": "t"}, 0, [{"lr": 1}, {"lr": 2}])
    assert a != stage_key({"task": "t"}, 0, [{"lr": 2}, {"lr": 1}])
    assert a != stage_key({"task": "t"}, 1, [{"lr": 1}, {"lr": 2}])
    assert a != stage_key({"task": "u"}, 0, [{"lr": 1}, {"lr": 2}])
