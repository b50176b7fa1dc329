"""Export a schedule found here as a runnable TRL GRPOTrainer script, plus its JSON in TRL's names.

    python -m benchmarks.export_trl --run results/leaderboard.h5 --task gsm8k --controller skills \\
        --model inner/assets/base --out trl-gsm8k-skills
    python trl-gsm8k-skills/train_trl.py --output-dir runs/trl-gsm8k-skills

`--run` is one of:
* a leaderboard output directory (e.g. `results/`): its `runs/*.h5`, else its `leaderboard.h5`;
* an HDF5 file: one run (`runs/<task>__<controller>__seed<k>.h5`) or a combined `leaderboard.h5`;
  `--task`, `--controller` and `--seed` pick the run when it holds several;
* a JSON file: `{"schedule": [{name: value, ...}, ...], "steps_per_stage": N, "task": "gsm8k",
  "scale": "embedded", "seed": 0, "fixed": {name: value}}`. Only "schedule" is required here;
  `steps_per_stage` and `task` may instead come from `--steps-per-stage` / `--task`, or from a run
  record's `"settings": {"env_id": ..., "env_kwargs": {"steps_per_stage": N}}`.

Names are this project's (`GRPOConfig` fields, which are TRL's, and `difficulty`). A stage that
omits a name keeps the previous stage's value; the first stage takes the env's defaults for the
task and scale, and `fixed` (or a run's recorded stages) sets the names no stage controls.

`--model` is a Hugging Face hub id (`org/name`) or a local model folder (with its config.json);
a path that does not exist (`./x`, `/x`, `a/b/c`) is an error. `--out` is a folder that receives
`train_trl.py` and `schedule.json`; it refuses to overwrite them unless `--force`. The script
trains with TRL's GRPOTrainer and `inner.trl_schedule.StageSchedule`; where a stage changes what
TRL reads only when a trainer is built (`num_generations`, the batch), it runs chained segments,
each a new GRPOConfig resumed from the previous segment's checkpoint. A `beta` rising from 0 needs
no segment: every trainer whose stages reach beta > 0 is built with it, so TRL keeps a reference
model, and the schedule sets beta to 0 where a stage asks. The last output line is `key=value`
pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import h5py

import metaenv
from benchmarks.leaderboard.runlog import (
    RUNS_DIR,
    RunRecord,
    UnreadableRunLog,
    read_combined,
    read_run_file,
)
from inner.config import GRPOConfig
from inner.tasks import SCALES, get_task
from inner.trl_schedule import BUILT, DIFFICULTY, KNOWN
from metaenv.hparams import DEFAULT_FIXED, default_values

SCRIPT, PLAN = "train_trl.py", "schedule.json"
_TYPES = get_type_hints(GRPOConfig)
# What a hub id looks like (huggingface_hub's rule, shortened): "name" or "org/name".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ExportError(ValueError):
    """The input holds no exportable schedule; the message says what is missing and where."""


@dataclass
class FoundRun:
    """A schedule and what is needed to replay it: stage length, task, scale, seed, fixed values."""

    schedule: list[dict[str, Any]]
    steps_per_stage: int
    task: str
    scale: str = "embedded"
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""


# ---- reading a run -----------------------------------------------------------------------------

def load_run(path: str | Path, task: str | None = None, controller: str | None = None,
             seed: int | None = None, steps_per_stage: int | None = None) -> FoundRun:
    """The schedule in `path` (see the module doc); the selectors pick among several runs."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--run {path}: no such file or directory")
    if path.suffix == ".json":
        return _from_json(path, task, steps_per_stage)
    record = _pick(_records(path), task, controller, seed, path)
    return _from_record(record, steps_per_stage, f"{path}: {record.task}/{record.controller}/"
                                                 f"seed_{record.seed}")


