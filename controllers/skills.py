"""Diagnostic skills: a trigger on a checkpoint's metrics and a coordinated multi-parameter remedy.

``propose(summary, space, k)`` returns K distinct next-stage hyperparameter dicts, ranked by the
priority of the skills that fire; it is the offline proposer of the LLMZero agent and the policy of
the ``skills`` controller. Pathology names and thresholds are the env's (``metaenv.pathologies``),
so the skills react to exactly what the env reports. Remedies move along the env's grids, so every
proposal is a valid action; a remedy that changes nothing (a parameter already at its grid's end,
or absent from the space) is skipped. Low-priority *moves* that always fire (keep, capacity up,
learning rate down/up, ...) fill the list to K. They are a hand-set prior: capacity only ever goes
up, each regularizer both ways, so schedules the skills shape are not evidence for the
leaderboard's structure statistic (which reports them apart, benchmarks/leaderboard/structure.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym

from controllers.base import RunResult, Tracker, check_int, default_hparams, episode_stages
from metaenv import pathologies as P
from metaenv.pathologies import stage_mean

# Thresholds the env does not define. A dev drop of more than this many standard errors of the dev
# score (metaenv.pathologies.dev_standard_error) over one stage is a regression ...
REGRESSION_SE = 1.0
# ... mean training reward above this means the task is too easy for the current policy ...
SATURATED_REWARD = 0.8
# ... and a stage-mean k3 KL below this (with no plateau-breaking gain) means updates are too small.
UNDER_UPDATE_KL = 1e-3


@dataclass(frozen=True)
class StateSummary:
    """What a skill sees of a checkpoint: its hyperparameters, metrics, pathologies, dev curve."""

    hparams: Mapping[str, Any]                       # those of the stage that made this state
    metrics: Sequence[Mapping[str, float]] = ()      # per-step metrics of that stage
    history: Sequence[Mapping[str, float]] = ()      # every step since the root
    dev_scores: Sequence[float] = ()                 # base dev score, then one per stage
    pathologies: Sequence[str] | None = None         # None -> detected from the metrics
    dev_size: int | None = None                      # items behind each dev score

    def __post_init__(self) -> None:
        if self.pathologies is None:
            found = P.detect_pathologies(self.metrics, self.history, self.dev_scores,
                                         self.dev_size)
            object.__setattr__(self, "pathologies", tuple(found))

    @classmethod
    def from_info(cls, hparams: Mapping[str, Any], info: Mapping[str, Any],
                  dev_scores: Sequence[float]) -> StateSummary:
        """Summary of the state an env.step just reached, from its info dict."""
        found = info.get("pathologies")
        return cls(hparams=dict(hparams), metrics=info.get("metrics", ()),
                   history=info.get("history", ()), dev_scores=tuple(dev_scores),
                   pathologies=None if found is None else tuple(found),
                   dev_size=info.get("dev_size"))

    def mean(self, key: str) -> float:
        """Stage mean of a metric (NaN if absent)."""
        return stage_mean(self.metrics, key)

    @property
    def dev_noise(self) -> float:
        """Standard error of one dev score: the margin below which a dev change is noise."""
        return P.dev_standard_error(self.dev_size)

    def has(self, pathology: str) -> bool:
        return pathology in (self.pathologies or ())


@dataclass(frozen=True)
class Skill:
    """A named diagnosis: ``trigger(summary)`` and a coordinated ``remedy(hparams, space)``."""

    name: str
    trigger: Callable[[StateSummary], bool]
    remedy: Callable[[dict[str, Any], Any], dict[str, Any]]
    priority: int = 50          # higher first
    description: str = ""


@dataclass(frozen=True)
class Candidate:
    """One candidate next stage: the skill that proposed it and the full hyperparameter dict."""

    skill: str
    hparams: dict[str, Any]
    description: str = ""


# ---- moves on the grid --------------------------------------------------------------------------

def shift(hp: dict[str, Any], space: Any, name: str, delta: int) -> dict[str, Any]:
    """Move ``name`` by ``delta`` grid indices, clamped; unchanged if ``name`` is not controlled."""
    if name not in space.names:
        return hp
    return {**hp, name: space.neighbour(name, hp[name], delta)}


def scale(hp: dict[str, Any], space: Any, name: str, factor: float) -> dict[str, Any]:
    """Move ``name`` to the grid value nearest ``value * factor`` (log), at least one index."""
    if name not in space.names:
        return hp
    grid, i = list(space.grids[name]), space.index(name, hp[name], snap=True)
    side = range(i + 1, len(grid)) if factor > 1 else range(i - 1, -1, -1)
    side = [j for j in side if grid[j] > 0]
    if not side or hp[name] <= 0:
        return shift(hp, space, name, 1 if factor > 1 else -1)
    target = math.log(hp[name] * factor)
    return {**hp, name: grid[min(side, key=lambda j: abs(math.log(grid[j]) - target))]}


def moves(*changes: tuple[str, int | float]) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """A remedy from (name, change) pairs: an int shifts grid indices, a float scales the value."""
    def remedy(hp: dict[str, Any], space: Any) -> dict[str, Any]:
        out = dict(hp)
        for name, change in changes:
            out = scale(out, space, name, change) if isinstance(change, float) else shift(
                out, space, name, change)
        return out
    return remedy


def _always(_: StateSummary) -> bool:
    return True


def flagged(pathology: str) -> Callable[[StateSummary], bool]:
    """A trigger that fires when the env's detector `pathology` (metaenv.pathologies) fired."""
    return lambda s: s.has(pathology)


