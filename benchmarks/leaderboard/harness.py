"""The leaderboard: every controller on every task under one budget, scored once on test.

    python -m benchmarks.leaderboard --preset quick            # smoke run, ~8 min on a 2-core CPU
    python -m benchmarks.leaderboard --preset standard         # the leaderboard, 10 paired seeds
    python -m benchmarks.leaderboard --preset standard --budget-unit stages  # equal stages
    python -m benchmarks.leaderboard --preset full --executor ray   # GPUs, >= 5 seeds
    python -m benchmarks.leaderboard --preset full --model DIR --data-path DATA  # local files

The protocol: each controller spends the same budget deciding on dev; the Tracker applies one
selection rule to what it trained (``controllers.base.SELECT_RULE_TEXT``); the harness loads the
state it chose and scores it once on the held-out test split; the base model is scored once per
task. Seeds are paired: a seed gives every controller the same base, data order and evaluation
items. Where the preset says so, each run's chosen schedule is then retrained open loop from the
base model on a fresh seed (``transfer``), under the same episode token cap, which scores the
strategy rather than the lucky checkpoint. Each finished run is saved to its own HDF5 file
atomically, so the script can be killed at any moment and rerun with the same arguments: it skips
finished runs and re-runs only the one(s) in flight; a fresh clone, which has the committed
``leaderboard.h5`` but not the run files, goes on from the runs it holds (except in a smoke run
such as ``quick``, which always trains). The last line of output is
``runs=<n> tasks=<n> controllers=<n> wall_s=<x>``.

The budget's unit is the preset's: the standard preset's is tokens (prompt + completion tokens
sampled over all of a run's episodes, the same for every controller: by default ``budget`` times
one default stage's tokens, i.e. ``budget / stages`` default episodes' worth;
executors.token_budget), the quick
preset's stages. ``--budget-unit`` picks the other one, whose runs go to their own folder
(``results/<preset>-<unit>/``). Every run's env shares the stage cache ``<out>/stage_cache``
(``metaenv.stage_cache``; ``--no-stage-cache`` turns it off): a stage whose path from the base
model any run or replay trained before is loaded, and charged as trained.
``--workers N`` runs N runs at a time in spawned processes (the standard preset's default is 2):
a controller registered by your own script joins them when it is registered at import time and
the script calls ``main()`` under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from benchmarks.leaderboard import report, runlog
from benchmarks.leaderboard.executors import BUDGET_UNITS, RunSpec, make_executor
from benchmarks.leaderboard.runlog import BASE
from inner.tasks import task_names
from metaenv.config import DEFAULT_CAP, SCALE_DEFAULTS, EnvConfig

TASKS = task_names()  # every registered task (the four built-in ones in a fresh process)
STAGE_CACHE = "stage_cache"  # the stage cache's folder in the output folder
# The LLM-proposer row of the LLMZero agent; added only when an endpoint is configured.
LLM_ROW = "llmzero-llm"


@dataclass(frozen=True)
class Preset:
    """One leaderboard configuration; command-line flags override single fields."""

    name: str
    tasks: tuple[str, ...]
    # None: every registered controller (controllers.REGISTRY, in its order, which the tables
    # keep), so a controller registered before the harness runs joins every preset.
    controllers: tuple[str, ...] | None
    seeds: tuple[int, ...]
    # Stages every controller may train on a task (all trials/branches together); in tokens mode,
    # the token budget's default is budget / stages episodes' worth (executors.token_budget).
    budget: int
    stages: int  # stages in one episode, i.e. the length of a schedule
    steps_per_stage: int
    dev_size: int
    test_size: int
    scale: str = "embedded"
    model: str | None = None  # paper scale: a Hugging Face id or a local path
    data_path: str | None = None  # paper scale: a folder with one sub-folder of data per task
    device: str = "auto"  # auto -> cuda when torch sees one
    # Any other LLMZeroEnv arguments (hparam_grid, fixed_hparams, eval_max_new_tokens, ...).
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # Per-controller arguments for controllers.make, e.g. a smaller PBT population for a budget.
    controller_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: str = "results"  # output folder of stage-budget runs; tokens mode: results/<name>-tokens
    # Transfer: each run's chosen schedule is retrained from the base model on seed +
    # replay_seed_offset (a seed no run of the preset uses) and scored on test. None: no replay.
    replay_seed_offset: int | None = None
    budget_unit: str = "stages"  # "tokens": every controller gets the same token budget
    # Tokens mode; None -> budget x one default stage's measured tokens (budget / stages default
    # episodes' worth; executors.token_budget).
    budget_tokens: int | None = None
    stage_cache: bool = True  # every run's env shares <out>/stage_cache
    conclusions: bool = True  # False: a smoke run, and its report says so
    # How, not what: torch threads per run (one and two gave the same numbers where checked),
    # and runs at a time in worker processes with the local executor.
    threads: int = 2
    workers: int = 1
    # Filled by resolve(): controllers left out and why, sb3's meta-training seeds. They go into
    # the report's header, not into the settings.
    notes: tuple[str, ...] = ()


EMBEDDED = SCALE_DEFAULTS["embedded"]  # the env's own embedded episode
# The embedded presets turn the env's episode token cap on (off by default in the env): a larger
# group or a longer completion buys fewer stages, within a run's budget and within an episode.
CAPPED = {"episode_token_cap": DEFAULT_CAP}


PRESETS = {
    # A smoke run, not for conclusions (one seed, dev 32: one item weighs 0.031). Fits 10 minutes
    # on the 2-core CPU: a stage (five GRPO steps of 8 prompts x 8 completions, then 32 greedy
    # dev answers) takes 2-5 s; 4 tasks x 9 controllers (220 stages) plus the test evaluations
    # took 488 s. Three-stage schedules are the shortest in which a regularization parameter can
    # change direction. Its budget stays in stages, which keeps it short and its header says so.
    "quick": Preset(name="quick", tasks=TASKS, controllers=None,
                    seeds=(0,), budget=6, stages=3, steps_per_stage=5, dev_size=32,
                    test_size=128, env_kwargs=CAPPED, conclusions=False),
    # The leaderboard: 10 paired seeds (an exact sign-flip p over seeds can then reach 0.002), the
    # env's embedded episode (8 stages x 5 GRPO steps) with its episode token cap, a budget of 4
    # default episodes' worth of tokens (32 default stages') for every controller, dev 128 (one item
    # weighs 0.008), the env's test split (256), and the transfer replay on seed + 1000 (never an
    # evaluation seed).
    # Wall time: on 2026-12-06, 5 seeds in stages took 184 runs in 3.1 h of wall time (5.6 h of
    # run time; logic's searches took 2-3x gsm8k's); twice the seeds cost twice that, less what
    # the stage cache loads instead of training (every search's default first stage, fixed's
    # episode, the replays' shared prefixes). Two one-thread workers on the two cores: two torch
    # threads per run are no substitute: on this shared machine a two-thread stage ran 10-15x
    # slower than a one-thread one whenever another process was busy (3 stages: 130-200 s
    # against 10-14 s).
    "standard": Preset(name="standard", tasks=TASKS, controllers=None, seeds=tuple(range(10)),
                       budget=4 * EMBEDDED["stages"], stages=EMBEDDED["stages"],
                       steps_per_stage=EMBEDDED["steps_per_stage"], dev_size=128,
                       test_size=EMBEDDED["test_size"], env_kwargs=CAPPED,
                       out="results/standard", replay_seed_offset=1000, budget_unit="tokens",
                       threads=1, workers=2),
    # Paper-like: Qwen3-0.6B on GPUs, the env's paper-scale episode (8 stages of 25 steps), a
    # budget of 3 episodes' worth of stages, 5 seeds.
    "full": Preset(name="full", tasks=TASKS, controllers=None,
                   seeds=(0, 1, 2, 3, 4), budget=24, stages=8, steps_per_stage=25,
                   dev_size=128, test_size=500, scale="paper", model="Qwen/Qwen3-0.6B"),
}


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (the --env-kwargs and --controller-kwargs values)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def _names(values: list[str] | None) -> list[str] | None:
    # Accept both "--tasks gsm8k math" and "--tasks gsm8k,math".
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.leaderboard",
        description="Run controllers x tasks x seeds under one budget; score on test once.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help=f"subset of {', '.join(TASKS)}")
    p.add_argument("--controllers", nargs="+", metavar="NAME",
                   help="controller names (default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=at_least(0), metavar="SEED",
                   help="e.g. --seeds 0 1 2")
    p.add_argument("--budget", type=at_least(1), metavar="N",
                   help="stages per run, the same for every controller (tokens mode: the "
                        "token budget's default is N / --stages episodes' worth)")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS,
                   help="tokens (the standard preset's): every controller gets the same token "
                        "budget (--budget-tokens, by default --budget x one default stage's "
                        "tokens, i.e. --budget / --stages default episodes' worth) and plans "
                        "with the stages it buys at one default stage's tokens; or stages (the "
                        "quick preset's)")
    p.add_argument("--budget-tokens", type=at_least(1), metavar="N",
                   help="tokens mode: prompt + completion tokens sampled per run")
    p.add_argument("--no-stage-cache", action="store_true",
                   help="train every stage (default: runs share OUT/stage_cache, where a stage "
                        "whose path from the base model was trained before is loaded)")
    p.add_argument("--replay-seed-offset", type=at_least(1), metavar="K",
                   help="retrain each run's chosen schedule on seed + K and score it on test "
                        "(default: the preset's; standard: 1000)")
    p.add_argument("--stages", type=at_least(1), metavar="N",
                   help="stages per episode (schedule length)")
    p.add_argument("--steps-per-stage", type=at_least(1), metavar="N",
                   help="GRPO steps per stage")
    p.add_argument("--dev-size", type=at_least(1), metavar="N",
                   help="dev examples (controllers select)")
    p.add_argument("--test-size", type=at_least(1), metavar="N",
                   help="test examples (scored once)")
    p.add_argument("--scale", choices=("embedded", "paper"))
    p.add_argument("--model", help="paper scale: Hugging Face model id or local path")
    p.add_argument("--data-path", metavar="DIR",
                   help="paper scale: local data instead of the hub, DIR/<task>/ per task "
                        "(files in the hub dataset's columns)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the preset's; auto)")
    p.add_argument("--env-kwargs", type=json_object, default=None, metavar="JSON",
                   help='more LLMZeroEnv arguments, e.g. \'{"fixed_hparams": '
                        '{"prompts_per_step": 4}}\' (merged over the preset\'s)')
    p.add_argument("--controller-kwargs", type=json_object, default=None, metavar="JSON",
                   help='per-row arguments for controllers.make, e.g. \'{"llmzero-llm": '
                        '{"extra_body": {"chat_template_kwargs": {"enable_thinking": false}}}}\'')
    p.add_argument("--out", default=None,
                   help="output folder (default: the preset's, e.g. results/ for quick, "
                        "results/standard/; the other budget unit: results/<preset>-<unit>/)")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: local)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads per run (default: the preset's; quick 2, standard 1)")
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="local executor: runs at a time, each in its own process (default: the "
                        "preset's; standard 2, for two one-thread runs on the 2-core CPU)")
    p.add_argument("--llm-base-url", default=os.environ.get("LLMZERO_BASE_URL"),
                   help="OpenAI-compatible endpoint (env LLMZERO_BASE_URL); adds the "
                        f"{LLM_ROW} row. The key is read from LLMZERO_API_KEY/OPENAI_API_KEY "
                        "by the agent and never written anywhere")
    p.add_argument("--llm-model", default=os.environ.get("LLMZERO_MODEL"),
                   help="model name at that endpoint (env LLMZERO_MODEL; optional when the "
                        "endpoint serves one model)")
    p.add_argument("--no-report", action="store_true", help="skip tables and plots")
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """The parsed arguments, with what argparse cannot check itself refused by ``p.error``."""
    a.tasks, a.controllers = _names(a.tasks), _names(a.controllers)
    if a.out is not None and (blocked := file_in_the_way(Path(a.out))) is not None:
        p.error(f"argument --out: {blocked} is a file; --out names a folder (made if missing)")
    for name, kwargs in (a.controller_kwargs or {}).items():
        why = controller_kwargs_error(name, kwargs, a)
        if why:
            p.error(f"argument --controller-kwargs: {why}")
    return a


def file_in_the_way(folder: Path) -> Path | None:
    """The path itself or its first ancestor that exists and is not a folder, if any."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def controller_kwargs_error(name: str, kwargs: Any, a: argparse.Namespace) -> str | None:
    """Why controllers.make cannot take `kwargs` for the row `name`, or None. An unknown row
    name is left to resolve(), which lists the valid ones."""
    import controllers

    make_name = "llmzero" if name == LLM_ROW else name
    if make_name not in controllers.REGISTRY:
        return None
    if not isinstance(kwargs, dict):
        return f"{name}'s settings must be a JSON object, got {json.dumps(kwargs)}"
    params = inspect.signature(controllers.REGISTRY[make_name]).parameters
    taken = [k for k, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    open_ended = any(v.kind == v.VAR_KEYWORD for v in params.values())
    unknown = sorted(set(kwargs) - set(taken))
    if unknown and not open_ended:
        return (f"{name} takes no {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(taken) or 'no settings'}")
    if name == LLM_ROW:  # as build_specs makes it; the openai client only connects when used
        kwargs = {**kwargs, "proposer": "llm", "base_url": a.llm_base_url, "model": a.llm_model}
    try:
        controllers.make(make_name, **kwargs)
    except (TypeError, ValueError) as err:  # llmzero lists what it takes in its own message
        return f"{name}: {err}"
    return None


def registered_controllers() -> tuple[str, ...]:
    """Every name controllers.make knows, in registration order."""
    import controllers

    return tuple(controllers.REGISTRY)


def valid_controllers() -> list[str]:
    """Controller names controllers.make knows, plus the LLM row."""
    return sorted({*registered_controllers(), LLM_ROW})


def unavailable(name: str, kwargs: dict[str, Any]) -> str | None:
    """Why a preset's controller cannot run in this checkout, or None."""
    if name == "sb3" and "policy_path" not in kwargs:
        from controllers.sb3 import POLICY

        if not POLICY.is_file():
            return f"no meta-trained policy at {POLICY} (python -m benchmarks.meta_train)"
    return None


# Meta-trains the sb3 policy for the standard preset on seeds 100-104 (meta_train's default).
SB3_REGENERATE = "python -m benchmarks.meta_train --preset standard --collect-episodes 10"


def sb3_training_seeds(kwargs: dict[str, Any]) -> list[int] | None:
    """The env seeds the sb3 policy was meta-trained on, from its metadata; None if unstated."""
    from controllers.sb3 import POLICY, metadata_path

    meta = metadata_path(kwargs.get("policy_path") or POLICY)
    seeds = json.loads(meta.read_text()).get("train_seeds") if meta.is_file() else None
    return None if seeds is None else [int(s) for s in seeds]


def sb3_in_sample(kwargs: dict[str, Any], seeds: set[int]) -> str | None:
    """Why the sb3 policy's score would be in-sample on these seeds, or None."""
    trained = sb3_training_seeds(kwargs)
    if trained is None:
        return ("its policy does not declare the seeds it was meta-trained on, so they may be "
                f"evaluation seeds; regenerate it: {SB3_REGENERATE}")
    shared = sorted(seeds & set(trained))
    if shared:
        return (f"its policy was meta-trained on seeds {shared}, which this leaderboard "
                f"evaluates on; regenerate it on other seeds: {SB3_REGENERATE}")
    return None


def fit_reason(name: str, kwargs: dict[str, Any], budget: int, stages: int,
               spaces: dict[str, Any] | None = None) -> str | None:
    """Why a controller cannot do what its name says at this budget (its ``fits``) on some
    task (``spaces``: each task's action space), or None."""
    import controllers
    from controllers.base import fits

    ctrl = controllers.make(name, **kwargs)
    for task, space in (spaces or {"": None}).items():
        why = fits(ctrl, budget, stages, space)
        if why:
            return f"{why} ({task})" if task and len(spaces or {}) > 1 else why
    return None


def transfer_seeds(preset: Preset, seed: int) -> tuple[int, ...]:
    """The fresh seeds a run's chosen schedule is replayed on (the preset's declared rule)."""
    return () if preset.replay_seed_offset is None else (seed + preset.replay_seed_offset,)


def resolve(a: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides; unknown names are a clear SystemExit."""
    preset = PRESETS[a.preset]
    over = {k: getattr(a, k) for k in ("budget", "stages", "steps_per_stage", "dev_size",
                                       "test_size", "scale", "model", "data_path", "device",
                                       "budget_unit", "budget_tokens", "replay_seed_offset",
                                       "threads", "workers")
            if getattr(a, k) is not None}
    if a.env_kwargs:
        over["env_kwargs"] = {**preset.env_kwargs, **a.env_kwargs}
    if a.controller_kwargs:
        over["controller_kwargs"] = {**preset.controller_kwargs, **a.controller_kwargs}
    tasks = tuple(a.tasks or preset.tasks)
    bad = [t for t in tasks if t not in task_names()]
    if bad:
        raise SystemExit(f"unknown task(s) {', '.join(bad)}; valid tasks: "
                         f"{', '.join(task_names())}")
    seeds = tuple(a.seeds if a.seeds is not None else preset.seeds)
    if a.no_stage_cache:
        over["stage_cache"] = False
    preset = replace(preset, tasks=tasks, seeds=seeds, **over)
    check_budget(preset)
    check_data_path(preset)
    spaces = check_envs(preset)
    known = valid_controllers()
    ctrls = list(a.controllers or preset.controllers or registered_controllers())
    if not a.controllers:
        # The preset names every offline controller; keep those this checkout has.
        for c in (c for c in ctrls if c not in known):
            print(f"note: {c} left out of the preset: not registered")
        ctrls = [c for c in ctrls if c in known]
    bad = [c for c in ctrls if c not in known or c == BASE]
    if bad:
        raise SystemExit(f"unknown controller(s) {', '.join(bad)}; valid controllers: "
                         f"{', '.join(c for c in known)}")
    bad = [c for c in (a.controller_kwargs or {}) if c not in known]
    if bad:
        raise SystemExit(f"--controller-kwargs names unknown controller(s) {', '.join(bad)}; "
                         f"valid controllers: {', '.join(known)}")
    ctrls, notes = choose_controllers(preset, ctrls, named=bool(a.controllers), spaces=spaces)
    if not a.controllers and a.llm_base_url and "llmzero" in ctrls:
        ctrls.append(LLM_ROW)  # the same search as llmzero: it fits where llmzero does
    if LLM_ROW in ctrls and not a.llm_base_url:
        raise SystemExit(f"{LLM_ROW} needs an endpoint: --llm-base-url (or LLMZERO_BASE_URL)")
    return replace(preset, controllers=tuple(ctrls), notes=tuple(notes))


def choose_controllers(preset: Preset, ctrls: list[str], named: bool,
                       spaces: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """The controllers that run, and the notes for the report's header.

    A preset's own list leaves out a controller this checkout cannot run, one that cannot do
    what its name says at the preset's budget (its ``fits``), and sb3 when its policy was
    meta-trained on a seed the leaderboard evaluates on; each with its reason. Controllers named
    on the command line all run, except an in-sample sb3, which is refused.
    """
    evaluated = {*preset.seeds, *(t for s in preset.seeds for t in transfer_seeds(preset, s))}
    keep, notes = [], []
    for c in ctrls:
        kwargs = preset.controller_kwargs.get(c, {})
        reason = None
        if c != LLM_ROW:
            reason = unavailable(c, kwargs)
            if reason and named:
                raise SystemExit(f"{c} cannot run: {reason}")
            if reason is None and c == "sb3":
                reason = sb3_in_sample(kwargs, evaluated)
                if reason and named:
                    raise SystemExit(f"sb3 cannot be scored on seeds {sorted(evaluated)}: "
                                     f"{reason}")
            if reason is None:
                # Budget and episode length in stages; tokens mode plans with as many stages.
                why = fit_reason(c, kwargs, preset.budget, preset.stages, spaces)
                if why and named:
                    notes.append(f"{c} runs as named, but it does not fit the budget: {why}")
                    print(f"note: {notes[-1]}")
                reason = None if named else why
        if reason:
            notes.append(f"{c} left out: {reason}")
            print(f"note: {notes[-1]}")
            continue
        keep.append(c)
        if c == "sb3":
            trained = sb3_training_seeds(kwargs)
            notes.append(f"sb3's policy was meta-trained on seeds {trained}, disjoint from the "
                         f"evaluated seeds {sorted(evaluated)}")
    return keep, notes


def check_budget(preset: Preset) -> None:
    """A clear SystemExit for a budget unit, token budget or replay rule that cannot work."""
    if preset.budget_unit not in BUDGET_UNITS:
        raise SystemExit(f"budget unit must be one of {', '.join(BUDGET_UNITS)}, "
                         f"got {preset.budget_unit!r}")
    if preset.budget_tokens is not None and preset.budget_unit != "tokens":
        raise SystemExit("--budget-tokens sets a token budget: use it with --budget-unit tokens")
    if preset.budget_tokens is not None and preset.budget_tokens < 1:
        raise SystemExit(f"--budget-tokens must be >= 1, got {preset.budget_tokens}")
    reused = sorted({t for s in preset.seeds for t in transfer_seeds(preset, s)}
                    & set(preset.seeds))
    if reused:
        raise SystemExit(f"replay seed(s) {reused} (seed + {preset.replay_seed_offset}) are "
                         "also evaluation seeds; a replay needs fresh seeds: choose another "
                         "--replay-seed-offset")


def default_out(preset: Preset) -> str:
    """Where a preset writes: its folder, or results/<name>-<unit> in the budget unit that is not
    its own, so that runs of the two units never meet on resume."""
    own = PRESETS[preset.name].budget_unit if preset.name in PRESETS else "stages"
    unit = preset.budget_unit
    return preset.out if unit == own else f"results/{preset.name}-{unit}"


def check_envs(preset: Preset) -> dict[str, Any]:
    """Build each task's env once with the run's settings (no model loads), so that a bad env
    setting is a clear SystemExit before any run starts, the base runs included; returns each
    task's action space (``HParamSpace``)."""
    import gymnasium as gym

    from benchmarks.leaderboard.executors import worker_env_kwargs
    from metaenv import env_ids

    spaces = {}
    for task in preset.tasks:
        try:
            env = gym.make(env_ids()[task], **worker_env_kwargs(env_kwargs(preset, task)))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"the env of {task} cannot be built with these settings: "
                             f"{err}") from None
        spaces[task] = env.unwrapped.hparams
        env.close()
    return spaces


def env_kwargs(preset: Preset, task: str) -> dict[str, Any]:
    """The LLMZeroEnv arguments of every run of `task` (device "auto" resolved by the worker)."""
    kwargs: dict[str, Any] = {
        **preset.env_kwargs,
        "stages": preset.stages, "steps_per_stage": preset.steps_per_stage,
        "dev_size": preset.dev_size, "test_size": preset.test_size,
        "device": preset.device}
    if preset.scale != "embedded":
        kwargs["scale"] = preset.scale
    if preset.model:
        kwargs["model"] = preset.model
    if preset.data_path:
        kwargs["data_path"] = str(Path(preset.data_path) / task)
    return kwargs


def check_data_path(preset: Preset) -> None:
    """A clear SystemExit unless --data-path goes with the paper scale and has every task."""
    if preset.data_path is None:
        return
    if preset.scale != "paper":
        raise SystemExit("--data-path holds real datasets: use it with the paper scale "
                         "(--preset full or --scale paper)")
    missing = [t for t in preset.tasks if not (Path(preset.data_path) / t).exists()]
    if missing:
        raise SystemExit(f"--data-path {preset.data_path} has no data for {', '.join(missing)}; "
                         "expected one folder per task: "
                         f"{', '.join(f'{preset.data_path}/{t}/' for t in missing)}")


def build_specs(preset: Preset, a: argparse.Namespace) -> list[RunSpec]:
    """One base run per task, then every run.

    The base model's test score does not depend on the seed (greedy decoding of fixed test
    examples), so it is computed once per task, under seed 0.
    """
    from metaenv import env_ids

    out = Path(a.out or default_out(preset))
    # Absolute: a Ray worker's working folder is its own.
    cache = str((out / STAGE_CACHE).resolve()) if preset.stage_cache else None
    specs = []
    for task in preset.tasks:
        env_id, task_kwargs = env_ids()[task], env_kwargs(preset, task)
        specs.append(RunSpec(task, BASE, 0, 0, env_id, task_kwargs, threads=preset.threads))
        budget = {"budget_unit": preset.budget_unit, "budget_tokens": preset.budget_tokens,
                  "stage_cache": cache}
        for seed in preset.seeds:
            for c in preset.controllers:
                name, kwargs = c, dict(preset.controller_kwargs.get(c, {}))
                if c == LLM_ROW:
                    # Only the endpoint and model: the API key stays in the environment. The
                    # prompts and replies are kept with the results.
                    name = "llmzero"
                    run_dir = out / "llm" / runlog.run_filename(task, c, seed)[:-3]
                    kwargs |= {"proposer": "llm", "base_url": a.llm_base_url,
                               "model": a.llm_model, "run_dir": str(run_dir)}
                specs.append(RunSpec(task, c, seed, preset.budget, env_id, task_kwargs, name,
                                     kwargs, threads=preset.threads,
                                     replay_seeds=transfer_seeds(preset, seed), **budget))
    return specs


def fingerprint(spec: RunSpec) -> str:
    """What must match for a saved run to count as this run (the key alone is not enough)."""
    kwargs = {k: v for k, v in spec.make_kwargs.items() if k != "run_dir"}  # where, not what
    d = {"env_id": spec.env_id, "env_kwargs": spec.env_kwargs, "budget": spec.budget,
         "controller": spec.make_name or spec.controller, "controller_kwargs": kwargs}
    # Only when set, so that runs made before these options existed still count.
    if spec.budget_unit != "stages":
        d |= {"budget_unit": spec.budget_unit, "budget_tokens": spec.budget_tokens}
    if spec.replay_seeds:
        d["replay_seeds"] = list(spec.replay_seeds)
    return json.dumps(d, sort_keys=True, default=str)


def is_current(spec: RunSpec, done: dict[tuple, runlog.RunRecord]) -> bool:
    """Whether ``spec`` has a finished run made with its settings."""
    rec = done.get(spec.key)
    return rec is not None and rec.settings.get("fingerprint") == fingerprint(spec)


def current_runs(specs: list[RunSpec], done: dict[tuple, runlog.RunRecord]
                 ) -> list[runlog.RunRecord]:
    """The finished runs of ``specs`` made with their settings, in spec order: a run made with
    other settings (an older protocol) waits to run again and is in no table or combined log."""
    return [done[s.key] for s in specs if is_current(s, done)]


def drop_finished_stages(specs: list[RunSpec], done: dict[tuple, runlog.RunRecord]) -> None:
    """Drop the stage cache's entries of each task and seed whose runs have all finished (their
    replays' seeds too): a key holds its seed, so no later run can hit them, and kept they
    would fill the disk (~7 GB per seed of the standard preset)."""
    from metaenv.stage_cache import StageCache, stage_group

    runs = [s for s in specs if s.stage_cache is not None and s.controller != BASE]
    if not runs:
        return
    pending = {(s.task, s.seed) for s in runs if not is_current(s, done)}
    finished = {stage_group(s.task, seed) for s in runs if (s.task, s.seed) not in pending
                for seed in (s.seed, *s.replay_seeds)}
    cache = StageCache(runs[0].stage_cache)  # one folder per leaderboard (build_specs)
    for group in finished:
        cache.drop(group)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("stages"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console)


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    a = parse_args(argv)
    preset = resolve(a)
    a.out = a.out or default_out(preset)
    out = Path(a.out)
    if (blocked := file_in_the_way(out)) is not None:
        raise SystemExit(f"the output folder {out}/ cannot be made: {blocked} is a file; "
                         "pass --out FOLDER")
    # One leaderboard per output folder: a lock on the folder itself (no stray lock file to
    # commit), which the OS drops when the process dies, even by kill -9, so a rerun is never
    # locked out by the run it resumes.
    out.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another leaderboard is writing to {out}/; wait for it or use "
                             "another --out") from None
        return run(a, preset, out, argv, t0)
    finally:
        os.close(lock_fd)