def _records(path: Path) -> list[RunRecord]:
    if path.is_dir():
        files = sorted((path / RUNS_DIR).glob("*.h5"))
        if not files and (path / "leaderboard.h5").exists():
            files = [path / "leaderboard.h5"]
        if not files:
            raise ExportError(f"--run {path}: no {RUNS_DIR}/*.h5 or leaderboard.h5 in it")
        return [r for f in files for r in _records(f)]
    try:
        with h5py.File(path, "r") as f:
            single = "schedule" in f  # one run's own file, else a combined leaderboard.h5
    except OSError as err:  # truncated, or not HDF5 at all
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"--run {path} is neither a JSON schedule (.json) nor a readable "
                          f"HDF5 run log ({reason})") from None
    try:
        return [read_run_file(path)] if single else read_combined(path)
    except UnreadableRunLog as err:
        raise ExportError(f"--run {err}") from None


def _pick(records: list[RunRecord], task: str | None, controller: str | None, seed: int | None,
          path: Path) -> RunRecord:
    chosen = [r for r in records if (task is None or r.task == task)
              and (controller is None or r.controller == controller)
              and (seed is None or r.seed == seed)]
    if len(chosen) == 1:
        return chosen[0]
    given = " ".join(f"--{k} {v}" for k, v in
                     (("task", task), ("controller", controller), ("seed", seed)) if v is not None)
    if chosen:
        listed = "; pick one of: " + ", ".join(
            f"--task {r.task} --controller {r.controller} --seed {r.seed}" for r in chosen)
    else:
        listed = "; it holds: " + ", ".join(f"{r.task}/{r.controller}/seed {r.seed}"
                                            for r in records)
    what = f"{len(chosen)} runs match" if chosen else "no run matches"
    raise ExportError(f"--run {path}: {what} {given or '(no --task/--controller/--seed)'}{listed}")


def _from_record(rec: RunRecord, steps_per_stage: int | None, source: str) -> FoundRun:
    if not rec.schedule:
        raise ExportError(f"{source} has an empty schedule: its chosen state is the base model "
                          "(no trained stage beat it on dev), so there is nothing to export")
    env_kwargs = rec.settings.get("env_kwargs", {})
    named = set().union(*rec.schedule)
    # Each recorded stage holds the full GRPOConfig; the names no stage controls are fixed.
    fixed = {k: v for k, v in (rec.stages[0].hparams if rec.stages else {}).items()
             if k not in named}
    return FoundRun(schedule=rec.schedule, task=rec.task, seed=rec.seed, fixed=fixed,
                    steps_per_stage=_stage_length(steps_per_stage, env_kwargs, source),
                    scale=env_kwargs.get("scale", "embedded"), source=source)


def _from_json(path: Path, task: str | None, steps_per_stage: int | None) -> FoundRun:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"--run {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("schedule"), list):
        raise ExportError(f"--run {path} has no 'schedule': expected a JSON object "
                          '{"schedule": [{"learning_rate": 1e-4, ...}, ...], "steps_per_stage": '
                          'N, "task": "gsm8k"} (a RunResult\'s schedule with its env settings)')
    if not data["schedule"]:
        raise ExportError(f"--run {path} has an empty schedule: nothing to export")
    bad = next((k for k, v in enumerate(data["schedule"]) if not isinstance(v, dict)), None)
    if bad is not None:
        raise ExportError(f"--run {path}: schedule stage {bad} must be an object "
                          f"{{name: value, ...}}, got {data['schedule'][bad]!r}")
    settings = _object(data, "settings", path)
    env_tasks = {env_id: t for t, env_id in metaenv.env_ids().items()}
    task = task or data.get("task") or env_tasks.get(settings.get("env_id"))
    if task is None:
        raise ExportError(f"--run {path} names no task: add \"task\" to it or pass --task")
    if task not in metaenv.env_ids():
        raise ExportError(f"--run {path}: unknown task {task!r}; valid tasks: "
                          f"{', '.join(metaenv.env_ids())}")
    env_kwargs = _object(settings, "env_kwargs", path)
    scale = data.get("scale", env_kwargs.get("scale", "embedded"))
    if scale not in SCALES:
        raise ExportError(f"--run {path}: scale must be one of {SCALES}, got {scale!r}")
    sps = steps_per_stage or data.get("steps_per_stage")
    return FoundRun(schedule=data["schedule"], task=task, scale=scale,
                    seed=_whole(data.get("seed", 0), "seed", 0, str(path)),
                    steps_per_stage=_stage_length(sps, env_kwargs, str(path)),
                    fixed=_object(data, "fixed", path), source=str(path))


