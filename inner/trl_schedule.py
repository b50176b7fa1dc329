"""A schedule found in this benchmark, run inside TRL's `GRPOTrainer`: a callback sets each stage.

TRL's GRPOTrainer reads its hyperparameters once, when it is built: a learning rate given to a
resumed run is silently ignored (the scheduler keeps the checkpoint's `initial_lr`), sampling uses
a `GenerationConfig` made in `__init__`, and the log-probabilities are divided by a temperature
captured by the LM-head patch. `StageSchedule` writes each stage's values into every one of those
places at the stage's first optimizer step, and refuses, before any step, a schedule that changes
what a built trainer cannot change (`num_generations`, or `beta` from 0 without a reference model)::

    from trl import GRPOConfig, GRPOTrainer
    from inner.trl_schedule import StageSchedule

    stages = [{"learning_rate": 1e-4, "temperature": 1.0}, {"learning_rate": 3e-5, "beta": 0.0}]
    cb = StageSchedule(stages, steps_per_stage=20)   # stage 1 keeps temperature 1.0
    trainer = GRPOTrainer(model=..., reward_funcs=..., train_dataset=..., callbacks=[cb],
                          args=GRPOConfig(max_steps=40, lr_scheduler_type="constant", ...))
    cb.bind(trainer)   # the callback API hands no trainer over; this also runs the checks
    trainer.train()

Stages use this project's names (`RunResult.schedule`): `GRPOConfig` fields, which are TRL's, plus
`difficulty`, served from a user-supplied dataset per level. Every applied value is logged, as
`schedule/<name>`, through TRL's own per-step metrics. Needs `trl` (the `export` extra); this module
imports it only where a trainer is inspected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from transformers import TrainerCallback

from inner.config import GRPOConfig

DIFFICULTY = "difficulty"
# What a built GRPOTrainer still reads on every step, so a stage can set it mid-run.
APPLIED = ("learning_rate", "beta", "epsilon", "epsilon_high", "temperature", "top_p",
           "max_completion_length")
# The rest is read once in GRPOTrainer.__init__ (the sampler's group size, the batch, the loss),
# so every stage must keep the trainer's value.
BUILT = tuple(f.name for f in fields(GRPOConfig) if f.name not in APPLIED)
KNOWN = (*APPLIED, *BUILT, DIFFICULTY)
# Sampling values: the trainer attribute (also vLLM's), and the GenerationConfig key.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p",
             "max_completion_length": "max_new_tokens"}
_CHAINED = ("run the schedule as chained segments instead: from that stage on, a new GRPOTrainer "
            "with its own GRPOConfig resumes from the previous checkpoint "
            "(python -m benchmarks.export_trl writes such a script)")


class ScheduleRefused(ValueError):
    """A schedule that this trainer cannot follow; the message names the stage and parameter."""


class StageSchedule(TrainerCallback):
    """Sets each stage's hyperparameters on a bound `trl.GRPOTrainer` at the stage's first step.

    `schedule[i]` holds stage `start_stage + i`, which covers the trainer's optimizer steps
    (global_step) `[(start_stage + i) * steps_per_stage, ...)`; a chained segment resumed at a
    later stage passes its slice of the schedule and `start_stage`. A name a stage omits keeps its
    value. Steps past the last stage keep the last stage's values. The learning rate replaces the
    scheduler's base rate: with `lr_scheduler_type="constant"` every step trains at the stage's
    rate, while a warm-up or decay still multiplies it. `steps_per_stage` counts optimizer steps;
    this benchmark's stages count generation steps, the same when `num_iterations == 1`.

    `datasets` maps each difficulty level to a `datasets.Dataset`; `bind` then gives the trainer a
    data stream that serves every step from its stage's level (and shuffles within each level,
    with the trainer's seed, in place of TRL's sampler).
    """

    def __init__(
        self,
        schedule: Sequence[Mapping[str, Any]],
        steps_per_stage: int,
        datasets: Mapping[int, Any] | None = None,
        start_stage: int = 0,
    ) -> None:
        if not schedule:
            raise ValueError("schedule is empty: give at least one stage (a dict of hparams)")
        if steps_per_stage < 1 or start_stage < 0:
            raise ValueError(f"need steps_per_stage >= 1 and start_stage >= 0, "
                             f"got {steps_per_stage} and {start_stage}")
        self.steps_per_stage, self.start_stage = int(steps_per_stage), int(start_stage)
        self.datasets = dict(datasets) if datasets is not None else None
        self.schedule = _carry_forward(schedule, self.start_stage)
        self.trainer: Any = None
        self.stage: int | None = None  # index into schedule of the stage last applied

    # ---- binding and the checks that refuse a schedule --------------------------------------

    def bind(self, trainer: Any) -> StageSchedule:
        """Attach to `trainer`; raises ScheduleRefused, before any step, if it cannot follow."""
        from trl import GRPOTrainer

        if not isinstance(trainer, GRPOTrainer):
            raise TypeError(f"StageSchedule drives a trl.GRPOTrainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            raise ValueError("pass this StageSchedule in GRPOTrainer(callbacks=[...]) before bind")
        for i, stage in enumerate(self.schedule):
            _check_stage(trainer, stage, self.start_stage + i)
        self._check_difficulty()
        self._check_generation_alignment(trainer)
        if self.datasets is not None:
            trainer.train_dataset = self._level_stream(trainer)
            trainer.shuffle_dataset = False  # the stream shuffles within each level itself
        self.trainer = trainer
        return self

    def _check_difficulty(self) -> None:
        levels = [stage.get(DIFFICULTY) for stage in self.schedule]
        for i, level in enumerate(levels):
            k = self.start_stage + i
            if self.datasets is None and i > 0 and level != levels[i - 1]:
                raise ScheduleRefused(
                    f"stage {k}: difficulty changes from {levels[i - 1]} to {level}, but no "
                    "dataset per level was given: pass StageSchedule(..., datasets={level: "
                    "Dataset}), or "
                    f"{_CHAINED} and a new train_dataset")
            if self.datasets is not None and level not in self.datasets:
                raise ScheduleRefused(f"stage {k}: difficulty {level} has no dataset; datasets "
                                      f"has levels {sorted(self.datasets)}")

    def _check_generation_alignment(self, trainer: Any) -> None:
        # A stage must begin with a fresh generation batch, or its first steps would train on
        # completions sampled under the previous stage's settings.
        micro_steps, accumulation = _generation_period(trainer)
        if self.steps_per_stage * accumulation % micro_steps:
            raise ScheduleRefused(
                f"steps_per_stage={self.steps_per_stage} optimizer steps do not hold a whole "
                f"number of generation batches (one per {micro_steps} micro-steps: "
                "steps_per_generation x num_iterations, with gradient_accumulation_steps="
                f"{accumulation}); change those GRPOConfig values or steps_per_stage")

    # ---- the callback events ----------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError("StageSchedule is not bound: call cb.bind(trainer) before train()")
        first_step = self.start_stage * self.steps_per_stage
        if state.global_step < first_step:
            raise ScheduleRefused(
                f"this StageSchedule starts at stage {self.start_stage} (step {first_step}) but "
                f"training starts at step {state.global_step}: resume from the checkpoint of the "
                "segment before it (trainer.train(resume_from_checkpoint=...))")
        self.stage = None  # a resumed run re-applies its stage over the checkpoint's values
        self._apply_stage_at(state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._log(self._apply_stage_at(state.global_step))

    def stage_index(self, step: int) -> int:
        """Index into `schedule` of the stage that trains optimizer step `step` (0-based)."""
        k = step // self.steps_per_stage - self.start_stage
        return min(max(k, 0), len(self.schedule) - 1)

    def _apply_stage_at(self, step: int) -> int:
        index = self.stage_index(step)
        if index != self.stage:
            self.stage = index
            stage = self.schedule[index]
            for name in APPLIED:  # in this order: epsilon before the epsilon_high that follows it
                if name in stage:
                    _apply(self.trainer, name, stage[name])
        return index

    def _log(self, index: int) -> None:
        # TRL averages `_metrics` over each logging window and logs them with its own metrics
        # (its reward functions' `log_metric` lands there too); one value per step keeps every
        # logged row's average equal to the value applied.
        values = {"stage": self.start_stage + index, **self.schedule[index],
                  "epsilon_high": self.trainer.epsilon_high}
        metrics = self.trainer._metrics["train"]
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"schedule/{name}"].append(float(value))

    # ---- difficulty: one data stream over the datasets of each level -----------------------

    def _level_stream(self, trainer: Any) -> Any:
        """A dataset whose row r is drawn from the level of the stage that trains on row r."""
        import numpy as np
        from datasets import Dataset

        args = trainer.args
        if args.max_steps <= 0:
            raise ScheduleRefused("datasets per level need GRPOConfig(max_steps=...): the data "
                                  "stream is laid out step by step")
        columns = {tuple(ds.column_names) for ds in self.datasets.values()}
        if len(columns) != 1:
            raise ValueError(f"the datasets per level must share their columns, got {columns}")
        # Unshuffled, TRL's RepeatSampler hands out rows in order, one generation batch of
        # `per_batch` prompts every `micro_steps` micro-steps; so row r's optimizer step is known.
        per_batch = args.generation_batch_size // trainer.num_generations
        micro_steps, accumulation = _generation_period(trainer)
        end = max(args.max_steps, (self.start_stage + len(self.schedule)) * self.steps_per_stage)
        rows = math.ceil(end * accumulation / micro_steps) * per_batch
        seed = args.data_seed if args.data_seed is not None else args.seed
        order = {level: np.random.default_rng([seed, i]).permutation(len(ds))
                 for i, (level, ds) in enumerate(sorted(self.datasets.items()))}

        def rows_to_examples(batch: dict[str, list]) -> dict[str, list]:
            examples = []
            for r in batch["_row"]:
                step = r // per_batch * micro_steps // accumulation
                level = self.schedule[self.stage_index(step)][DIFFICULTY]
                examples.append(self.datasets[level][int(order[level][r % len(order[level])])])
            return {c: [e[c] for e in examples] for c in next(iter(columns))}

        return Dataset.from_dict({"_row": list(range(rows))}).with_transform(rows_to_examples)


# ---- checks and setters on a GRPOTrainer ----------------------------------------------------

def _carry_forward(schedule: Sequence[Mapping[str, Any]], start_stage: int) -> list[dict]:
    """Stages as full dicts (an omitted name keeps its value), checked by this project's rules."""
    out: list[dict] = []
    for i, stage in enumerate(schedule):
        unknown = sorted(set(stage) - set(KNOWN))
        if unknown:
            raise ValueError(f"stage {start_stage + i}: unknown hyperparameter {unknown[0]!r}; "
                             f"known names: {list(KNOWN)}")
        merged = {**(out[-1] if out else {}), **stage}
        try:
            GRPOConfig(**{k: v for k, v in merged.items() if k != DIFFICULTY})
        except ValueError as err:
            raise ValueError(f"stage {start_stage + i}: {err}") from None
        out.append(merged)
    return out


