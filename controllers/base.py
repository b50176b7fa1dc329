"""The controller protocol, its result, and the helpers that several controllers share.

A controller is anything with ``run(env, budget, seed) -> RunResult``; the budget is a number of
trained stages, counted by the env (and, when the env has ``max_tokens``, ends early once those
tokens are spent). Two optional class members tell the harness how a controller meets a budget:
``fits(budget, stages) -> str | None`` says why it cannot do what its name says at that budget
(None: it can; see ``fits`` below), and ``unspent_reason`` says why it may leave stages unspent.
A user's controller, in full::

    import controllers
    from controllers.base import Tracker, default_hparams

    class StepDownLR:
        name = "step-down-lr"
        def run(self, env, budget, seed=0):
            tracker = Tracker(env, budget, seed)   # resets; counts stages; keeps the best dev state
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

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from metaenv.env import BudgetExhausted

# What a run paid an LLM, in every RunResult.cost: chat completions answered, their prompt +
# completion tokens, expansions an LLM was asked for, and those the skills answered instead.
LLM_COST_KEYS = ("llm_calls", "llm_tokens", "llm_expansions", "llm_fallbacks")


class BudgetExceeded(RuntimeError):
    """Raised when a controller asks for a stage its budget cannot pay for."""


# Which states a run may choose: the best on dev at any stage, or at the episode's last stage.
Selection = Literal["any", "final"]


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
    anytime: list[tuple[int, float]] = field(default_factory=list)  # (stages spent, best dev)


@runtime_checkable
class Controller(Protocol):
    """Anything with a ``name`` and ``run``; budget in stages, deterministic for a seed."""

    name: str

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult: ...


def fits(controller: Any, budget: int, stages: int) -> str | None:
    """Why ``controller`` cannot do what its name says at ``budget`` stages of ``stages``-stage
    episodes (one sentence), or None when it can; None for a controller without ``fits``."""
    check = getattr(controller, "fits", None)
    return None if check is None else check(budget, stages)


# ---- argument checks: a bad setting is named where it enters, before anything trains ------------

def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is an int >= ``minimum`` (or None if
    ``optional``); a float or a bool is refused, not truncated."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be >= {minimum} and an int (not a float or a bool)"
                         f"{' or None' if optional else ''}, got {value!r}")


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

@dataclass
class Best:
    """A candidate result: a state, its dev score and the schedule that made it from the root."""

    dev: float
    state: Any
    schedule: list[dict[str, Any]]


class Tracker:
    """One controller run: resets the env, enforces the budget, keeps the best-dev state.

    Every controller trains only through ``step``, so the budget is checked against the env's own
    counters before each stage, and the best state seen on dev is what ``result`` returns:
    controllers select on dev, the harness scores the selection on test. ``select="any"`` chooses
    among every state, the root included; ``select="final"`` among the states at the episode's
    last stage (whole schedules), falling back to the best of any stage until one exists.

    The budget ends at ``budget`` stages or when the env refuses another stage (its own
    ``max_stages`` or ``max_tokens`` is spent, e.g. under an equal-token budget): ``remaining`` is
    then 0, so a controller that checks it before each stage stops there, with the best state so
    far as its result.
    """

    def __init__(self, env: gym.Env, budget: int, seed: int = 0, select: Selection = "any") -> None:
        check_budget(budget)
        if select not in ("any", "final"):
            raise ValueError(f"select must be 'any' or 'final', got {select!r}")
        self.env, self.budget, self.seed, self.select = env, int(budget), seed, select
        self.space = env.unwrapped.hparams
        self.last_obs, info = env.reset(seed=seed)
        self.start = counters(env)
        self.root = env.unwrapped.save_state()
        self.base_dev = float(info.get("dev_score", env.unwrapped.dev_score))
        self.best_any = Best(self.base_dev, self.root, [])
        self.best_final: Best | None = None
        self.anytime: list[tuple[int, float]] = [(0, self.base_dev)]
        self.trials: list[dict[str, Any]] = []
        self.last_info: dict[str, Any] = info
        # Stages and cost paid by earlier processes of a resumed search (``resume``).
        self._prior: dict[str, float] = {"stages": 0.0, "tokens": 0.0, "seconds": 0.0}

    @property
    def chosen(self) -> Best:
        """The state ``result`` returns as of now."""
        return self.best_final if self.best_final is not None else self.best_any

    @property
    def best_dev(self) -> float:
        return self.chosen.dev

    @property
    def best_state(self) -> Any:
        return self.chosen.state

    @property
    def best_schedule(self) -> list[dict[str, Any]]:
        return self.chosen.schedule

    @property
    def spent(self) -> int:
        """Stages paid so far, earlier processes of a resumed run included."""
        return int(counters(self.env)["stages"] - self.start["stages"] + self._prior["stages"])

    @property
    def refusal(self) -> str | None:
        """Why the env refuses another stage (its max_stages or max_tokens is spent), or None."""
        return self.env.unwrapped.budget.refusal()

    @property
    def remaining(self) -> int:
        """Stages the run may still train: 0 once the env's own budget is spent."""
        return 0 if self.refusal is not None else max(0, self.budget - self.spent)

    def load(self, state: Any) -> None:
        self.env.unwrapped.load_state(state)

    def step(self, schedule: Sequence[dict[str, Any]]) -> tuple[float, bool]:
        """Train the stage ``schedule[-1]`` from the loaded state; return (dev score, episode over).

        ``schedule`` is the whole path from the root, so a new best state knows its schedule.
        """
        if self.remaining < 1:
            raise BudgetExceeded(self.refusal or f"budget of {self.budget} stages is spent")
        try:
            # Values, not indices: a partial stage keeps the loaded state's values for the names
            # it leaves out (the env's step checks them on the grids).
            self.last_obs, _, terminated, truncated, info = self.env.step(dict(schedule[-1]))
        except BudgetExhausted as e:   # a wrapper's or another counter's limit: still the end
            raise BudgetExceeded(str(e)) from e
        self.last_info = info
        dev = float(info["dev_score"])
        path = [plain(h) for h in schedule]
        # strict: the earliest of equal states wins
        if dev > self.best_any.dev:
            self.best_any = Best(dev, self.env.unwrapped.save_state(), path)
        final = terminated and not truncated      # the episode's last stage, trained in full
        if self.select == "final" and final and (self.best_final is None
                                                 or dev > self.best_final.dev):
            state = self.best_any.state if self.best_any.schedule is path else (
                self.env.unwrapped.save_state())
            self.best_final = Best(dev, state, path)
        # "any": the best so far (max: a resumed search's curve holds its earlier processes' best);
        # "final": the dev score of the state the run would return now.
        now = self.best_dev if self.select == "final" else max(self.best_dev, self.anytime[-1][1])
        self.anytime.append((self.spent, now))
        return dev, bool(terminated or truncated)

    def resume(self, trial: dict[str, Any], cost: Mapping[str, float]
               ) -> tuple[float, list[dict[str, Any]]] | None:
        """Count a trial that an earlier process of this run trained (a resumed search).

        Its ``cost`` joins the run's, the ``trial`` record (with its ``schedule``, ``dev_scores``
        and ``stages``) joins ``trials`` marked ``resumed``, and its dev scores extend the anytime
        curve. Returns (dev, schedule prefix) of its last state that beat the curve so far, or
        None: that state is lost with the earlier process, and only a replay rebuilds it.
        """
        for k, v in cost.items():
            self._prior[k] += v
        self.trials.append({**trial, "resumed": True})
        spent = int(self._prior["stages"])
        before, curve = spent - trial["stages"], self.anytime[-1][1]
        best = None
        for i, dev in enumerate(trial["dev_scores"]):
            if dev > curve:      # curve starts at the base dev score: strictly better states only
                best = (dev, trial["schedule"][: i + 1])
            curve = max(curve, dev)
            self.anytime.append((before + i + 1, curve))
        if not trial["dev_scores"] and trial["stages"]:    # a killed trial: paid, nothing kept
            self.anytime.append((spent, curve))
        return best

    def cost(self) -> dict[str, float]:
        now = counters(self.env)
        c = {k: now[k] - self.start[k] + self._prior[k] for k in now}
        c["stages"] = int(c["stages"])
        c.update(dict.fromkeys(LLM_COST_KEYS, 0))   # an LLM proposer fills these in
        return c

    def result(self, name: str, **extra: Any) -> RunResult:
        """The run's RunResult; the env is left loaded with the chosen state."""
        chosen = self.chosen
        self.load(chosen.state)
        return RunResult(name=name, seed=self.seed, final_state=chosen.state,
                         dev_score=chosen.dev, schedule=list(chosen.schedule),
                         base_dev_score=self.base_dev, trials=self.trials, cost=self.cost(),
                         anytime=list(self.anytime), **extra)


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