def _object(data: dict, key: str, path: Path) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ExportError(f"--run {path}: {key!r} must be an object {{...}}, got {value!r}")
    return value


def _whole(value: Any, name: str, low: int, source: str) -> int:
    """`value` as an integer >= low (an HDF5 float such as 5.0 included); ExportError if not."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value == int(value) and value >= low):
        raise ExportError(f"{source}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _stage_length(given: int | None, env_kwargs: dict, source: str) -> int:
    sps = given or env_kwargs.get("steps_per_stage")
    if not sps:
        raise ExportError(f"{source} does not say how many steps a stage has: pass "
                          "--steps-per-stage (the env's steps_per_stage)")
    return _whole(sps, "steps_per_stage", 1, source)


# ---- the plan: stages in TRL's names, segments ---------------------------------------------------

def _coerce(name: str, value: Any, source: str) -> Any:
    """A value as GRPOConfig types it (HDF5 stores every number as a float, None as NaN);
    ExportError naming the stage, the name and the value when it is of another type."""
    if name not in KNOWN:
        raise ExportError(f"{source}: unknown hyperparameter {name!r}; known: {list(KNOWN)}")
    kind = int if name == DIFFICULTY else _TYPES[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if kind == float | None:
            return None
        raise ExportError(f"{source}: {name} has no value")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool and (isinstance(value, bool) or (number and value in (0, 1))):
        return bool(value)
    if kind is int and number and math.isfinite(value) and value == round(value):
        return int(round(value))
    if kind in (float, float | None) and number and math.isfinite(value):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "a whole number", str: "a string"}.get(
        kind, "a finite number")
    raise ExportError(f"{source}: {name} must be {expected}, got {value!r}")


def full_stages(run: FoundRun) -> list[dict[str, Any]]:
    """Every stage with every name: env defaults < fixed < earlier stages < the stage itself."""
    task = get_task(run.task, run.scale)
    current = (GRPOConfig().to_dict() | default_values(run.task, run.scale)
               | DEFAULT_FIXED[run.scale] | {DIFFICULTY: task.default_difficulty} | run.fixed)
    stages = []
    for k, stage in enumerate(run.schedule):
        current = current | stage
        where = f"{run.source} stage {k}"
        stages.append({n: _coerce(n, v, where) for n, v in current.items()})
        if stages[-1][DIFFICULTY] not in task.difficulty_levels:
            raise ExportError(f"{where}: difficulty must be one of {task.difficulty_levels} "
                              f"for {run.task} ({run.scale}), got {stages[-1][DIFFICULTY]}")
        try:  # the values GRPOConfig refuses (a negative learning rate, an unknown loss_type)
            GRPOConfig(**{n: v for n, v in stages[-1].items() if n != DIFFICULTY})
        except ValueError as err:
            raise ExportError(f"{where}: {err}") from None
    if len({s["num_iterations"] for s in stages}) > 1:
        raise ExportError(f"{run.source}: num_iterations changes between stages, which changes "
                          "how many TRL steps a stage has; export supports one value")
    return stages


def trl_config(stage: dict[str, Any]) -> dict[str, Any]:
    """One stage as TRL GRPOConfig arguments for one process: the same names, but TRL sizes the
    batch in completions (prompts_per_step x num_generations) and difficulty picks the data."""
    config = {k: v for k, v in stage.items() if k not in ("prompts_per_step", DIFFICULTY)}
    config["per_device_train_batch_size"] = stage["prompts_per_step"] * stage["num_generations"]
    config["gradient_accumulation_steps"] = 1  # one generation batch per optimizer step
    return config


def segments(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of stages one GRPOTrainer can take: a new one wherever a name TRL reads only when a
    trainer is built changes. Each is built with beta > 0 if any of its stages needs the KL."""
    out: list[dict[str, Any]] = []
    for k, stage in enumerate(stages):
        changed = [n for n in BUILT if k > 0 and stage[n] != stages[k - 1][n]]
        if k == 0 or changed:
            out.append({"stages": [k, k + 1], "new_trainer_for": changed,
                        "grpo_config": trl_config(stage)})
        else:
            out[-1]["stages"][1] = k + 1
    for segment in out:
        start, end = segment["stages"]
        # TRL builds a reference model only for beta > 0; a stage at beta 0 then skips the KL.
        segment["grpo_config"]["beta"] = next(
            (s["beta"] for s in stages[start:end] if s["beta"] > 0), 0.0)
    return out