def _check_stage(trainer: Any, stage: Mapping[str, Any], k: int) -> None:
    for name, value in stage.items():
        if name in BUILT and not _same(value, _built_value(trainer, name)):
            raise ScheduleRefused(
                f"stage {k}: {name}={value!r}, but this GRPOTrainer was built with "
                f"{name}={_built_value(trainer, name)!r} and TRL cannot change {name} mid-run; "
                + _CHAINED)
    if stage.get("beta", 0) > 0 and trainer.ref_model is None and not _is_peft(trainer):
        raise ScheduleRefused(
            f"stage {k}: beta={stage['beta']} > 0, but this GRPOTrainer was built with beta=0 "
            "and so has no reference model, which TRL cannot add mid-run; build it with "
            "GRPOConfig(beta > 0) (the stages with beta=0 then skip the KL), or " + _CHAINED)


def _generation_period(trainer: Any) -> tuple[int, int]:
    """(micro-steps between two generation batches, micro-steps per optimizer step)."""
    args = trainer.args
    return args.steps_per_generation * trainer.num_iterations, args.gradient_accumulation_steps


def _built_value(trainer: Any, name: str) -> Any:
    if name == "num_generations":
        return trainer.num_generations
    if name == "prompts_per_step":  # unique prompts per generation batch
        return trainer.args.generation_batch_size // trainer.num_generations
    return getattr(trainer.args, name)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _is_peft(trainer: Any) -> bool:
    # A PEFT policy's reference is the model with its adapter disabled: always there.
    from accelerate.utils import is_peft_model  # what GRPOTrainer itself asks

    return is_peft_model(trainer.model)


