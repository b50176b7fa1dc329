"""The controller protocol, its result, and the helpers that several controllers share.

A controller is anything with ``run(env, budget, seed) -> RunResult``; the budget is a number of
trained stages, counted by the env, or, when the env has ``max_tokens`` (the standard
leaderboard's equal-token budget), the plan: those tokens bind, and ``budget`` is the stages they
buy at the default stage's cost (``Tracker``). Every controller trains through a ``Tracker``,
which applies the one selection rule (``SELECT_RULE_TEXT``) to what it trained. Two optional
class members tell the harness how a controller meets a budget: ``fits(budget, stages) -> str |
None`` says why it cannot do what its name says at that budget (None: it can; see ``fits``
below), and ``unspent_reason`` says why it may leave stages unspent. A user's controller, in
full::

    import controllers
    from controllers.base import Tracker, default_hparams

    class StepDownLR:
        name = "step-down-lr"
        def run(self, env, budget, seed=0):
            tracker = Tracker(env, budget, seed)   # resets; counts the budget; selects
            space, path = tracker.space, []
            hp = default_hparams(space)
            while tracker.remaining > 0:
                dev, done = tracker.step(path + [hp])   # trains one stage, inside the budget
                path.append(hp)
                lower = space.neighbour("learning_rate", hp["learning_rate"], -1)  # one step
                hp = {**hp, "learning_rate": lower}
                if done:
                    break
            return tracker.result(self.name)

    controllers.register("step-down-lr", StepDownLR)  # controllers.make("step-down-lr").run(env, 8)
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from metaenv.config import check_int
from metaenv.env import ENDED, BudgetExhausted

# What a run paid an LLM, in every RunResult.cost: chat completions answered, their prompt +
# completion tokens, expansions an LLM was asked for, and those the skills answered instead.
LLM_COST_KEYS = ("llm_calls", "llm_tokens", "llm_expansions", "llm_fallbacks")


class BudgetExceeded(RuntimeError):
    """Raised when a controller asks for a stage its budget cannot pay for."""


@dataclass
class RunResult:
    """What a controller hands to the harness: the chosen state, how it got there, what it cost."""

    name: str
    seed: int
    final_state: Any                       # env state handle: env.unwrapped.load_state(it)
    dev_score: float                       # dev score of final_state
    schedule: list[dict[str, Any]]         # hyperparameters of each stage on final_state's path
    base_dev_score: float = math.nan       # dev score of the root (the base model)
    trials: list[dict[str, Any]] = field(default_factory=list)   # what was explored
    tree: Any = None                       # tree-search controllers put their tree here
    cost: dict[str, float] = field(default_factory=dict)  # stages, tokens, seconds, LLM_COST_KEYS
    # (stages spent, dev score of the state the selection rule chose then)
    anytime: list[tuple[int, float]] = field(default_factory=list)
    select_fallback: bool = False          # no episode ended: the best state at any depth


@runtime_checkable
class Controller(Protocol):
    """Anything with a ``name`` and ``run``; budget in stages, deterministic for a seed."""

    name: str

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult: ...


def fits(controller: Any, budget: int, stages: int, space: Any = None) -> str | None:
    """Why ``controller`` cannot do what its name says at ``budget`` stages of ``stages``-stage
    episodes (one sentence), or None when it can; None for a controller without ``fits``.

    ``space`` (the env's HParamSpace) goes to a ``fits`` that takes it (the grid's design size
    depends on it)."""
    check = getattr(controller, "fits", None)
    if check is None:
        return None
    if space is not None and "space" in inspect.signature(check).parameters:
        return check(budget, stages, space=space)
    return check(budget, stages)


# ---- argument checks: a bad setting is named where it enters, before anything trains ------------

def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0,
                   open_low: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is a number in [low, high] ((low, high] if
    ``open_low``)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not (low < value if open_low else low <= value) or not value <= high:
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number >= 0."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_budget(budget: Any) -> None:
    """The budget of ``run``: a whole number of stages."""
    check_int("budget", budget, 0)


# ---- small helpers on the env's public surface --------------------------------------------------

def counters(env: gym.Env) -> dict[str, float]:
    """The env's cumulative cost counters as a plain dict (stages, tokens, seconds)."""
    b = env.unwrapped.budget
    raw = b if isinstance(b, dict) else vars(b)
    return {k: float(raw.get(k, 0.0)) for k in ("stages", "tokens", "seconds")}


def episode_stages(env: gym.Env) -> int:
    """Number of stages in one episode of this env (the length of a full schedule)."""
    return int(env.unwrapped.stages)


def default_hparams(space: Any) -> dict[str, Any]:
    """The task's default hyperparameters as a plain dict."""
    return plain(space.defaults)


def plain(hp: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters with numpy scalars turned into Python ones (JSON and Optuna storage)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in hp.items()}


# ---- the run tracker ----------------------------------------------------------------------------