def run(a: argparse.Namespace, preset: Preset, out: Path, argv: list[str] | None,
        t0: float) -> int:
    """Run what is not finished yet, save each run as it ends, then write the report."""
    runlog.remove_temp_files(out)
    console = Console(soft_wrap=True)
    specs = build_specs(preset, a)
    cmd = shlex.join(["python", "-m", "benchmarks.leaderboard",
                      *(sys.argv[1:] if argv is None else argv)])
    # Kept in leaderboard.h5 too, so the report module rebuilds the same report from it.
    meta = {"header": header(preset, cmd), "order": json.dumps(list(preset.controllers))}
    if not preset.conclusions:
        console.print(f"[bold yellow]{SMOKE}[/]")

    # Resume: a run file exists only for a finished run (atomic rename), and it must have been made
    # with the same settings; anything else runs (again), an unreadable file set aside first.
    # Runs that only the combined log holds (a fresh clone: git keeps leaderboard.h5, not runs/)
    # get their run files back, so a long run goes on across sessions and clones.
    done, notes = runlog.recover_runs(out)
    combined = runlog.recover_combined(out)
    # Not for a smoke run: it is the install check, and it trains whatever the clone holds.
    restored = None if combined or not preset.conclusions else runlog.restore_runs(out, done)
    for note in [*notes, *([combined] if combined else []), *([restored] if restored else [])]:
        console.print(f"[yellow]note:[/] {note}")
    if combined:
        runlog.write_combined(out, current_runs(specs, done), meta)
    todo = [s for s in specs if not is_current(s, done)]
    drop_finished_stages(specs, done)
    console.print(f"[bold]leaderboard[/] preset={preset.name} tasks={','.join(preset.tasks)} "
                  f"controllers={','.join(preset.controllers)} seeds={list(preset.seeds)} "
                  f"budget={preset.budget} stages/episode={preset.stages} "
                  f"steps/stage={preset.steps_per_stage} -> {out}/")
    console.print(f"{len(specs) - len(todo)} of {len(specs)} runs already finished; "
                  f"{len(todo)} to run with the {a.executor} executor"
                  + (f" ({preset.workers} at a time)" if a.executor == "local"
                     and preset.workers > 1 else ""))

    failures = _execute(a, preset, todo, specs, done, out, meta, console) if todo else []
    finished = current_runs(specs, done)
    runlog.write_combined(out, finished, meta)
    if not a.no_report and finished:
        paths = report.write_report(out, finished, header=meta["header"],
                                    order=preset.controllers, **_report_options(preset))
        console.print(f"wrote {paths['md']}, {paths['csv']}, {out / runlog.COMBINED}, "
                      f"{paths['plots']}/")
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed[/]: {', '.join(failures)}; "
                      "rerun the same command to retry them")
    runs = sum(1 for r in finished if r.controller != BASE)
    if not preset.conclusions:
        console.print(f"[bold yellow]{SMOKE}[/]")
    # Machine-readable last line (plain print: no rich markup or wrapping).
    print(f"runs={runs} tasks={len(preset.tasks)} controllers={len(preset.controllers)} "
          f"wall_s={time.time() - t0:.1f}", flush=True)
    return 1 if failures else 0