def _regressed(s: StateSummary) -> bool:
    d = s.dev_scores
    return len(d) >= 2 and d[-1] < d[-2] - REGRESSION_SE * s.dev_noise


def _under_update(s: StateSummary) -> bool:
    return s.mean("kl") < UNDER_UPDATE_KL and len(s.dev_scores) >= 2 and (
        s.dev_scores[-1] - s.dev_scores[-2] < P.DEV_PLATEAU_SE * s.dev_noise)


def _zero_var(low: bool) -> Callable[[StateSummary], bool]:
    return lambda s: s.has(P.ZERO_VARIANCE_GROUPS) and (s.mean("reward") < 0.5) == low


def _plateau(saturated: bool) -> Callable[[StateSummary], bool]:
    return lambda s: s.has(P.DEV_PLATEAU) and (s.mean("reward") >= SATURATED_REWARD) == saturated


DIAGNOSTIC_SKILLS: tuple[Skill, ...] = (
    Skill("divergence", flagged(P.DIVERGENCE),
          moves(("learning_rate", 0.5), ("beta", 1)), 100,
          "non-finite loss or weights: halve the learning rate, raise the KL coefficient"),
    Skill("out_of_memory", flagged(P.OUT_OF_MEMORY),
          moves(("num_generations", -1), ("max_completion_length", -1)), 100,
          "out of memory: fewer generations and shorter completions"),
    Skill("kl_blowup", flagged(P.KL_BLOWUP),
          moves(("beta", 1), ("learning_rate", -1), ("epsilon", -1)), 90,
          "policy far from the reference: raise beta, lower lr, tighten the clip range"),
    Skill("regression", _regressed, moves(("learning_rate", -1), ("beta", 1)), 80,
          f"dev score fell by more than {REGRESSION_SE} standard error: smaller, anchored steps"),
    Skill("entropy_collapse", flagged(P.ENTROPY_COLLAPSE),
          moves(("temperature", 1), ("learning_rate", -1), ("epsilon_high", 1)), 70,
          "sampling nearly greedy: hotter sampling, lower lr, clip-higher if controlled"),
    Skill("high_truncation", flagged(P.HIGH_TRUNCATION),
          moves(("max_completion_length", 1)), 60,
          "completions cut at the length limit: allow longer completions"),
    Skill("zero_variance_unsolved", _zero_var(low=True),
          moves(("num_generations", 1), ("temperature", 1), ("difficulty", -1)), 55,
          "groups all wrong: more and more diverse samples, easier training data"),
    Skill("zero_variance_saturated", _zero_var(low=False),
          moves(("difficulty", 1), ("num_generations", 1)), 55,
          "groups all right: harder training data, larger groups to find failures"),
    Skill("under_update", _under_update, moves(("learning_rate", 1), ("beta", -1)), 40,
          f"KL below {UNDER_UPDATE_KL} and no gain: the policy barely moves, take larger steps"),
    Skill("plateau_saturated", _plateau(saturated=True), moves(("difficulty", 1)), 35,
          "dev flat and training reward saturated: harder training data"),
    Skill("plateau", _plateau(saturated=False),
          moves(("max_completion_length", 1), ("num_generations", 1)), 30,
          "dev flat: more capacity (longer completions, larger groups)"),
)

# Always fire, lowest priority: they rank after every diagnosis and fill the list to K.
EXPLORATION_MOVES: tuple[Skill, ...] = (
    Skill("keep", _always, moves(), 10, "healthy: keep the current hyperparameters"),
    Skill("capacity_up", _always, moves(("max_completion_length", 1), ("num_generations", 1)), 9,
          "longer completions and larger groups"),
    Skill("lr_down", _always, moves(("learning_rate", -1)), 8, "lower learning rate"),
    Skill("lr_up", _always, moves(("learning_rate", 1)), 7, "higher learning rate"),
    Skill("beta_up", _always, moves(("beta", 1)), 6, "stronger KL anchor"),
    Skill("beta_down", _always, moves(("beta", -1)), 5, "weaker KL anchor"),
    Skill("temperature_up", _always, moves(("temperature", 1)), 4, "hotter sampling"),
    Skill("temperature_down", _always, moves(("temperature", -1)), 3, "cooler sampling"),
    Skill("difficulty_up", _always, moves(("difficulty", 1)), 2, "harder training data"),
)


