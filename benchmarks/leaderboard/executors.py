"""How one leaderboard run executes (env + controller + one test evaluation), locally or on Ray.

``execute_run`` is the whole protocol for one (task, controller, seed): build the env, let the
controller spend its stage budget deciding on dev, load the state it chose and score it once on
test. A recording wrapper around the env keeps every stage the controller trained, whatever the
controller, so the run log does not depend on what each controller chooses to report.

``execute`` adds what a preset may ask for around it: an equal token budget (``token_budget``)
and the replay of the chosen schedule on fresh seeds (``transfer``), both inside the same worker
call, so a run's record (and its file) holds them or does not exist. Every env a run builds (its
own, the replays', the one that measures a default stage) shares the preset's stage cache
(``RunSpec.stage_cache``), whose hits, misses and seconds saved the record keeps.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym

from benchmarks.leaderboard.runlog import BASE, RunRecord, StageRecorder, plain

RAY_MISSING = (
    'Ray is not installed; --executor ray needs it: pip install "llmzero-gym[distributed]" '
    '(or pip install "ray[default]")'
)

OnStage = Callable[[tuple[str, str, int], int], None]  # (run key, stages spent so far)
BUDGET_UNITS = ("stages", "tokens")


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs for one run; plain data so it pickles to a Ray worker."""

    task: str
    controller: str  # the leaderboard row ("base" scores the untrained model)
    seed: int
    budget: int  # stages
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    make_name: str = ""  # controllers.make name; defaults to `controller`
    make_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int = 2  # torch threads of the worker
    # Seeds on which the chosen schedule is retrained from the base model and scored on test.
    replay_seeds: tuple[int, ...] = ()
    budget_unit: str = "stages"  # "tokens": the env's max_tokens binds (see token_budget)
    # Tokens mode; None -> budget x one default stage's measured tokens (token_budget).
    budget_tokens: int | None = None
    stage_cap: int | None = None  # the env's max_stages; None -> budget
    # The stage cache folder every env of the run shares (how, not what: not in the fingerprint).
    stage_cache: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.task, self.controller, self.seed)

    def label(self) -> str:
        return f"{self.task}/{self.controller}/seed{self.seed}"


def _test_score(env: gym.Env) -> float:
    score = env.unwrapped.evaluate_test()
    return float(getattr(score, "accuracy", score))


def _test_correct(env: gym.Env) -> list[bool]:
    """Per-item correctness of the last evaluate_test (empty for an env that does not keep it)."""
    return [bool(c) for c in getattr(env.unwrapped, "last_test_correct", ())]