SMOKE = "A smoke run: one seed and a small dev set, not for conclusions (see --preset standard)."


def header(preset: Preset, cmd: str) -> str:
    """The report's header: the command, the settings, and what a reader must know first."""
    lines = [f"Made by `{cmd}`; settings: `{json.dumps(_settings(preset))}`."]
    if not preset.conclusions:
        lines.append(f"**{SMOKE}**")
    lines.append(budget_sentence(preset))  # the report adds the selection rule and the cache
    if preset.replay_seed_offset is not None:
        lines.append(f"Transfer: each run's chosen schedule is retrained from the base model on "
                     f"seed + {preset.replay_seed_offset}, under the same episode token cap, and "
                     "scored on test; those stages are not charged to the budget.")
    lines += list(preset.notes)
    return "\n\n".join(lines)


def budget_sentence(preset: Preset) -> str:
    """The header's sentence on the budget: its unit, its size, the episode token cap."""
    cap = preset.env_kwargs.get("episode_token_cap", EnvConfig.episode_token_cap)
    capped = ("the env's episode token cap in force (by default the default schedule's expected "
              "episode tokens + 10%)" if cap == DEFAULT_CAP else
              "no episode token cap" if cap is None else f"an episode token cap of {cap}")
    if preset.budget_unit == "tokens":
        size = (f"{preset.budget_tokens}" if preset.budget_tokens else
                f"{preset.budget} x one default stage's tokens ("
                f"{preset.budget / preset.stages:g} default episodes' worth) of")
        return (f"Budget in tokens, the same for every controller: a run may sample {size} prompt "
                f"+ completion tokens over all its episodes, with {capped}; a controller plans "
                "with the stages those tokens buy at one default stage's tokens (runs.csv: "
                "budget_tokens; budget, the planned stages). Stages and seconds are reported "
                "beside it.")
    smoke = "" if preset.conclusions else " (kept in stages so that the smoke run stays short)"
    return (f"Budget in stages{smoke}: a run may train {preset.budget} stages, with {capped}; "
            "tokens and seconds are reported beside it, so equal stages are not equal compute.")