def _apply(trainer: Any, name: str, value: Any) -> None:
    if name == "learning_rate":
        _set_learning_rate(trainer, value)
    elif name == "beta":
        trainer.beta = value
    elif name == "epsilon":
        trainer.epsilon_low = value
        if trainer.args.epsilon_high is None:  # TRL: an unset upper clip follows the lower one
            trainer.epsilon_high = value
    elif name == "epsilon_high":
        trainer.epsilon_high = value if value is not None else trainer.epsilon_low
    else:
        _set_sampling(trainer, name, value)


def _set_learning_rate(trainer: Any, lr: float) -> None:
    """The rate in the optimizer, and as the scheduler's base (which every later step reads)."""
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
    groups = trainer.optimizer.param_groups
    for i, group in enumerate(groups):
        lambdas = getattr(scheduler, "lr_lambdas", None)  # transformers' schedulers are LambdaLR
        if lambdas is not None:
            factor = lambdas[i](scheduler.last_epoch)
        else:
            factor = group["lr"] / scheduler.base_lrs[i] if scheduler.base_lrs[i] else 1.0
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    scheduler.base_lrs = [lr] * len(groups)
    scheduler._last_lr = [group["lr"] for group in groups]  # what Trainer logs as learning_rate


def _set_sampling(trainer: Any, name: str, value: Any) -> None:
    key = _SAMPLING[name]
    setattr(trainer, name, value)  # the loss reads max_completion_length (dr_grpo) here
    if getattr(trainer, "generation_config", None) is not None:
        setattr(trainer.generation_config, key, value)
    if isinstance(getattr(trainer, "generation_kwargs", None), dict):
        trainer.generation_kwargs[key] = value  # overrides the model's own generation config
    if getattr(trainer, "use_vllm", False):
        setattr(trainer.vllm_generation, name, value)  # read on every vLLM generate call
    if name == "temperature":  # the log-probs of the loss and of the KL reference
        for model in (trainer.model, trainer.ref_model):
            if model is not None:
                cell = _fused_head_temperature(trainer.accelerator.unwrap_model(model))
                cell.cell_contents = value


def _fused_head_temperature(model: Any) -> Any:
    """The closure cell holding the temperature of TRL's fused LM head (`add_fused_lm_head`)."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):  # TRL patched the base model
        model = model.get_base_model()
    fn = model.forward
    while fn is not None:  # mixed precision wraps the patched forward (functools.wraps chains)
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is not None and "temperature" in code.co_freevars and "fused_lm_head" in (
                code.co_varnames):
            return fn.__closure__[code.co_freevars.index("temperature")]
        fn = getattr(fn, "__wrapped__", None)
    raise RuntimeError("TRL's fused LM head is not on this model, so its log-prob temperature "
                       "cannot be set; StageSchedule follows TRL 1.16's GRPOTrainer")
