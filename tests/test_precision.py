"""dtype="auto" and the precision report (benchmarks.precision): bf16 only where measured."""

from __future__ import annotations

import json

import gymnasium as gym
import torch

import inner.models as models
import metaenv  # noqa: F401  (registers the env ids)
from benchmarks.precision import speed_rows
from inner.models import bf16_pays


def test_auto_picks_bf16_on_a_cpu_only_from_the_measured_size(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "BF16_CPU_MIN_PARAMETERS", None)
    assert not bf16_pays(cpu, 10**9)
    monkeypatch.setattr(models, "BF16_CPU_MIN_PARAMETERS", 3_000_000)
    assert not bf16_pays(cpu, 2_999_999) and bf16_pays(cpu, 3_000_000)
    assert not bf16_pays(torch.device("meta"), 10**9)


def test_the_env_trains_in_the_dtype_asked_for(monkeypatch):
    monkeypatch.setattr(models, "BF16_CPU_MIN_PARAMETERS", None)
    tiny = dict(stages=1, steps_per_stage=1, dev_size=4, test_size=4)
    assert not gym.make("LLMZero-GSM8K-v0", **tiny).unwrapped.bf16  # auto on this CPU
    env = gym.make("LLMZero-GSM8K-v0", **tiny, dtype="bf16")
    env.reset(seed=0)
    assert env.unwrapped.bf16 and env.unwrapped.trainer.model.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in env.unwrapped.trainer.model.parameters())


def test_the_precision_report_names_the_size_where_bf16_is_fastest(tmp_path):
    rows = [{"size": size, "dtype": dtype, "beta": 0.04, "ours_s_per_step": s, "trl_s_per_step": t}
            for size, dtype, s, t in [("0.84M", "fp32", 0.30, 0.50), ("0.84M", "bf16", 0.33, 0.6),
                                      ("10M", "fp32", 2.0, 3.0), ("10M", "bf16", 1.25, 2.5)]]
    path = tmp_path / "precision_speed.json"
    path.write_text(json.dumps({"command": "python -m benchmarks.throughput --sizes",
                                "threads": 2, "tokens_per_step": 3072,
                                "sizes": {"0.84M": [4, 128], "10M": [6, 384]}, "rows": rows}))
    table, fastest = speed_rows(path)
    assert fastest == "10M"
    assert any(line.startswith("| 10M | 2.000 | 1.250 | 1.60x |") for line in table)
    assert speed_rows(tmp_path / "missing.json")[1] is None