# The one selection rule, applied by the Tracker for every controller.
SELECT_RULE = "final"
SELECT_RULE_TEXT = (
    "final: the best dev score among the states whose episode ended (terminated: its `stages` "
    "reached, or its episode token cap), so a run returns a whole schedule, as the env's return "
    "counts; where no episode ended within the budget, the best state at any depth, the base "
    "model included, and the run records that fallback")
# Under a token budget (the env's max_tokens) a run trains at most this many times its `budget`
# stages, however cheap its stages: the tokens bind, this only stops a run that never would.
STAGE_CAP_FACTOR = 2


@dataclass
class Best:
    """A candidate result: a state, its dev score and the schedule that made it from the root.

    ``state`` is None for a state trained by an earlier process of a resumed search: only a
    replay of ``schedule`` from the root rebuilds it (``Tracker.lost``).
    """

    dev: float
    state: Any
    schedule: list[dict[str, Any]]


class Tracker:
    """One controller run: resets the env, enforces the budget, applies the selection rule.

    Every controller trains only through ``step``, so the budget is checked against the env's own
    counters before each stage, and ``result`` returns the state the one selection rule chooses
    (``SELECT_RULE_TEXT``): the best dev state among those whose episode ended, else (recorded as
    a fallback) the best at any depth. Controllers select on dev, the harness scores the
    selection on test.

    The budget is ``budget`` stages. Under a token budget (the env's ``max_tokens``, as the
    leaderboard's standard preset sets it) the tokens bind instead: ``budget`` is then the plan,
    the stages those tokens buy at one planned stage's share of them, and ``remaining`` counts the
    planned stages the tokens left still buy, so a run of cheap stages trains more of them (at
    most ``STAGE_CAP_FACTOR`` x ``budget``) and one of dear stages fewer. ``remaining`` is 0 once
    the env refuses another stage, so a controller that checks it before each stage stops there.
    """

    def __init__(self, env: gym.Env, budget: int, seed: int = 0) -> None:
        check_budget(budget)
        self.env, self.budget, self.seed = env, int(budget), seed
        self.space = env.unwrapped.hparams
        self.last_obs, info = env.reset(seed=seed)
        self.start = counters(env)
        own = env.unwrapped.budget
        # The tokens this run may sample (None: a budget in stages).
        self.tokens = None if own.max_tokens is None else max(0, int(own.remaining_tokens))
        self.root = env.unwrapped.save_state()
        self.base_dev = float(info.get("dev_score", env.unwrapped.dev_score))
        self.best_any = Best(self.base_dev, self.root, [])
        self.best_final: Best | None = None
        # The best states of earlier processes of a resumed search (``resume``), lost with them.
        self.lost_any: Best | None = None
        self.lost_final: Best | None = None
        self.anytime: list[tuple[int, float]] = [(0, self.base_dev)]
        self.trials: list[dict[str, Any]] = []
        self.last_info: dict[str, Any] = info
        # Stages and cost paid by earlier processes of a resumed search (``resume``).
        self._prior: dict[str, float] = {"stages": 0.0, "tokens": 0.0, "seconds": 0.0}

    def _choose(self, lost: bool = True) -> Best:
        """The rule: the best ended state, else the best at any depth (a live state on a tie)."""
        tiers = ((self.best_final, self.lost_final), (self.best_any, self.lost_any))
        for tier in tiers:
            found = [b for b in tier[: 2 if lost else 1] if b is not None]
            if found:
                return max(found, key=lambda b: (b.dev, b.state is not None))
        raise AssertionError("the root is always a candidate")

    @property
    def chosen(self) -> Best:
        """The state ``result`` returns as of now."""
        return self._choose()

    @property
    def lost(self) -> list[dict[str, Any]] | None:
        """The schedule of the chosen state where an earlier process trained it (replay it from
        the root to rebuild it), else None."""
        chosen = self.chosen
        return chosen.schedule if chosen.state is None else None

    @property
    def best_dev(self) -> float:
        return self.chosen.dev

    @property
    def spent(self) -> int:
        """Stages paid so far, earlier processes of a resumed run included."""
        return int(counters(self.env)["stages"] - self.start["stages"] + self._prior["stages"])

    @property
    def spent_tokens(self) -> int:
        """Tokens paid so far, earlier processes of a resumed run included."""
        return int(counters(self.env)["tokens"] - self.start["tokens"] + self._prior["tokens"])

    @property
    def refusal(self) -> str | None:
        """Why the env refuses another stage (its max_stages or max_tokens is spent), or None."""
        return self.env.unwrapped.budget.refusal()

    @property
    def remaining(self) -> int:
        """Stages the run may still train (planned stages under a token budget): 0 once the
        env's own budget is spent."""
        if self.refusal is not None:
            return 0
        if self.tokens is None:
            return max(0, self.budget - self.spent)
        left = max(0, self.tokens - self.spent_tokens)
        by_tokens = left * self.budget // self.tokens if self.tokens else 0
        return max(0, min(by_tokens, STAGE_CAP_FACTOR * self.budget - self.spent))

    def units(self, tokens: float) -> int:
        """What a stage of ``tokens`` tokens costs of ``remaining``: 1 under a stage budget, its
        planned stages (at least 1) under a token budget."""
        if self.tokens is None or not self.tokens:
            return 1
        return max(1, math.ceil(tokens * self.budget / self.tokens))

    def load(self, state: Any) -> None:
        self.env.unwrapped.load_state(state)

    def step(self, schedule: Sequence[dict[str, Any]]) -> tuple[float, bool]:
        """Train the stage ``schedule[-1]`` from the loaded state; return (dev score, episode over).

        ``schedule`` is the whole path from the root, so a chosen state knows its schedule.
        """
        if self.remaining < 1:
            unit = f"token budget of {self.tokens}" if self.tokens is not None else (
                f"budget of {self.budget} stages")
            raise BudgetExceeded(self.refusal or f"{unit} is spent")
        try:
            # Values, not indices: a partial stage keeps the loaded state's values for the names
            # it leaves out (the env's step checks them on the grids).
            self.last_obs, _, terminated, truncated, info = self.env.step(dict(schedule[-1]))
        except BudgetExhausted as e:   # a wrapper's or another counter's limit: still the end
            raise BudgetExceeded(str(e)) from e
        self.last_info = info
        dev = float(info["dev_score"])
        self._offer(dev, [plain(h) for h in schedule], terminated and not truncated,
                    self.env.unwrapped.save_state)
        self.anytime.append((self.spent, self.chosen.dev))
        return dev, bool(terminated or truncated)

    def _offer(self, dev: float, path: list[dict[str, Any]], ended: bool,
               state: Callable[[], Any] | None) -> None:
        """Keep a state the rule may choose: ``state()`` saves it (None: lost, from ``resume``)."""
        if ended:
            slot = "best_final" if state is not None else "lost_final"
        elif self.best_final is None:     # past the first ended episode no other state counts
            slot = "best_any" if state is not None else "lost_any"
        else:
            return
        old = getattr(self, slot)
        if old is None or dev > old.dev:     # strict: the earliest of equal states wins
            setattr(self, slot, Best(dev, None if state is None else state(), path))

    def resume(self, trial: dict[str, Any], cost: Mapping[str, float]) -> None:
        """Count a trial that an earlier process of this run trained (a resumed search).

        Its ``cost`` joins the run's, the ``trial`` record (with its ``schedule``, ``dev_scores``,
        ``stages`` and ``episode_end``) joins ``trials`` marked ``resumed``, its states are
        candidates of the rule (lost with that process: ``lost`` says when one is chosen, and
        only a replay rebuilds it), and its dev scores extend the anytime curve.
        """
        for k, v in cost.items():
            if k in self._prior:
                self._prior[k] += v
        self.trials.append({**trial, "resumed": True})
        spent = int(self._prior["stages"])
        devs, schedule = trial["dev_scores"], trial["schedule"]
        before = spent - trial["stages"]
        for i, dev in enumerate(devs):
            ended = i == len(devs) - 1 and trial.get("episode_end") in ENDED
            self._offer(dev, [plain(h) for h in schedule[: i + 1]], ended, None)
            self.anytime.append((before + i + 1, self.chosen.dev))
        if not devs and trial["stages"]:    # a killed trial: paid, nothing kept
            self.anytime.append((spent, self.chosen.dev))

    def cost(self) -> dict[str, float]:
        now = counters(self.env)
        c = {k: now[k] - self.start[k] + self._prior[k] for k in now}
        c["stages"] = int(c["stages"])
        c.update(dict.fromkeys(LLM_COST_KEYS, 0))   # an LLM proposer fills these in
        return c

    def result(self, name: str, **extra: Any) -> RunResult:
        """The run's RunResult; the env is left loaded with the chosen state.

        A chosen state of an earlier process that was not replayed (the budget could not pay for
        it) gives way to the rule's choice among this process's states.
        """
        chosen = self.chosen if self.lost is None else self._choose(lost=False)
        fallback = chosen is self.best_any or chosen is self.lost_any
        self.load(chosen.state)
        return RunResult(name=name, seed=self.seed, final_state=chosen.state,
                         dev_score=chosen.dev, schedule=list(chosen.schedule),
                         base_dev_score=self.base_dev, trials=self.trials, cost=self.cost(),
                         anytime=list(self.anytime), select_fallback=fallback, **extra)


def run_schedule(tracker: Tracker, schedule: Sequence[dict[str, Any]],
                 on_stage: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``schedule`` stage by stage from the root state; return the per-stage dev scores.

    Stops early when the episode ends (divergence truncates it) or the budget runs out;
    ``on_stage(i, dev)`` is called after each stage (search.py records progress with it).
    """
    tracker.load(tracker.root)
    devs: list[float] = []
    for i in range(len(schedule)):
        if tracker.remaining < 1:
            break
        dev, done = tracker.step(schedule[: i + 1])
        devs.append(dev)
        if on_stage is not None:
            on_stage(i, dev)
        if done:
            break
    return devs