def _report_options(preset: Preset) -> dict[str, Any]:
    # The report module says "not for conclusions" itself when it can.
    params = inspect.signature(report.write_report).parameters
    return {"conclusions": preset.conclusions} if "conclusions" in params else {}


class RunBars:
    """One overall bar (stages of every run to do) and one bar per running run."""

    def __init__(self, progress: Progress, todo: list[RunSpec]) -> None:
        self.progress, self.by_key = progress, {s.key: s for s in todo}
        self.total = progress.add_task("all runs", total=sum(max(s.budget, 1) for s in todo))
        self.bars: dict[tuple, Any] = {}  # run key -> its bar
        self.spent: dict[tuple, int] = {}  # run key -> stages it has reported

    def on_stage(self, key: tuple[str, str, int], n: int) -> None:
        """Per-run bar: stages spent of the budget, with an ETA from the stage rate."""
        budget = max(self.by_key[key].budget, 1)
        if key not in self.bars:
            self.bars[key] = self.progress.add_task(f"  {self.by_key[key].label()}", total=budget)
        n = min(n, budget)
        self.progress.update(self.bars[key], completed=n)
        self.progress.advance(self.total, n - self.spent.get(key, 0))
        self.spent[key] = n

    def finish(self, spec: RunSpec) -> None:
        # A run may stop under its budget: the overall bar still counts its whole budget.
        self.progress.advance(self.total, max(spec.budget, 1) - self.spent.pop(spec.key, 0))
        if spec.key in self.bars:
            self.progress.remove_task(self.bars.pop(spec.key))


