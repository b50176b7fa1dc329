"""Controllers behind one protocol: ``controllers.make(name, **kwargs).run(env, budget, seed)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from controllers.base import BudgetExceeded, Controller, RunResult, Tracker
from controllers.fixed import Fixed, Progressive
from controllers.llmzero import LLMZero, make_llmzero
from controllers.pbt import PBT
from controllers.sb3 import SB3
from controllers.search import TPE, Grid, Random
from controllers.skills import SkillAgent, SkillLibrary, propose, register_skill

REGISTRY: dict[str, Callable[..., Controller]] = {}


def register(name: str, factory: Callable[..., Controller]) -> Callable[..., Controller]:
    """Make ``factory(**kwargs)`` buildable as ``make(name, **kwargs)``; replaces a same name."""
    REGISTRY[name] = factory
    return factory


def make(name: str, **kwargs) -> Controller:
    """Build the controller registered as ``name`` with its keyword arguments."""
    if name not in REGISTRY:
        raise ValueError(f"unknown controller {name!r}; valid names: {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):   # make_llmzero names its own
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(f"controller {name!r} takes no setting(s) {unknown}; it takes "
                            f"{list(params)}")
    return factory(**kwargs)


for _name, _factory in {"fixed": Fixed, "progressive": Progressive, "grid": Grid,
                        "random": Random, "tpe": TPE, "pbt": PBT, "skills": SkillAgent,
                        "llmzero": make_llmzero, "sb3": SB3}.items():
    register(_name, _factory)

__all__ = ["REGISTRY", "BudgetExceeded", "Controller", "LLMZero", "RunResult", "SkillLibrary",
           "Tracker", "make", "propose", "register", "register_skill"]