@dataclass
class SkillLibrary:
    """An ordered set of skills; extend with ``register`` or ``SkillLibrary(extra=[...])``."""

    skills: list[Skill] = field(default_factory=lambda: [*DIAGNOSTIC_SKILLS, *EXPLORATION_MOVES])
    extra: Iterable[Skill] = ()

    def __post_init__(self) -> None:
        for s in list(self.extra):
            self.register(s)
        self.extra = ()

    def register(self, skill: Skill) -> Skill:
        """Add a skill, replacing one of the same name."""
        self.skills = [s for s in self.skills if s.name != skill.name] + [skill]
        return skill

    def triggered(self, summary: StateSummary) -> list[Skill]:
        """Skills that fire on ``summary``, highest priority first (ties: registration order)."""
        return sorted((s for s in self.skills if s.trigger(summary)), key=lambda s: -s.priority)

    def proposals(self, summary: StateSummary | Mapping[str, Any], space: Any,
                  k: int) -> list[Candidate]:
        """Up to ``k`` distinct candidate next stages, ranked by the priority of their skill."""
        summary = as_summary(summary, space)
        current = {n: summary.hparams.get(n, v) for n, v in default_hparams(space).items()}
        out: list[Candidate] = []
        for skill in self.triggered(summary):
            hp = skill.remedy(dict(current), space)
            if hp == current and skill.trigger is not _always:
                continue        # a diagnosis whose remedy is blocked at the grid's edge
            if all(hp != p.hparams for p in out):
                out.append(Candidate(skill.name, hp, skill.description))
            if len(out) >= k:
                break
        return out

    def propose(self, summary: StateSummary | Mapping[str, Any], space: Any,
                k: int) -> list[dict[str, Any]]:
        return [p.hparams for p in self.proposals(summary, space, k)]


DEFAULT_LIBRARY = SkillLibrary()


def register_skill(skill: Skill) -> Skill:
    """Add a skill to the default library (used by ``propose`` and the ``skills`` controller)."""
    return DEFAULT_LIBRARY.register(skill)


def propose(state_summary: StateSummary | Mapping[str, Any], space: Any, k: int,
            library: SkillLibrary | None = None) -> list[dict[str, Any]]:
    """K distinct candidate next-stage hyperparameter dicts, ranked by skill priority."""
    return (library or DEFAULT_LIBRARY).propose(state_summary, space, k)


def as_summary(x: StateSummary | Mapping[str, Any], space: Any) -> StateSummary:
    """Accept a StateSummary or a plain dict with the same keys (hparams default to the task's)."""
    if isinstance(x, StateSummary):
        return x
    keys = ("hparams", "metrics", "history", "dev_scores", "pathologies")
    kw = {k: x[k] for k in keys if k in x}
    kw.setdefault("hparams", default_hparams(space))
    return StateSummary(**kw)


@dataclass
class SkillAgent:
    """Greedy along one trajectory: each stage, train the top ``width`` proposals, keep the best.

    ``width=None`` spends the budget evenly: the stages left over the stages left in the episode
    are the candidates of each stage (at most ``max_width``); with width 1 it simply applies the
    top remedy. Whatever the width, enough budget is kept to finish the episode with one candidate
    per remaining stage.
    """

    name: str = "skills"
    library: SkillLibrary | None = None
    width: int | None = None
    max_width: int = 4
    unspent_reason: ClassVar[str | None] = (
        "at most max_width candidates per stage (or fewer distinct remedies) along one episode: "
        "the budget beyond that pays for no candidate")

    def __post_init__(self) -> None:
        check_int("width", self.width, 1, optional=True)
        check_int("max_width", self.max_width, 1)
        if self.library is not None and not isinstance(self.library, SkillLibrary):
            raise ValueError(f"library must be a SkillLibrary or None, got {self.library!r}")

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        space, lib = tracker.space, self.library or DEFAULT_LIBRARY
        horizon = min(episode_stages(env), budget)
        path: list[dict[str, Any]] = []
        devs = [tracker.base_dev]
        state = tracker.root
        summary = StateSummary(default_hparams(space), dev_scores=tuple(devs), pathologies=())
        for depth in range(horizon):
            left = horizon - depth
            width = self.width or max(1, min(self.max_width, tracker.remaining // left))
            w = max(1, min(width, tracker.remaining - (left - 1)))
            tried = []
            for cand in lib.proposals(summary, space, w):
                if tracker.remaining < 1:      # the env's token budget ended the run
                    break
                tracker.load(state)
                dev, done = tracker.step(path + [cand.hparams])
                tried.append((dev, cand, env.unwrapped.save_state(), tracker.last_info, done))
            if not tried:
                break
            best = max(tried, key=lambda t: t[0])      # max keeps the first (highest priority) tie
            dev, cand, state, info, done = best
            tracker.trials.append({"stage": depth, "chosen": cand.skill,
                                   "candidates": [{"skill": c.skill, "hparams": c.hparams,
                                                   "dev": d} for d, c, *_ in tried]})
            path.append(cand.hparams)
            devs.append(dev)
            summary = StateSummary.from_info(cand.hparams, info, devs)
            if done:
                break
        return tracker.result(self.name)