def execute_run(spec: RunSpec, on_stage: OnStage | None = None) -> RunRecord:
    """Run one (task, controller, seed) under the protocol and return its record."""
    import optuna
    import torch

    import metaenv  # noqa: F401  (registers the env ids)

    torch.set_num_threads(spec.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial drowns the bars
    started = time.time()
    env_kwargs = worker_env_kwargs(spec.env_kwargs, spec.stage_cache)
    if spec.controller != BASE:
        # The env itself refuses a stage over the budget.
        env_kwargs["max_stages"] = spec.stage_cap or spec.budget
    env = gym.make(spec.env_id, **env_kwargs)
    rec_env = StageRecorder(env, None if on_stage is None else lambda n: on_stage(spec.key, n))
    if on_stage is not None:
        on_stage(spec.key, 0)
    settings = {"env_id": spec.env_id,   # where the cache is, is not what the run was
                "env_kwargs": {k: v for k, v in env_kwargs.items() if k != "stage_cache"}}
    try:
        run = _base_run if spec.controller == BASE else _controller_run
        return run(spec, rec_env, settings, started)
    finally:
        env.close()


def _base_run(spec: RunSpec, rec_env: StageRecorder, settings: dict[str, Any],
              started: float) -> RunRecord:
    """The untrained model: its dev score is the env's root, its test score the baseline."""
    rec_env.reset(seed=spec.seed)
    base_dev = float(rec_env.unwrapped.base_dev_score)
    test = _test_score(rec_env)
    return RunRecord(task=spec.task, controller=BASE, seed=spec.seed, test_score=test,
                     test_correct=_test_correct(rec_env),
                     dev_score=base_dev, base_dev_score=base_dev, budget=0,
                     stages_spent=0, wall_s=time.time() - started, started_at=started,
                     finished_at=time.time(), anytime=[(0, base_dev)], settings=settings)


def _controller_run(spec: RunSpec, rec_env: StageRecorder, settings: dict[str, Any],
                    started: float) -> RunRecord:
    """The controller decides on dev; the harness scores its choice once on test."""
    import controllers

    ctrl = controllers.make(spec.make_name or spec.controller, **spec.make_kwargs)
    result = ctrl.run(rec_env, spec.budget, spec.seed)
    u = rec_env.unwrapped
    u.load_state(result.final_state)
    chosen = {"schedule_stages": int(u.path_cost["stages"]),
              "schedule_tokens": int(u.path_cost["tokens"]), "episode_end": u.episode_end}
    test = _test_score(rec_env)
    test_correct = _test_correct(rec_env)  # now: a later evaluate_test would overwrite it
    # The env's own counters are the authority on what was spent (a fresh env per run).
    spent = int(u.budget.stages)
    base_dev = float(u.base_dev_score)  # the loaded path's root: the base model
    return RunRecord(
        task=spec.task, controller=spec.controller, seed=spec.seed, test_score=test,
        test_correct=test_correct, dev_score=float(result.dev_score), base_dev_score=base_dev,
        budget=spec.budget, stages_spent=spent, tokens=float(u.budget.tokens),
        seconds=float(u.budget.seconds), wall_s=time.time() - started, started_at=started,
        finished_at=time.time(), schedule=[plain(h) for h in result.schedule],
        stages=rec_env.stages, anytime=_anytime(result, rec_env, base_dev),
        settings=settings | {"controller": spec.make_name or spec.controller,
                             "controller_kwargs": spec.make_kwargs},
        extra=_run_extra(ctrl, result, rec_env, spent) | chosen)


def _anytime(result: Any, rec_env: StageRecorder, base_dev: float) -> list[tuple[int, float]]:
    """The run's (stages spent, best dev) curve; rebuilt from the stages for a user's controller
    that does not report one."""
    anytime = [(int(s), float(b)) for s, b in (result.anytime or [])]
    if not anytime:
        best = base_dev
        anytime = [(0, best)]
        for i, s in enumerate(rec_env.stages, 1):
            best = max(best, s.dev_score)
            anytime.append((i, best))
    return anytime


def _run_extra(ctrl: Any, result: Any, rec_env: StageRecorder, spent: int) -> dict[str, Any]:
    """What the record keeps beside the scores: cost, LLM counts, trials, unspent reason, the
    selection (its fallback; why no model was trained), who proposed each stage, the grid's
    design and the points it tried, the stage cache, and a warning when stages escaped the run
    log."""
    from controllers.base import LLM_COST_KEYS, SELECT_RULE

    cost = {k: float(v) for k, v in (result.cost or {}).items()}
    extra = {"cost": cost, **{k: cost.get(k, 0.0) for k in LLM_COST_KEYS},
             "n_trials": len(result.trials or []), "recorded_stages": len(rec_env.stages),
             "select_rule": SELECT_RULE,
             "select_fallback": bool(getattr(result, "select_fallback", False)),
             "stage_cache": cache_stats(rec_env)}
    if getattr(ctrl, "unspent_reason", None):  # why an open-loop controller stops early
        extra["unspent_reason"] = ctrl.unspent_reason
    if not result.schedule:
        extra["untrained_reason"] = untrained_reason(result, rec_env, spent)
    # Who proposed each stage, in training order, where the controller says (llmzero does).
    sources = [t["source"] for t in result.trials or [] if "source" in t]
    if sources:
        extra["stage_sources"] = sources
    if hasattr(ctrl, "design"):   # the grid: its design, and how far each point it tried went
        extra["grid_design"] = ctrl.design(rec_env.unwrapped.hparams)
        extra["points_tried"] = [
            {"point": t["point"], "stages": t["stages"], "state": t["state"],
             "episode_end": t.get("episode_end")}
            for t in result.trials or [] if "point" in t]
    if spent != len(rec_env.stages):
        # Stages trained without going through env.step would escape the run log: say so.
        extra["warning"] = (f"the env trained {spent} stages, "
                            f"env.step saw {len(rec_env.stages)}")
    return extra


def untrained_reason(result: Any, rec_env: StageRecorder, spent: int) -> str:
    """Why a run returned the base model (an empty schedule), in one sentence."""
    if spent == 0:
        return "it trained no stage"
    if getattr(result, "select_fallback", False):
        best = max((s.dev_score for s in rec_env.stages), default=float("nan"))
        return (f"no episode ended within the budget (the selection rule's fallback), and none "
                f"of its {spent} trained states beat the base model on dev (best {best:.3f}, "
                f"base {result.base_dev_score:.3f})")
    return "its controller chose the base model"


def worker_env_kwargs(env_kwargs: dict[str, Any], stage_cache: str | None = None
                      ) -> dict[str, Any]:
    """The env arguments as the worker builds the env: device "auto" becomes cuda or cpu here,
    on the machine that owns the accelerator; the stage cache joins them."""
    import torch

    out = dict(env_kwargs)
    if out.get("device", "auto") == "auto":
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if stage_cache is not None:
        out["stage_cache"] = stage_cache
    return out


def cache_stats(env: gym.Env) -> dict[str, float]:
    """What the env's stage cache did: stages loaded, stages trained, wall seconds saved."""
    b = env.unwrapped.budget
    return {"hits": int(b.cache_hits), "misses": int(b.cache_misses),
            "seconds_saved": float(b.seconds_saved)}


def execute(spec: RunSpec, on_stage: OnStage | None = None) -> RunRecord:
    """One run under the protocol, with what its preset adds: a token budget, the replay."""
    if spec.budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {spec.budget_unit!r}")
    if spec.controller == BASE:
        return execute_run(spec, on_stage)
    planned, token_info = token_budget(spec) if spec.budget_unit == "tokens" else (spec, {})
    rec = execute_run(planned, on_stage)
    rec.settings["budget_unit"] = spec.budget_unit
    rec.extra.update(token_info)
    rec.extra["episode_stages"] = episode_stages(spec)
    if spec.replay_seeds:
        t0 = time.time()
        rec.extra["transfer"] = transfer(spec, rec.schedule)
        rec.extra["transfer_seconds"] = time.time() - t0  # apart from the run's budget
    return rec


def episode_stages(spec: RunSpec) -> int:
    """Stages in one episode of the run's env (its explicit setting, else the scale's default)."""
    from metaenv.config import SCALE_DEFAULTS

    stages = spec.env_kwargs.get("stages")
    return int(stages if stages is not None
               else SCALE_DEFAULTS[spec.env_kwargs.get("scale", "embedded")]["stages"])


# ---- the equal-token budget -------------------------------------------------------------------


def token_budget(spec: RunSpec) -> tuple[RunSpec, dict[str, Any]]:
    """The run as it executes in tokens mode, and what to record about its budget.

    The token budget is ``spec.budget_tokens``, or by default ``spec.budget / episode stages``
    default episodes' worth: ``spec.budget`` times the tokens one default stage samples (the
    same for every controller of a seed; the episode token cap, an estimate with a margin,
    would buy about a fifth more). The env gets it as ``max_tokens``; the
    controller plans with the stages it buys at one default stage's tokens (measured on the run's
    seed from the base model, once per process for a task and seed: training is deterministic,
    so every controller of a seed gets the same plan); the Tracker lets the tokens bind, and the
    env's stage cap (``STAGE_CAP_FACTOR`` times the plan) only stops a run that never would.
    """
    from controllers.base import STAGE_CAP_FACTOR

    per_stage, cap = default_stage_tokens(spec.env_id, spec.env_kwargs, spec.seed,
                                          spec.stage_cache)
    total = int(spec.budget_tokens) if spec.budget_tokens else spec.budget * per_stage
    stages = max(1, total // per_stage)
    planned = replace(spec, budget=stages, stage_cap=STAGE_CAP_FACTOR * stages,
                      env_kwargs={**spec.env_kwargs, "max_tokens": total})
    return planned, {"budget_tokens": total, "tokens_per_default_stage": per_stage,
                     "episode_token_cap": cap, "planned_stages": stages}


def default_stage_tokens(env_id: str, env_kwargs: dict[str, Any], seed: int,
                         stage_cache: str | None = None) -> tuple[int, int | None]:
    """Prompt + completion tokens of one default stage from the base model on ``seed``, and the
    env's episode token cap (None: no cap)."""
    return _default_stage_tokens(env_id, _key(env_kwargs), seed, stage_cache)


def _key(env_kwargs: dict[str, Any]) -> str:
    # Budgets are not part of what a stage costs.
    kept = {k: v for k, v in env_kwargs.items() if k not in ("max_stages", "max_tokens")}
    return json.dumps(kept, sort_keys=True, default=str)


@functools.cache
def _default_stage_tokens(env_id: str, env_kwargs_key: str, seed: int,
                          stage_cache: str | None) -> tuple[int, int | None]:
    env = gym.make(env_id, **worker_env_kwargs(json.loads(env_kwargs_key), stage_cache))
    try:
        u = env.unwrapped
        env.reset(seed=seed)
        env.step(u.hparams.defaults)
        return int(u.budget.tokens), u.episode_token_cap
    finally:
        env.close()


# ---- the replay of a chosen schedule (transfer) ------------------------------------------------


def transfer(spec: RunSpec, schedule: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen schedule retrained open loop from the base model on each replay seed, under the
    run's env settings (its episode token cap included: the replay ends where the cap ends it).

    An empty schedule (the controller chose the base model) replays as the base model. The
    stages are trained on an env of their own: they are not charged to the run's budget. Each
    replay says why it ended and what the stage cache did (nothing, where this process had
    replayed the same schedule and seed before: the memoized replay trained nothing).
    """
    key = json.dumps([dict(h) for h in schedule], sort_keys=True, default=str)
    out = []
    for seed in spec.replay_seeds:
        before = _replay.cache_info().hits
        replay = dict(_replay(spec.env_id, _key(spec.env_kwargs), key, seed, spec.stage_cache))
        if _replay.cache_info().hits > before:
            replay["stage_cache"] = {"hits": 0, "misses": 0, "seconds_saved": 0.0}
        out.append(replay)
    return out


@functools.lru_cache(maxsize=128)
def _replay(env_id: str, env_kwargs_key: str, schedule_key: str, seed: int,
            stage_cache: str | None) -> dict[str, Any]:
    # Memoized: training is deterministic, so two runs that chose the same schedule (e.g. the
    # default one) share one replay per process; its seconds are those it took when trained.
    started = time.time()
    env = gym.make(env_id, **worker_env_kwargs(json.loads(env_kwargs_key), stage_cache))
    try:
        u = env.unwrapped
        env.reset(seed=seed)
        for hp in json.loads(schedule_key):
            # As the Tracker trains a stage: names a stage leaves out keep the last stage's value.
            _, _, terminated, truncated, _ = env.step(hp)
            if terminated or truncated:
                break
        out: dict[str, Any] = {"seed": seed, "test_score": _test_score(env),
                               "stages": int(u.budget.stages), "tokens": float(u.budget.tokens),
                               "episode_end": u.episode_end, "stage_cache": cache_stats(env)}
        correct = getattr(u, "last_test_correct", None)
        if correct is not None:
            out["test_correct"] = [int(c) for c in correct]
        out["seconds"] = time.time() - started
        return out
    finally:
        env.close()


def _guarded(spec: RunSpec, on_stage: OnStage | None) -> tuple[RunRecord | None, str | None]:
    # One failing run (a controller bug, an OOM) must not end the leaderboard: report and go on.
    try:
        return execute(spec, on_stage), None
    except Exception:
        return None, traceback.format_exc()


Outcome = tuple[RunSpec, RunRecord | None, str | None]  # (spec, record, error traceback)


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Worker initializer: end this process once `parent` is gone.

    A killed harness (SIGTERM, SIGKILL) runs no cleanup, so its workers would train on to the end
    of their runs; a stopped leaderboard must stop. A run in flight writes nothing (run files are
    written atomically once a run ends), so the next invocation re-runs it.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class LocalExecutor:
    """Runs one run after another in this process, or ``workers`` runs at a time in child
    processes on this machine (each with its spec's torch threads).

    On the 2-core CPU two one-thread workers beat one two-thread process: the embedded model's
    sampling is per-token overhead bound, and two threads on a busy machine spin more than they
    compute (measured; see the standard preset).
    """

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise SystemExit(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def map(self, specs: Sequence[RunSpec], on_stage: OnStage | None = None) -> Iterator[Outcome]:
        if self.workers == 1:
            for spec in specs:
                rec, err = _guarded(spec, on_stage)
                yield spec, rec, err
            return
        yield from self._pool_map(specs, on_stage)

    def _pool_map(self, specs: Sequence[RunSpec], on_stage: OnStage | None) -> Iterator[Outcome]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn: a forked child would inherit the parent's torch thread pools.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=exit_with_parent,
                initargs=(os.getpid(),)) as pool:
            queue = manager.Queue()
            futures = {pool.submit(_queued_run, spec, queue): spec for spec in specs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(queue, on_stage)
                for future in done:
                    try:
                        rec, err = future.result()
                    except Exception:  # the worker process itself died
                        rec, err = None, traceback.format_exc()
                    yield futures[future], rec, err
            _drain(queue, on_stage)

    def close(self) -> None:
        pass


def _queued_run(spec: RunSpec, queue: Any) -> tuple[RunRecord | None, str | None]:
    """One run in a worker process; stage progress goes back to the driver through ``queue``."""

    def on_stage(key: tuple[str, str, int], n: int) -> None:
        queue.put_nowait((key, n))

    return _guarded(spec, on_stage)


def _drain(queue: Any, on_stage: OnStage | None) -> None:
    while not queue.empty():
        key, n = queue.get_nowait()
        if on_stage is not None:
            on_stage(tuple(key), n)


class RayExecutor:
    """Runs independent runs in parallel as Ray tasks: one GPU each where the cluster has GPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 threads: int = 1) -> None:
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError as e:
            raise SystemExit(RAY_MISSING) from e
        self.ray = ray
        if not ray.is_initialized():
            # The repo root on the workers' path, so `benchmarks`, `controllers`... import there
            # even when the project is not pip-installed.
            import os

            path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH")) if p)
            for attempt in range(3):
                try:
                    ray.init(address=address, num_cpus=None if address else num_cpus,
                             include_dashboard=False, log_to_driver=False,
                             runtime_env={"env_vars": {"PYTHONPATH": path}})
                    break
                except Exception as e:
                    # A local node that misses Ray's fixed 30 s start-up window on a loaded
                    # machine ("timed out during startup") usually starts on a second try.
                    if address or "timed out" not in str(e) or attempt == 2:
                        raise
                    ray.shutdown()
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus = int(gpus)
        self.remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=threads)(_queued_run)
        self.queue = Queue(actor_options={"num_cpus": 0})

    def map(self, specs: Sequence[RunSpec], on_stage: OnStage | None = None) -> Iterator[Outcome]:
        ray = self.ray
        pending = {self.remote.remote(spec, self.queue): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            _drain(self.queue, on_stage)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    rec, err = ray.get(ref)
                except Exception:  # the worker itself died (OOM kill, node lost)
                    rec, err = None, traceback.format_exc()
                yield spec, rec, err
        _drain(self.queue, on_stage)

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(name: str, **kwargs: Any) -> LocalExecutor | RayExecutor:
    """``local`` or ``ray``; Ray missing is a clear SystemExit naming the extra to install."""
    if name == "local":
        return LocalExecutor(**kwargs)
    if name == "ray":
        return RayExecutor(**kwargs)
    raise SystemExit(f"unknown executor {name!r}; valid: local, ray")