def plan(run: FoundRun, model: str) -> dict[str, Any]:
    """What schedule.json holds and train_trl.py runs."""
    stages = full_stages(run)
    named = sorted(set().union(*run.schedule, {DIFFICULTY}))  # the data level is always set
    controlled = [n for n in trl_config(stages[0]) if n in named]
    if {"num_generations", "prompts_per_step"} & set(named):
        controlled.append("per_device_train_batch_size")
    parts = segments(stages)
    configs = [part["grpo_config"] for part in parts]
    common = {k: v for k, v in configs[0].items() if all(c[k] == v for c in configs)}
    sps = run.steps_per_stage * stages[0]["num_iterations"]  # TRL counts optimizer updates
    for part in parts:
        part["max_steps"] = part["stages"][1] * sps
        part["grpo_config"] = {k: v for k, v in part["grpo_config"].items() if k not in common}
    return {
        "source": run.source, "task": run.task, "scale": run.scale, "seed": run.seed,
        "model": model, "steps_per_stage": sps,
        "stages": [{n: trl_config(s)[n] for n in controlled} | {DIFFICULTY: s[DIFFICULTY]}
                   for s in stages],
        "grpo_config": common | {"lr_scheduler_type": "constant", "logging_steps": 1,
                                 "seed": run.seed, "top_k": 0},
        "segments": parts,
        "schedule": [{n: s[n] for n in named} for s in stages],
    }


# ---- the script ------------------------------------------------------------------------------

