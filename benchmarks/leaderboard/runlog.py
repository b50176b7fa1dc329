"""The leaderboard's HDF5 run log: every stage of every run, safe against kill -9.

Each finished run is written to its own small HDF5 file (``runs/<task>__<controller>__seed<k>.h5``)
through a temp file and ``os.replace``, so a run file is either complete or absent. The combined
``leaderboard.h5`` is rebuilt from the run files the same way after every finished run. On restart
the run files say which runs are done; nothing else is trusted. A file that cannot be read (cut
short by a full disk, damaged by a copy) is moved aside as ``<name>.corrupt-<n>`` and its run runs
again (``recover_runs``); an unreadable ``leaderboard.h5`` is moved aside the same way and rebuilt.

Layout of one run group (``/<task>/<controller>/seed_<k>`` in the combined file, the root of a
run file):
attributes hold the scalars (test_score, dev_score, base_dev_score, budget, stages_spent, tokens,
seconds, wall_s, started_at, finished_at, settings and extra as JSON); ``stages/`` holds one row per
stage the controller trained, in order (episode, stage, dev_score, reward, seconds, tokens,
pathologies, ``hparams/<name>``); ``steps/`` one row per optimizer step (``stage_row`` points into
``stages/``, ``metrics/<name>``); ``schedule/<name>`` the chosen path's hyperparameters;
``anytime/`` the best dev score seen vs stages spent; ``test_correct`` (uint8, one per test item, in
test-item order) the chosen state's per-item test correctness, absent in older logs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

BASE = "base"  # the pseudo-controller whose record scores the untrained model
RUNS_DIR = "runs"
COMBINED = "leaderboard.h5"
STR = h5py.string_dtype()
# What reading a damaged file raises: h5py's OSError (truncated, not HDF5), KeyError (a group or
# attribute missing), ValueError/TypeError (a broken JSON attribute or column).
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError)


class UnreadableRunLog(ValueError):
    """A run log (a run's .h5 file or the combined leaderboard.h5) that cannot be read; the
    message names the file."""


@dataclass
class StageRecord:
    """One trained stage as the env reported it."""

    episode: int  # how many env.reset() calls preceded it, minus one
    stage: int  # index of the stage within its episode
    hparams: dict[str, Any]
    dev_score: float
    reward: float
    metrics: list[dict[str, float]]  # one dict per optimizer step, TRL metric names
    pathologies: list[str] = field(default_factory=list)
    seconds: float = math.nan
    tokens: float = math.nan


@dataclass
class RunRecord:
    """One (task, controller, seed) run: the chosen state's scores, its schedule and every stage."""

    task: str
    controller: str
    seed: int
    test_score: float
    dev_score: float
    base_dev_score: float
    budget: int
    stages_spent: int
    tokens: float = 0.0
    seconds: float = 0.0  # the env's training + evaluation seconds
    wall_s: float = 0.0  # the whole run, test evaluation included
    started_at: float = 0.0
    finished_at: float = 0.0
    schedule: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    anytime: list[tuple[int, float]] = field(default_factory=list)  # (stages spent, best dev)
    settings: dict[str, Any] = field(default_factory=dict)  # env and controller arguments
    extra: dict[str, Any] = field(default_factory=dict)  # controller-specific (LLM tokens, ...)
    # Each test item's correctness, in test-item order (env.last_test_correct); empty in logs
    # written before it was stored.
    test_correct: list[bool] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.task, self.controller, self.seed)


