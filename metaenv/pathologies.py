"""Pathologies of a GRPO stage, detected from its per-step metrics and the dev-score history.

Each detector is a threshold on a stage mean (non-finite values ignored); the thresholds are named
constants so that controllers and the LLM agent's prompt can quote them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ENTROPY_COLLAPSE = "entropy_collapse"
KL_BLOWUP = "kl_blowup"
REWARD_PLATEAU = "reward_plateau"
HIGH_TRUNCATION = "high_truncation"
ZERO_VARIANCE_GROUPS = "zero_variance_groups"
DIVERGENCE = "divergence"
OUT_OF_MEMORY = "out_of_memory"
PATHOLOGIES = (
    ENTROPY_COLLAPSE,
    KL_BLOWUP,
    REWARD_PLATEAU,
    HIGH_TRUNCATION,
    ZERO_VARIANCE_GROUPS,
    DIVERGENCE,
    OUT_OF_MEMORY,
)

# Mean token entropy (nats) below which sampling is nearly greedy and groups stop exploring ...
ENTROPY_COLLAPSE_MIN = 0.05
# ... or below this fraction of the episode's first-step entropy (the base policy's).
ENTROPY_COLLAPSE_RATIO = 0.2
# Mean per-token k3 KL to the reference above which the policy has left the base model behind;
# healthy GRPO runs stay well below 0.1.
KL_BLOWUP_MIN = 1.0
# Dev score gain over the last REWARD_PLATEAU_STAGES stages below which learning has stalled.
REWARD_PLATEAU_STAGES = 2
REWARD_PLATEAU_MIN_GAIN = 0.01
# Fraction of completions cut at max_completion_length above which length is the bottleneck.
HIGH_TRUNCATION_MIN = 0.5
# Fraction of groups whose rewards are all equal (zero advantage, no gradient) above which the
# group size or the difficulty no longer yields a learning signal.
ZERO_VARIANCE_MIN = 0.8


def stage_mean(metrics: Sequence[dict], key: str) -> float:
    """Mean of `key` over the steps, ignoring missing and non-finite values (NaN if none)."""
    vals = [float(m[key]) for m in metrics if key in m and math.isfinite(float(m[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def detect_pathologies(
    metrics: Sequence[dict],
    history: Sequence[dict] = (),
    dev_scores: Sequence[float] = (),
    diverged: str | None = None,
) -> list[str]:
    """Names (in PATHOLOGIES order) of the pathologies shown by one stage.

    `metrics`: the stage's per-step dicts; `history`: every step of the path so far (its first step
    gives the base entropy); `dev_scores`: base dev score then one per stage, this one included.
    """
    found = set()
    entropy = stage_mean(metrics, "entropy")
    base_entropy = stage_mean(history[:1], "entropy") if history else math.nan
    if entropy < ENTROPY_COLLAPSE_MIN or (
        base_entropy > 0 and entropy < ENTROPY_COLLAPSE_RATIO * base_entropy
    ):
        found.add(ENTROPY_COLLAPSE)
    if stage_mean(metrics, "kl") > KL_BLOWUP_MIN:
        found.add(KL_BLOWUP)
    if len(dev_scores) > REWARD_PLATEAU_STAGES:
        window = dev_scores[-REWARD_PLATEAU_STAGES - 1 :]
        if max(window[1:]) - window[0] < REWARD_PLATEAU_MIN_GAIN:
            found.add(REWARD_PLATEAU)
    if stage_mean(metrics, "completions/clipped_ratio") > HIGH_TRUNCATION_MIN:
        found.add(HIGH_TRUNCATION)
    if stage_mean(metrics, "frac_reward_zero_std") > ZERO_VARIANCE_MIN:
        found.add(ZERO_VARIANCE_GROUPS)
    non_finite = any(
        not math.isfinite(float(m[k]))
        for m in metrics
        for k in ("loss", "kl", "grad_norm")
        if k in m
    )
    if diverged is not None or non_finite:
        found.add(DIVERGENCE)
    return [p for p in PATHOLOGIES if p in found]
