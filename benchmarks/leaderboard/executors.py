"""How one leaderboard run executes (env + controller + one test evaluation), locally or on Ray.

``execute_run`` is the whole protocol for one (task, controller, seed): build the env, let the
controller spend its stage budget deciding on dev, load the state it chose and score it once on
test. A recording wrapper around the env keeps every stage the controller trained, whatever the
controller, so the run log does not depend on what each controller chooses to report.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym

from benchmarks.leaderboard.runlog import BASE, RunRecord, StageRecorder, plain

RAY_MISSING = (
    'Ray is not installed; --executor ray needs it: pip install "llmzero-gym[distributed]" '
    '(or pip install "ray[default]")'
)

OnStage = Callable[[tuple[str, str, int], int], None]  # (run key, stages spent so far)


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

    import controllers
    import metaenv  # noqa: F401  (registers the env ids)
    from controllers.base import LLM_COST_KEYS

    torch.set_num_threads(spec.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial drowns the bars
    started = time.time()
    env_kwargs = dict(spec.env_kwargs)
    if env_kwargs.get("device", "auto") == "auto":
        env_kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.controller != BASE:
        env_kwargs["max_stages"] = spec.budget  # the env itself refuses a stage over the budget
    env = gym.make(spec.env_id, **env_kwargs)
    rec_env = StageRecorder(env, None if on_stage is None else lambda n: on_stage(spec.key, n))
    if on_stage is not None:
        on_stage(spec.key, 0)
    try:
        if spec.controller == BASE:
            # The untrained model: its dev score is the env's root, its test score the baseline.
            rec_env.reset(seed=spec.seed)
            base_dev = float(env.unwrapped.base_dev_score)
            test = _test_score(env)
            return RunRecord(task=spec.task, controller=BASE, seed=spec.seed, test_score=test,
                             test_correct=_test_correct(env),
                             dev_score=base_dev, base_dev_score=base_dev, budget=0,
                             stages_spent=0, wall_s=time.time() - started, started_at=started,
                             finished_at=time.time(), anytime=[(0, base_dev)],
                             settings={"env_id": spec.env_id, "env_kwargs": env_kwargs})
        ctrl = controllers.make(spec.make_name or spec.controller, **spec.make_kwargs)
        result = ctrl.run(rec_env, spec.budget, spec.seed)
        # The protocol: the controller decided on dev; the harness scores its choice once on test.
        env.unwrapped.load_state(result.final_state)
        test = _test_score(env)
        test_correct = _test_correct(env)  # now: a later evaluate_test would overwrite it
        # The env's own counters are the authority on what was spent (a fresh env per run).
        budget = env.unwrapped.budget
        spent = int(budget.stages)
        base_dev = float(env.unwrapped.base_dev_score)  # the loaded path's root: the base model
        cost = {k: float(v) for k, v in (result.cost or {}).items()}
        anytime = [(int(s), float(b)) for s, b in (result.anytime or [])]
        if not anytime:  # a user's controller may not report one; rebuild it from the stages
            best = base_dev
            anytime = [(0, best)]
            for i, s in enumerate(rec_env.stages, 1):
                best = max(best, s.dev_score)
                anytime.append((i, best))
        extra = {"cost": cost, **{k: cost.get(k, 0.0) for k in LLM_COST_KEYS},
                 "n_trials": len(result.trials or []), "recorded_stages": len(rec_env.stages)}
        # Who proposed each stage, in training order, where the controller says (llmzero does).
        sources = [t["source"] for t in result.trials or [] if "source" in t]
        if sources:
            extra["stage_sources"] = sources
        if spent != len(rec_env.stages):
            # Stages trained without going through env.step would escape the run log: say so.
            extra["warning"] = (f"the env trained {spent} stages, "
                                f"env.step saw {len(rec_env.stages)}")
        return RunRecord(
            task=spec.task, controller=spec.controller, seed=spec.seed, test_score=test,
            test_correct=test_correct, dev_score=float(result.dev_score), base_dev_score=base_dev,
            budget=spec.budget, stages_spent=spent, tokens=float(budget.tokens),
            seconds=float(budget.seconds), wall_s=time.time() - started, started_at=started,
            finished_at=time.time(), schedule=[plain(h) for h in result.schedule],
            stages=rec_env.stages, anytime=anytime,
            settings={"env_id": spec.env_id, "env_kwargs": env_kwargs,
                      "controller": spec.make_name or spec.controller,
                      "controller_kwargs": spec.make_kwargs},
            extra=extra)
    finally:
        env.close()


def _guarded(spec: RunSpec, on_stage: OnStage | None) -> tuple[RunRecord | None, str | None]:
    # One failing run (a controller bug, an OOM) must not end the leaderboard: report and go on.
    try:
        return execute_run(spec, on_stage), None
    except Exception:
        return None, traceback.format_exc()


Outcome = tuple[RunSpec, RunRecord | None, str | None]  # (spec, record, error traceback)


class LocalExecutor:
    """Runs one run after another in this process."""

    name = "local"

    def map(self, specs: Sequence[RunSpec], on_stage: OnStage | None = None) -> Iterator[Outcome]:
        for spec in specs:
            rec, err = _guarded(spec, on_stage)
            yield spec, rec, err

    def close(self) -> None:
        pass


def _ray_run(spec: RunSpec, queue: Any) -> tuple[RunRecord | None, str | None]:
    """A Ray task: one run; stage progress goes back to the driver through a Ray queue."""

    def on_stage(key: tuple[str, str, int], n: int) -> None:
        queue.put_nowait((key, n))

    return _guarded(spec, on_stage)


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
        self.remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=threads)(_ray_run)
        self.queue = Queue(actor_options={"num_cpus": 0})

    def map(self, specs: Sequence[RunSpec], on_stage: OnStage | None = None) -> Iterator[Outcome]:
        ray = self.ray
        pending = {self.remote.remote(spec, self.queue): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            self._drain(on_stage)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    rec, err = ray.get(ref)
                except Exception:  # the worker itself died (OOM kill, node lost)
                    rec, err = None, traceback.format_exc()
                yield spec, rec, err
        self._drain(on_stage)

    def _drain(self, on_stage: OnStage | None) -> None:
        while not self.queue.empty():
            key, n = self.queue.get_nowait()
            if on_stage is not None:
                on_stage(tuple(key), n)

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(name: str, **kwargs: Any) -> LocalExecutor | RayExecutor:
    """``local`` or ``ray``; Ray missing is a clear SystemExit naming the extra to install."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**kwargs)
    raise SystemExit(f"unknown executor {name!r}; valid: local, ray")