SCRIPT_TEMPLATE = '''\
"""GRPO in TRL with the schedule from __SOURCE__.

Written by `python -m benchmarks.export_trl`; schedule.json beside it holds the same stages in
TRL's GRPOConfig names. Needs this project with its TRL extra: pip install -e ".[export]".

    python train_trl.py [--model HUB_ID_OR_DIR] [--data FILE.jsonl] [--output-dir DIR]

--data: JSON lines with "prompt" and "answer", optionally "meta" (what the task's checker reads)
and "difficulty" (needed when the schedule changes it); by default the task's own train split.
__SEGMENTS__
"""

from __future__ import annotations

import argparse
import json

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from inner.tasks import Example, get_task
from inner.trl_schedule import StageSchedule

TASK, SCALE, SEED, MODEL = __TASK__, __SCALE__, __SEED__, __MODEL__
STEPS_PER_STAGE = __STEPS__  # optimizer steps
# This project's names; StageSchedule sets them at each stage's first step.
SCHEDULE = __SCHEDULE__
# GRPOConfig of every segment, then what each segment changes. TRL sizes batches in completions.
GRPO_CONFIG = __GRPO_CONFIG__
SEGMENTS = __SEGMENTS_LIST__

CHECKER = get_task(TASK, SCALE)  # its score() is the reward the schedule was found with
ON_GPU = torch.cuda.is_available()
DEVICE = {"use_cpu": not ON_GPU, "bf16": ON_GPU and torch.cuda.is_bf16_supported(),
          "activation_checkpointing": ON_GPU}


def reward(completions, prompts, answer, meta, **kwargs) -> list[float]:
    return [CHECKER.score(c, Example(p, a, "", json.loads(m)))
            for c, p, a, m in zip(completions, prompts, answer, meta, strict=True)]


def load_data(path: str | None) -> tuple[Dataset, dict[int, Dataset] | None]:
    """A train_dataset, and one dataset per difficulty level where the data has levels."""
    if path is None:
        levels = sorted({stage.get("difficulty", CHECKER.default_difficulty) for stage in SCHEDULE})
        rows = [{"prompt": e.prompt, "answer": e.answer, "meta": e.meta, "difficulty": level}
                for level in levels for e in CHECKER.examples("train", difficulty=level)]
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows or any("prompt" not in r or "answer" not in r for r in rows):
            raise SystemExit(f"{path}: every line needs a 'prompt' and an 'answer'")

    def dataset(rs: list[dict]) -> Dataset:
        return Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"]),
                                   "meta": json.dumps(r.get("meta", {}))} for r in rs])

    if not all("difficulty" in r for r in rows):
        return dataset(rows), None
    levels = {level: dataset([r for r in rows if r["difficulty"] == level])
              for level in sorted({r["difficulty"] for r in rows})}
    return next(iter(levels.values())), levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="hub id or local directory")
    parser.add_argument("--data", help="JSON lines file (see above); default: the task's data")
    parser.add_argument("--output-dir", default="trl-run")
    args = parser.parse_args()
    train_dataset, levels = load_data(args.data)
    checkpoint = None
    for segment in SEGMENTS:
        start, end = segment["stages"]
        steps = segment["max_steps"]  # global: a resumed run goes on counting
        # A checkpoint per stage (a resumed trainer keeps its checkpoint's save_steps anyway);
        # add save_total_limit=... to keep fewer.
        config = GRPOConfig(output_dir=args.output_dir, max_steps=steps, save_strategy="steps",
                            save_steps=STEPS_PER_STAGE, **DEVICE, **GRPO_CONFIG,
                            **segment["grpo_config"])
        schedule = StageSchedule(SCHEDULE[start:end], STEPS_PER_STAGE, datasets=levels,
                                 start_stage=start)
        trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config,
                              train_dataset=train_dataset, callbacks=[schedule])
        schedule.bind(trainer)
        # Resuming restores the optimizer and the scheduler with the checkpoint's learning
        # rate; StageSchedule then sets this stage's rate in both.
        trainer.train(resume_from_checkpoint=checkpoint)
        checkpoint = f"{args.output_dir}/checkpoint-{steps}"
    trainer.save_model(f"{args.output_dir}/final")
    print(f"final model: {args.output_dir}/final")


if __name__ == "__main__":
    main()
'''


def _segments_note(p: dict[str, Any]) -> str:
    if len(p["segments"]) == 1:
        return "\nOne GRPOTrainer runs every stage: TRL can take each change mid-run."
    changed = sorted({n for part in p["segments"] for n in part["new_trainer_for"]})
    spans = "; ".join(str(a) if b == a + 1 else f"{a}-{b - 1}"
                      for a, b in (part["stages"] for part in p["segments"]))
    return (f"\nTRL cannot change {', '.join(changed)} in a running trainer, so the stages run as "
            f"{len(p['segments'])} chained\nsegments (stages {spans}): each builds a new "
            "GRPOConfig and resumes from the previous segment's\ncheckpoint.")


def _literal(value: Any, indent: int = 0, lead: int = 0) -> str:
    """A Python literal that fits 96 columns: `value` at column `indent` after `lead` characters.

    Too long, a dict of plain values is packed a few items a line; anything else takes one
    item a line, as black would.
    """
    text = repr(value)
    if indent + lead + len(text) < 96 or not isinstance(value, list | dict):
        return text
    if isinstance(value, dict) and not any(isinstance(v, list | dict) for v in value.values()):
        lines = [""]
        for item in (f"{k!r}: {v!r}," for k, v in value.items()):
            if lines[-1] and indent + lead + 1 + len(lines[-1]) + len(item) >= 96:
                lines.append("")
            lines[-1] += (" " if lines[-1] else "") + item
        return "{" + ("\n" + " " * (indent + lead + 1)).join(lines)[:-1] + "}"
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{k!r}: " + _literal(v, indent + 4, len(repr(k)) + 2) for k, v in value.items()]
        return "{\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + "}"
    items = [_literal(v, indent + 4) for v in value]
    return "[\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + "]"


