"""The observation vector: a bounded float32 Box, never NaN.

Layout (`observation_names(hparam_names)` gives the same list):

| index    | name                   | meaning (means over the last stage's steps)        | bounds  |
|----------|------------------------|----------------------------------------------------|---------|
| 0        | reward                 | mean training reward                               | [0, 1]  |
| 1        | reward_std             | mean within-batch reward std                       | [0, 1]  |
| 2        | kl                     | mean k3 KL to the reference (per token)            | [0, 10] |
| 3        | entropy                | mean token entropy of the samples (nats)           | [0, 10] |
| 4        | clip_ratio             | clip_ratio/region_mean                             | [0, 1]  |
| 5        | completion_length_frac | completions/mean_length / max_completion_length    | [0, 1]  |
| 6        | clipped_ratio          | completions/clipped_ratio (truncated completions)  | [0, 1]  |
| 7        | frac_reward_zero_std   | fraction of groups without reward variance         | [0, 1]  |
| 8        | grad_norm_squashed     | g / (1 + g) of the mean pre-clip gradient norm g   | [0, 1]  |
| 9        | dev_score              | dev score after the stage (base score at reset)    | [0, 1]  |
| 10       | dev_delta              | change of the dev score over the stage             | [-1, 1] |
| 11..10+k | hparam/<name>          | grid index / (grid size - 1), k controlled names   | [0, 1]  |
| 11+k     | progress               | stages done / stages                               | [0, 1]  |

Before the first stage (after reset) the diagnostics are 0 except dev_score. Values are clipped to
their bounds; a non-finite kl or grad norm (divergence) reads as the upper bound, others as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from gymnasium import spaces

from metaenv.pathologies import stage_mean

KL_MAX = 10.0
ENTROPY_MAX = 10.0

# (name, low, high, value used when the stage's metric is non-finite or absent)
DIAGNOSTICS: tuple[tuple[str, float, float, float], ...] = (
    ("reward", 0.0, 1.0, 0.0),
    ("reward_std", 0.0, 1.0, 0.0),
    ("kl", 0.0, KL_MAX, KL_MAX),
    ("entropy", 0.0, ENTROPY_MAX, 0.0),
    ("clip_ratio", 0.0, 1.0, 0.0),
    ("completion_length_frac", 0.0, 1.0, 0.0),
    ("clipped_ratio", 0.0, 1.0, 0.0),
    ("frac_reward_zero_std", 0.0, 1.0, 0.0),
    ("grad_norm_squashed", 0.0, 1.0, 1.0),
    ("dev_score", 0.0, 1.0, 0.0),
    ("dev_delta", -1.0, 1.0, 0.0),
)
# Which logged (TRL-named) metric feeds each stage-mean diagnostic.
_METRIC_KEYS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "kl": "kl",
    "entropy": "entropy",
    "clip_ratio": "clip_ratio/region_mean",
    "clipped_ratio": "completions/clipped_ratio",
    "frac_reward_zero_std": "frac_reward_zero_std",
}


def observation_names(hparam_names: Sequence[str]) -> list[str]:
    """Name of each observation entry, in order."""
    return [d[0] for d in DIAGNOSTICS] + [f"hparam/{n}" for n in hparam_names] + ["progress"]


def observation_space(num_hparams: int) -> spaces.Box:
    """The Box for `num_hparams` controlled hyperparameters."""
    low = [d[1] for d in DIAGNOSTICS] + [0.0] * (num_hparams + 1)
    high = [d[2] for d in DIAGNOSTICS] + [1.0] * (num_hparams + 1)
    return spaces.Box(np.array(low, np.float32), np.array(high, np.float32), dtype=np.float32)


def stage_diagnostics(
    metrics: Sequence[dict], max_completion_length: int, dev_score: float, dev_before: float
) -> dict[str, float]:
    """Raw (unclipped, possibly non-finite) diagnostics of one stage."""
    d = {name: stage_mean(metrics, key) for name, key in _METRIC_KEYS.items()}
    d["completion_length_frac"] = (
        stage_mean(metrics, "completions/mean_length") / max_completion_length
    )
    g = stage_mean(metrics, "grad_norm")
    # Any non-finite gradient norm in the stage marks divergence even if others were finite.
    if any(not math.isfinite(float(m.get("grad_norm", 0.0))) for m in metrics):
        g = math.inf
    d["grad_norm_squashed"] = 1.0 if math.isinf(g) else g / (1.0 + g)
    d["dev_score"] = dev_score
    d["dev_delta"] = dev_score - dev_before
    return d


def failed(diagnostics: dict[str, float]) -> dict[str, float]:
    """The diagnostics of a failed stage: nothing was measured on the lost model, so it reads at
    the bounds that mean divergence (kl and gradient norm at their maximum)."""
    return diagnostics | {"kl": math.inf, "grad_norm_squashed": 1.0}


def build_observation(
    diagnostics: dict[str, float] | None,
    dev_score: float,
    hparam_position: np.ndarray,
    progress: float,
) -> np.ndarray:
    """The observation vector; `diagnostics=None` is the state before any stage."""
    values = []
    for name, low, high, fill in DIAGNOSTICS:
        if diagnostics is None:
            x = dev_score if name == "dev_score" else 0.0
        else:
            x = diagnostics.get(name, math.nan)
        x = float(x)
        if math.isnan(x):
            x = fill
        values.append(min(max(x, low), high))  # also maps +-inf to the bounds
    tail = np.append(np.asarray(hparam_position, np.float64), progress)
    tail = np.clip(np.nan_to_num(tail, nan=0.0), 0.0, 1.0)
    return np.concatenate([np.array(values), tail]).astype(np.float32)