class StageRecorder(gym.Wrapper):
    """Keeps every trained stage (hyperparameters, per-step metrics, dev score, cost) in order."""

    def __init__(self, env: gym.Env, on_stage: Callable[[int], None] | None = None) -> None:
        super().__init__(env)
        self.stages: list[StageRecord] = []
        self.resets = 0
        self.on_stage = on_stage

    def reset(self, **kwargs: Any):
        self.resets += 1
        return self.env.reset(**kwargs)

    def step(self, action: Any):
        budget = self.env.unwrapped.budget
        t0, tokens0 = time.perf_counter(), budget.tokens
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.stages.append(StageRecord(
            episode=max(self.resets - 1, 0),
            stage=int(info.get("stage", len(self.stages) + 1)) - 1,  # its depth in the schedule
            hparams=plain(info.get("hparams", {})),  # the full GRPOConfig of the stage
            dev_score=float(info.get("dev_score", math.nan)),
            reward=float(reward),
            metrics=[plain(m) for m in info.get("metrics", [])],
            pathologies=[str(p) for p in info.get("pathologies", [])],
            seconds=time.perf_counter() - t0,
            tokens=float(budget.tokens - tokens0),
        ))
        if self.on_stage is not None:
            self.on_stage(len(self.stages))
        return obs, reward, terminated, truncated, info


def plain(d: dict[str, Any]) -> dict[str, Any]:
    # numpy scalars -> python, so HDF5 columns and JSON see plain numbers.
    return {k: (v.item() if hasattr(v, "item") and callable(v.item) else v) for k, v in d.items()}


def run_filename(task: str, controller: str, seed: int) -> str:
    return f"{task}__{controller}__seed{seed}.h5"


# ---- columns: lists of python values <-> HDF5 datasets ----------------------------------------


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float, np.integer, np.floating)))


def _column(values: list[Any]) -> np.ndarray:
    """Numbers (None -> NaN) become float64; anything else becomes strings."""
    if all(_is_number(v) for v in values):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array([str(v) for v in values], dtype=object)


def _write_column(group: h5py.Group, name: str, values: list[Any]) -> None:
    data = _column(values)
    # "/" is legal in metric names (clip_ratio/low_mean) but means a subgroup in HDF5.
    name = name.replace("/", "|")
    group.create_dataset(name, data=data, dtype=STR if data.dtype == object else data.dtype)


def _read_columns(group: h5py.Group) -> dict[str, list[Any]]:
    out = {}
    for name, ds in group.items():
        if not isinstance(ds, h5py.Dataset):
            continue  # a subgroup (stages/hparams) is read on its own
        data = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
        out[name.replace("|", "/")] = [v.item() if isinstance(v, np.generic) else v for v in data]
    return out