def _execute(a: argparse.Namespace, preset: Preset, todo: list[RunSpec], specs: list[RunSpec],
             done: dict[tuple, runlog.RunRecord], out: Path, meta: dict[str, str],
             console: Console) -> list[str]:
    """Run `todo`, saving each finished run as it ends; returns the labels of failed runs."""
    failures: list[str] = []
    kwargs = ({"address": a.ray_address, "threads": preset.threads} if a.executor == "ray"
              else {"workers": preset.workers})
    executor = make_executor(a.executor, **kwargs)
    with _progress(console) as progress:
        bars = RunBars(progress, todo)
        for spec, rec, err in executor.map(todo, bars.on_stage):
            bars.finish(spec)
            if rec is None:
                failures.append(spec.label())
                _save_failure(out, spec, err, progress.console)
                continue
            rec.settings["fingerprint"] = fingerprint(spec)
            runlog.save_run(out, rec)
            _error_path(out, spec).unlink(missing_ok=True)  # an earlier failure is history
            done[rec.key] = rec
            runlog.write_combined(out, current_runs(specs, done), meta)
            drop_finished_stages(specs, done)
            progress.console.print(
                f"done {spec.label()}: test={rec.test_score:.3f} dev={rec.dev_score:.3f} "
                f"stages={rec.stages_spent}/{rec.budget} {rec.wall_s:.0f}s")
    executor.close()
    return failures


def _error_path(out: Path, spec: RunSpec) -> Path:
    return out / "errors" / (runlog.run_filename(*spec.key)[:-3] + ".txt")


def _save_failure(out: Path, spec: RunSpec, err: str | None, console: Console) -> None:
    path = _error_path(out, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(err or "")
    last = (err or "").strip().splitlines()[-1:] or ["?"]
    console.print(f"[red]FAILED[/] {spec.label()}: {last[0]} (traceback in {path})")


def _settings(preset: Preset) -> dict[str, Any]:
    d = asdict(preset)
    d.pop("notes")  # in the header as sentences
    d.pop("out")  # where, not what
    return {k: v for k, v in d.items() if v not in (None, {}, ())}


if __name__ == "__main__":
    sys.exit(main())