def render_script(p: dict[str, Any]) -> str:
    """train_trl.py for a plan: the template with the plan's values as Python literals."""
    values = {
        "__SOURCE__": p["source"], "__SEGMENTS__": _segments_note(p),
        "__TASK__": repr(p["task"]), "__SCALE__": repr(p["scale"]), "__SEED__": repr(p["seed"]),
        "__MODEL__": repr(p["model"]), "__STEPS__": repr(p["steps_per_stage"]),
        "__SCHEDULE__": _literal(p["schedule"], 0, len("SCHEDULE = ")),
        "__GRPO_CONFIG__": _literal(p["grpo_config"], 0, len("GRPO_CONFIG = ")),
        "__SEGMENTS_LIST__": _literal(p["segments"], 0, len("SEGMENTS = ")),
    }
    text = SCRIPT_TEMPLATE
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def export(run: FoundRun, model: str, out: str | Path) -> dict[str, Any]:
    """Write train_trl.py and schedule.json into `out`; returns the plan."""
    if Path(model).exists():  # a local model directory: the script may run from anywhere
        model = str(Path(model).resolve())
    p = plan(run, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN).write_text(json.dumps(p, indent=1) + "\n")
    (out / SCRIPT).write_text(render_script(p))
    return p


def model_error(model: str) -> str | None:
    """Why `model` is neither a local model folder nor a hub id, or None."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return f"--model {model} is not a model folder (it has no config.json)"
        return None
    if model.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(model):
        return f"--model {model}: no such folder, and not a Hugging Face hub id (org/name)"
    return None


def out_error(out: Path, force: bool) -> str | None:
    """Why train_trl.py and schedule.json cannot be written into folder `out`, or None."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            return f"--out {out}: {path} is a file; --out names a folder (made if missing)"
        if path.exists():
            break
    taken = [name for name in (SCRIPT, PLAN) if (out / name).exists()]
    if taken and not force:
        return (f"--out {out} already holds {' and '.join(taken)}; pass --force to overwrite "
                "them, or choose another --out")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory, HDF5 run log or JSON file")
    parser.add_argument("--model", required=True, help="hub id or local model directory")
    parser.add_argument("--out", required=True, help="directory for train_trl.py, schedule.json")
    parser.add_argument("--force", action="store_true",
                        help="overwrite train_trl.py and schedule.json in --out")
    parser.add_argument("--task", help="pick the run of this task, or name the JSON's task")
    parser.add_argument("--controller", help="pick the run of this controller")
    parser.add_argument("--seed", type=int, help="pick the run of this seed")
    parser.add_argument("--steps-per-stage", type=int, help="when the input does not say")
    args = parser.parse_args(argv)
    for why in (model_error(args.model), out_error(Path(args.out), args.force)):
        if why:
            parser.error(why)
    try:
        run = load_run(args.run, args.task, args.controller, args.seed, args.steps_per_stage)
        p = export(run, args.model, args.out)
    except ExportError as err:
        parser.error(str(err))
    if not Path(args.model).expanduser().exists():
        print(f"--model {args.model} is not a local folder: train_trl.py will load it from the "
              "Hugging Face hub", file=sys.stderr)
    print(f"{run.source}: {len(p['stages'])} stages x {p['steps_per_stage']} steps, "
          f"{len(p['segments'])} segment(s) -> {Path(args.out) / SCRIPT}", file=sys.stderr)
    print(f"stages={len(p['stages'])} steps_per_stage={p['steps_per_stage']} "
          f"segments={len(p['segments'])} script={Path(args.out) / SCRIPT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