def _rows(columns: dict[str, list[Any]], n: int) -> list[dict[str, Any]]:
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _table(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows with possibly different keys -> columns over the union of keys, missing as None."""
    names = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in names}


# ---- one run <-> one HDF5 group -----------------------------------------------------------------

_SCALARS = ("task", "controller", "seed", "test_score", "dev_score", "base_dev_score", "budget",
            "stages_spent", "tokens", "seconds", "wall_s", "started_at", "finished_at")


def write_run(group: h5py.Group, rec: RunRecord) -> None:
    """Write a RunRecord into an (empty) HDF5 group."""
    for name in _SCALARS:
        group.attrs[name] = getattr(rec, name)
    group.attrs["settings"] = json.dumps(rec.settings, default=str, sort_keys=True)
    group.attrs["extra"] = json.dumps(rec.extra, default=str, sort_keys=True)

    st = group.create_group("stages")
    for name in ("episode", "stage", "dev_score", "reward", "seconds", "tokens"):
        _write_column(st, name, [getattr(s, name) for s in rec.stages])
    _write_column(st, "pathologies", [",".join(s.pathologies) for s in rec.stages])
    hp = st.create_group("hparams")
    for name, values in _table([s.hparams for s in rec.stages]).items():
        _write_column(hp, name, values)

    steps = group.create_group("steps")
    step_rows = [(i, m) for i, s in enumerate(rec.stages) for m in s.metrics]
    _write_column(steps, "stage_row", [i for i, _ in step_rows])
    met = steps.create_group("metrics")
    for name, values in _table([m for _, m in step_rows]).items():
        _write_column(met, name, values)

    sched = group.create_group("schedule")
    sched.attrs["length"] = len(rec.schedule)
    for name, values in _table(rec.schedule).items():
        _write_column(sched, name, values)

    any_ = group.create_group("anytime")
    _write_column(any_, "stages", [a for a, _ in rec.anytime])
    _write_column(any_, "best_dev", [b for _, b in rec.anytime])

    group.create_dataset("test_correct", data=np.asarray(rec.test_correct, dtype=np.uint8))


def read_run(group: h5py.Group) -> RunRecord:
    """Read back what write_run wrote."""
    a = {name: group.attrs[name] for name in _SCALARS}
    a = {k: v.item() if isinstance(v, np.generic) else v for k, v in a.items()}
    st = _read_columns(group["stages"])
    hp = _read_columns(group["stages/hparams"])
    n = len(st["episode"])
    steps = _read_columns(group["steps"])
    metrics = _rows(_read_columns(group["steps/metrics"]), len(steps["stage_row"]))
    per_stage: list[list[dict]] = [[] for _ in range(n)]
    for row, m in zip(steps["stage_row"], metrics, strict=True):
        per_stage[int(row)].append(m)
    stages = [
        StageRecord(episode=int(st["episode"][i]), stage=int(st["stage"][i]),
                    hparams={k: v[i] for k, v in hp.items()}, dev_score=st["dev_score"][i],
                    reward=st["reward"][i], metrics=per_stage[i],
                    pathologies=[p for p in st["pathologies"][i].split(",") if p],
                    seconds=st["seconds"][i], tokens=st["tokens"][i])
        for i in range(n)
    ]
    sched = group["schedule"]
    any_ = _read_columns(group["anytime"])
    return RunRecord(
        **a,
        schedule=_rows(_read_columns(sched), int(sched.attrs["length"])),
        stages=stages,
        anytime=[(int(s), float(b)) for s, b in zip(any_["stages"], any_["best_dev"], strict=True)],
        settings=json.loads(group.attrs["settings"]),
        extra=json.loads(group.attrs["extra"]),
        test_correct=[bool(v) for v in group["test_correct"][()]] if "test_correct" in group
        else [],
    )


# ---- files: atomic writes, resume, the combined log ---------------------------------------------


def _atomic_h5(path: Path, fill) -> None:
    """Write an HDF5 file through a temp file in the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable, so a power cut cannot resurrect the old directory entry.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_run(out_dir: Path, rec: RunRecord) -> Path:
    """Write one finished run to its own file atomically; returns the path."""
    path = Path(out_dir) / RUNS_DIR / run_filename(rec.task, rec.controller, rec.seed)
    _atomic_h5(path, lambda f: write_run(f, rec))
    return path


def read_run_file(path: Path) -> RunRecord:
    """The run in one run file; UnreadableRunLog naming the file if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return read_run(f)
    except _READ_ERRORS as err:
        raise UnreadableRunLog(f"run log {path} cannot be read ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_runs(out_dir: Path) -> dict[tuple[str, str, int], RunRecord]:
    """Every finished run under out_dir/runs, keyed by (task, controller, seed); read only, so
    an unreadable file is an UnreadableRunLog naming it (the harness uses recover_runs)."""
    runs_dir = Path(out_dir) / RUNS_DIR
    if not runs_dir.is_dir():
        return {}
    out = {}
    for path in sorted(runs_dir.glob("*.h5")):
        rec = read_run_file(path)
        out[rec.key] = rec
    return out


def set_aside(path: Path) -> Path:
    """Rename a broken file to ``<name>.corrupt-<n>`` (the first n free), kept for inspection
    and out of every glob of run files; returns the new path."""
    n = 1
    while path.with_name(f"{path.name}.corrupt-{n}").exists():
        n += 1
    return path.rename(path.with_name(f"{path.name}.corrupt-{n}"))


def recover_runs(out_dir: Path) -> tuple[dict[tuple[str, str, int], RunRecord], list[str]]:
    """load_runs for the owner of out_dir (the leaderboard holds its lock): each unreadable run
    file is set aside, so that its run counts as not done and runs again. Returns the runs and
    one note per file set aside."""
    runs_dir = Path(out_dir) / RUNS_DIR
    out, notes = {}, []
    for path in sorted(runs_dir.glob("*.h5")) if runs_dir.is_dir() else []:
        try:
            rec = read_run_file(path)
        except UnreadableRunLog as err:
            notes.append(f"{err}; moved to {set_aside(path).name}, and the run runs again")
            continue
        out[rec.key] = rec
    return out, notes


def recover_combined(out_dir: Path) -> str | None:
    """Set an unreadable out_dir/leaderboard.h5 aside (the caller rebuilds it from the run
    files); returns a note saying so, or None when it is readable or absent."""
    path = Path(out_dir) / COMBINED
    if not path.exists():
        return None
    try:
        read_combined(path)
    except UnreadableRunLog as err:
        return f"{err}; moved to {set_aside(path).name}, and rebuilt from the run files"
    return None


def restore_runs(out_dir: Path, done: dict[tuple[str, str, int], RunRecord]) -> str | None:
    """Write back the run file of each run that a readable out_dir/leaderboard.h5 holds and
    ``done`` (the run files found) lacks, and add it to ``done``; returns a note saying how many,
    or None. A clone of the repository holds the committed leaderboard.h5 but not the run files
    (ignored by git), so a long run goes on from the runs committed, not from the start."""
    path = Path(out_dir) / COMBINED
    if not path.exists():
        return None
    missing = [rec for rec in read_combined(path) if rec.key not in done]
    for rec in missing:
        save_run(out_dir, rec)
        done[rec.key] = rec
    if not missing:
        return None
    return (f"{len(missing)} finished run(s) restored from {path} to {Path(out_dir) / RUNS_DIR}/ "
            "(their run files were missing); they count as finished where their settings match")


def remove_temp_files(out_dir: Path) -> int:
    """Delete temp files a killed writer left (never renamed, so no run is lost); returns how many.

    Only for the process that owns out_dir (the leaderboard holds its lock): a live writer's temp
    file looks the same.
    """
    out_dir = Path(out_dir)
    temps = [*out_dir.glob(f"{RUNS_DIR}/*.tmp"), *out_dir.glob(COMBINED + ".*.tmp")]
    for tmp in temps:
        tmp.unlink(missing_ok=True)
    return len(temps)


def write_combined(out_dir: Path, records: list[RunRecord], meta: dict[str, str] | None = None
                   ) -> Path:
    """Rebuild out_dir/leaderboard.h5 (one group per run) atomically from the given records.

    ``meta`` (e.g. the command and controller order) goes into the root's attributes.
    """
    path = Path(out_dir) / COMBINED

    def fill(f: h5py.File) -> None:
        f.attrs["layout"] = "/<task>/<controller>/seed_<k>; see benchmarks/leaderboard/runlog.py"
        for k, v in (meta or {}).items():
            f.attrs[k] = v
        for rec in sorted(records, key=lambda r: r.key):
            write_run(f.create_group(f"{rec.task}/{rec.controller}/seed_{rec.seed}"), rec)

    _atomic_h5(path, fill)
    return path


def read_combined(path: Path) -> list[RunRecord]:
    """Every run in a combined leaderboard.h5; UnreadableRunLog naming it if it cannot be read."""
    out = []
    try:
        with h5py.File(path, "r") as f:
            for task in f.values():
                for ctrl in task.values():
                    out.extend(read_run(g) for g in ctrl.values())
    except _READ_ERRORS as err:
        raise UnreadableRunLog(f"{path} cannot be read ({_first_line(err)})") from None
    return out
