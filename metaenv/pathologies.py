"""Pathologies of a GRPO stage: a table of detectors on its per-step metrics and the dev history.

Each detector is one row of `DETECTORS`: its name, its rule with the numbers in it, a predicate and
a one-line meaning. The env reports what fires, the skills react to the names, and the LLM agent's
prompt and the README list the rows. A new pathology is one row (and, optionally, one skill).
Thresholds are named constants so that controllers can quote them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ENTROPY_COLLAPSE = "entropy_collapse"
KL_BLOWUP = "kl_blowup"
DEV_PLATEAU = "dev_plateau"
HIGH_TRUNCATION = "high_truncation"
ZERO_VARIANCE_GROUPS = "zero_variance_groups"
DIVERGENCE = "divergence"
OUT_OF_MEMORY = "out_of_memory"

# Mean token entropy (nats) below which sampling is nearly greedy and groups stop exploring ...
ENTROPY_COLLAPSE_MIN = 0.05
# ... or below this fraction of the episode's first-step entropy (the base policy's).
ENTROPY_COLLAPSE_RATIO = 0.2
# Mean per-token k3 KL to the reference above which the policy has left the base model behind;
# healthy GRPO runs stay well below 0.1.
KL_BLOWUP_MIN = 1.0
# The dev score has stalled when its best gain over the last DEV_PLATEAU_STAGES stages is below
# DEV_PLATEAU_SE standard errors of the dev score: a gain of one item out of 32 (0.031) is noise.
DEV_PLATEAU_STAGES = 2
DEV_PLATEAU_SE = 1.0
# Fraction of completions cut at max_completion_length above which length is the bottleneck.
HIGH_TRUNCATION_MIN = 0.5
# Fraction of groups whose rewards are all equal (zero advantage, no gradient) above which the
# group size or the difficulty no longer yields a learning signal.
ZERO_VARIANCE_MIN = 0.8


def dev_standard_error(dev_size: int | None) -> float:
    """Worst-case (p = 0.5) standard error of an accuracy on `dev_size` items; the unit in which
    dev-score thresholds are set. 0 when the size is unknown (every change then counts)."""
    return 0.5 / math.sqrt(dev_size) if dev_size else 0.0


def stage_mean(metrics: Sequence[dict], key: str) -> float:
    """Mean of `key` over the steps, ignoring missing and non-finite values (NaN if none)."""
    vals = [float(m[key]) for m in metrics if key in m and math.isfinite(float(m[key]))]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass(frozen=True)
class Stage:
    """What a detector reads: one stage's per-step metrics, the path's steps, the dev scores."""

    metrics: Sequence[dict]
    history: Sequence[dict] = ()      # every step of the path so far; its first is the base's
    dev_scores: Sequence[float] = ()  # base dev score, then one per stage, this one included
    dev_size: int | None = None       # items behind each dev score (sets the noise thresholds)

    def mean(self, key: str) -> float:
        return stage_mean(self.metrics, key)


@dataclass(frozen=True)
class Detector:
    """One pathology: `predicate(stage)` fires it; `threshold` states the rule with its numbers."""

    name: str
    threshold: str
    predicate: Callable[[Stage], bool] | None   # None: reported by the env when the trainer fails
    meaning: str

    def describe(self) -> str:
        """One line: name, rule, meaning (the README and the LLM prompt print these)."""
        return f"`{self.name}`: {self.threshold}; {self.meaning}"


def _entropy_collapse(s: Stage) -> bool:
    base = stage_mean(s.history[:1], "entropy") if s.history else math.nan
    entropy = s.mean("entropy")
    return entropy < ENTROPY_COLLAPSE_MIN or (base > 0 and entropy < ENTROPY_COLLAPSE_RATIO * base)


def _dev_plateau(s: Stage) -> bool:
    if len(s.dev_scores) <= DEV_PLATEAU_STAGES:
        return False
    window = s.dev_scores[-DEV_PLATEAU_STAGES - 1 :]
    return max(window[1:]) - window[0] < DEV_PLATEAU_SE * dev_standard_error(s.dev_size)


def _divergence(s: Stage) -> bool:
    # A stage the trainer stopped gets this pathology from the env (metaenv.env.FAILURE_PATHOLOGY).
    return any(not math.isfinite(float(m[k]))
               for m in s.metrics for k in ("loss", "kl", "grad_norm") if k in m)


DETECTORS: tuple[Detector, ...] = (
    Detector(ENTROPY_COLLAPSE,
             f"stage-mean token entropy < {ENTROPY_COLLAPSE_MIN} nats, or < "
             f"{ENTROPY_COLLAPSE_RATIO} x the episode's first-step entropy",
             _entropy_collapse, "sampling is nearly greedy, so a group's completions agree"),
    Detector(KL_BLOWUP, f"stage-mean k3 KL to the reference model > {KL_BLOWUP_MIN}",
             lambda s: s.mean("kl") > KL_BLOWUP_MIN,
             "the policy has moved far from the base model"),
    Detector(DEV_PLATEAU,
             f"best dev-score gain over the last {DEV_PLATEAU_STAGES} stages < {DEV_PLATEAU_SE} "
             "standard error of the dev score (0.5 / sqrt(dev size): 0.0625 at 64 items)",
             _dev_plateau, "the dev score has stopped rising beyond its noise"),
    Detector(HIGH_TRUNCATION,
             "stage-mean share of completions cut at max_completion_length > "
             f"{HIGH_TRUNCATION_MIN}",
             lambda s: s.mean("completions/clipped_ratio") > HIGH_TRUNCATION_MIN,
             "most sampled answers are cut before they end"),
    Detector(ZERO_VARIANCE_GROUPS,
             f"stage-mean share of groups whose rewards are all equal > {ZERO_VARIANCE_MIN}",
             lambda s: s.mean("frac_reward_zero_std") > ZERO_VARIANCE_MIN,
             "most groups have zero advantage and give no gradient"),
    Detector(DIVERGENCE, "non-finite loss, KL, gradient norm or weights", _divergence,
             "the stage failed, its model is lost (dev score 0) and the episode ends"),
    Detector(OUT_OF_MEMORY, "training or evaluation ran out of memory (the env reports it)", None,
             "the stage failed, its model is lost (dev score 0) and the episode ends"),
)
PATHOLOGIES = tuple(d.name for d in DETECTORS)


def detector(name: str) -> Detector | None:
    """The row of `name` in the table (as it is now: a user may have added rows)."""
    return next((d for d in DETECTORS if d.name == name), None)


def detect_pathologies(
    metrics: Sequence[dict],
    history: Sequence[dict] = (),
    dev_scores: Sequence[float] = (),
    dev_size: int | None = None,
) -> list[str]:
    """Names (in PATHOLOGIES order) of the pathologies shown by one stage.

    `metrics`: the stage's per-step dicts; `history`: every step of the path so far (its first step
    gives the base entropy); `dev_scores`: base dev score then one per stage, this one included;
    `dev_size`: the items behind each dev score (None: thresholds without a noise margin).
    """
    stage = Stage(metrics, history, dev_scores, dev_size)
    return [d.name for d in DETECTORS if d.predicate is not None and d.predicate(stage)]
