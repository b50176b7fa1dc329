"""The task interface (examples per split, a bounded never-raising reward) and the task registry.

A task is one class: its data and checks, and everything else that is specific to it (the gym id,
difficulty levels, completion-length grid, split sizes, its part of the base model's SFT data).
`register(TaskClass)` makes it known to `get_task`, the env ids (metaenv), the action grids and the
benchmarks' task lists. The four built-in tasks register themselves the same way.

Each task builds its data at two scales: "embedded" (procedural, from reasoning-gym, compact
prompts for a tiny char-level model) and "paper" (the real dataset through `datasets`, from the
hub or a local path). The reward code is the same at both scales.

Splits: dev and test are built first, at the default difficulty, with their own seeds; test drops
any problem that is in dev and train drops any problem that is in dev or test. So the evaluation
splits never depend on which training difficulty was asked for, and no split overlaps another.
A problem is its prompt, or a task's coarser `problem_key` (e.g. Countdown's numbers in any order).
Dev and test hold exactly the size asked of them (and at the embedded scale, their default size)
in distinct problems, or building them is a SplitSizeError that names the task, the split and
both sizes: a split is never silently smaller than asked. An empty split is always an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

SPLITS = ("train", "dev", "test")
SCALES = ("embedded", "paper")

FORMAT_WEIGHT = 0.1  # score = 0.9 * correct + 0.1 * well-formatted final answer


@dataclass(frozen=True)
class Example:
    """One problem: the prompt, its canonical answer, a worked solution (SFT target), metadata."""

    prompt: str
    answer: str
    solution: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


# Built splits are shared by every Task object of the same configuration in this process.
_CACHE: dict[tuple, list[Example]] = {}


HELD_OUT_DRAW = 512  # Task.held_out_at draws at least as a test split of this size would


class SplitSizeError(ValueError):
    """A split cannot hold the number of problems asked of it (never silently a smaller one)."""


def _spare(n: int | None) -> int | None:
    """Rows drawn for an evaluation split of `n` distinct problems: spares for the duplicates."""
    return None if n is None else int(n * 1.5) + 16


class Task:
    """Base class: split construction and caching, the reward; subclasses supply data and checks.

    A subclass sets `name`, `env_id`, and per scale it supports `levels` and
    `completion_lengths`; it implements `generate` (embedded scale) and/or `load` (paper scale),
    `extract` and `check`, and optionally `well_formatted`, `problem_key` and `answer_early`.
    """

    name: str = ""
    env_id: str = ""  # the Gymnasium id metaenv registers for it, e.g. "LLMZero-GSM8K-v0"
    # Per scale: (levels, default). Paper scale level 0 means "the dataset's natural mix".
    levels: dict[str, tuple[tuple[int, ...], int]] = {}
    # Per scale: (max_completion_length grid, default), in tokens (characters at the embedded
    # scale). The grid brackets the task's worked solutions, with one value that truncates them.
    completion_lengths: dict[str, tuple[tuple[int, ...], int]] = {}
    sizes: dict[str, dict[str, int | None]] = {
        "embedded": {"train": 4000, "dev": 256, "test": 512},
        "paper": {"train": None, "dev": 200, "test": None},
    }
    # The shipped base model's SFT data (inner.base_model): the fraction of this task's worked
    # solutions replaced by `answer_early`, and how many times its pairs are repeated.
    sft_early_fraction: float = 0.0
    sft_repeats: int = 1

    def __init__(
        self,
        scale: str = "embedded",
        *,
        seed: int = 0,
        train_size: int | None = None,
        dev_size: int | None = None,
        test_size: int | None = None,
        data_path: str | Path | None = None,
    ):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if scale not in self.levels:
            raise ValueError(f"task {self.name!r} has no {scale} scale; it has {list(self.levels)}")
        self.scale = scale
        self.seed = seed
        self.data_path = None if data_path is None else str(data_path)
        defaults = self.sizes[scale]
        self.size = {
            "train": train_size if train_size is not None else defaults["train"],
            "dev": dev_size if dev_size is not None else defaults["dev"],
            "test": test_size if test_size is not None else defaults["test"],
        }
        # The sizes dev and test must hold: those given, and at the embedded scale the defaults
        # too (its generators can always draw more). A paper-scale default only caps what the
        # data gives, so that a small local file gives small splits; asking a split for more
        # than it holds (Trainer.evaluate) is still an error.
        given = {"dev": dev_size, "test": test_size}
        self.required = {s: self.size[s] if scale == "embedded" else given[s] for s in given}
        self.difficulty_levels, self.default_difficulty = self.levels[scale]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale!r}, seed={self.seed})"

    # ----- data -----

    def examples(self, split: str, difficulty: int | None = None) -> list[Example]:
        """The examples of `split` (train at `difficulty`; dev/test at the default); cached."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        level = self.default_difficulty if difficulty is None else difficulty
        if level not in self.difficulty_levels:
            raise ValueError(
                f"{self.name}: difficulty {level} not in {self.difficulty_levels} ({self.scale})"
            )
        if split != "train" and level != self.default_difficulty:
            raise ValueError(
                f"{self.name}: {split} is fixed at difficulty {self.default_difficulty}; "
                "only the train distribution is controllable"
            )
        base = (
            type(self),
            self.scale,
            self.seed,
            self.data_path,
            tuple(sorted(self.size.items())),
        )
        if (*base, split, level) not in _CACHE:
            if split == "train":
                held_out = {self.problem_key(e) for s in ("dev", "test") for e in self.examples(s)}
                rows = (
                    e for e in self._build("train", level) if self.problem_key(e) not in held_out
                )
                _CACHE[(*base, split, level)] = list(islice(rows, self.size["train"]))
                if not _CACHE[(*base, split, level)]:
                    raise SplitSizeError(f"{self._where()}: the train split at difficulty "
                                         f"{level} holds no problem outside dev and test")
            else:
                dev = self._evaluation_split("dev", level, set())
                dev_keys = {self.problem_key(e) for e in dev}
                test = self._evaluation_split("test", level, dev_keys)
                _CACHE[(*base, "dev", level)] = dev
                _CACHE[(*base, "test", level)] = test
        return _CACHE[(*base, split, level)]

    def _evaluation_split(self, split: str, level: int, exclude: set[str]) -> list[Example]:
        """The first `size[split]` distinct problems of dev or test outside `exclude` (all of
        them for a size of None); SplitSizeError when fewer than required or none.

        At the embedded scale a short draw is drawn again, twice and four times as long (the
        generators are seeded per item, so a longer draw keeps the shorter one as its prefix
        and the first problems of a split never change); the paper scale has what its data has.
        """
        n = self.size[split]
        rows = self._unique(self._build(split, level, _spare(n)), n, exclude)
        for factor in (2, 4) if self.scale == "embedded" and n is not None else ():
            if len(rows) >= n:
                break
            rows = self._unique(self._build(split, level, factor * _spare(n)), n, exclude)
        required = self.required[split]
        if (required is not None and len(rows) < required) or not rows:
            asked = f"{required} asked" if required is not None else "at least one asked"
            hint = f"; pass {split}_size={len(rows)} or less" if rows else ""
            raise SplitSizeError(f"{self._where()}: the {split} split holds {len(rows)} "
                                 f"distinct problems, {asked}{hint}")
        return rows

    def _where(self) -> str:
        """The task, its scale and where its data comes from, for error messages."""
        source = f", data_path={self.data_path}" if self.data_path else ""
        return f"task {self.name!r} ({self.scale} scale, seed {self.seed}{source})"

    def held_out_at(self, level: int, n: int) -> list[Example]:
        """`n` test-like problems at `level`, for per-level analyses (the env never uses them).

        At the default level they are the test split's first `n`. At any other level they are
        drawn like a test split and kept apart from the dev split and from the train split of
        every level, so that no analysis scores a problem some stage may have trained on.
        Unlike a split, this is at most `n`: a level whose problems run out gives fewer, and
        the analysis reports how many it scored.
        """
        if level == self.default_difficulty:
            return self.examples("test")[:n]
        if level not in self.difficulty_levels:
            raise ValueError(
                f"{self.name}: difficulty {level} not in {self.difficulty_levels} ({self.scale})"
            )
        seen = {self.problem_key(e) for e in self.examples("dev")}
        seen |= {self.problem_key(e) for d in self.difficulty_levels
                 for e in self.examples("train", d)}
        # Drawn as a test split of at least HELD_OUT_DRAW problems is, whatever the task's test
        # size, so that the per-level analyses see the same problems when a test size changes.
        draw = _spare(max(n, HELD_OUT_DRAW))
        return self._unique(self._build("test", level, draw), n, seen)

    def _build(self, split: str, difficulty: int, n: int | None = None) -> Iterable[Example]:
        """Raw examples of a split before de-duplication: at the embedded scale `n` of them (by
        default the train size), at the paper scale all the data has."""
        if self.scale == "embedded":
            # reasoning-gym seeds item i with seed + i, so split seeds lie far apart; dev/test
            # ask for spare rows to survive de-duplication.
            offset = {"train": 10 + difficulty, "dev": 1, "test": 2}[split]
            n = self.size["train"] if n is None else n
            seed = 100_000_000 * self.seed + 1_000_000 * offset
            from inner.tasks.cache import cached  # it imports reasoning-gym, slow to import

            params = dict(task=self.name, n=n, difficulty=difficulty, seed=seed)
            # The task's own source is part of the cache key (a user's task lives outside
            # inner/tasks); a task defined without a file (a notebook) is not cached.
            source = getattr(sys.modules[type(self).__module__], "__file__", None)
            if source is None:
                return self.generate(n, difficulty, seed)
            build = partial(_rows, self.generate, n, difficulty, seed)
            return [Example(**row) for row in cached(self.name, params, build, Path(source))]
        return self.load(split, difficulty)

    def generate(self, n: int, difficulty: int, seed: int) -> Iterable[Example]:
        """Embedded scale: `n` procedural examples at `difficulty` from `seed`."""
        raise NotImplementedError

    def load(self, split: str, difficulty: int) -> Iterable[Example]:
        """Paper scale: the real dataset's examples of `split` (train filtered to `difficulty`)."""
        raise NotImplementedError

    def problem_key(self, example: Example) -> str:
        """What makes two examples the same problem for the split separation: the prompt."""
        return example.prompt

    def answer_early(self, example: Example) -> str | None:
        """The worked solution cut short so that its answer is wrong (a flaw of the base model
        that GRPO can correct), or None where there is nothing to cut."""
        return None

    def _unique(self, rows: Iterable[Example], n: int | None, exclude: set[str]) -> list[Example]:
        """The first `n` examples that are distinct problems and not in `exclude`."""
        seen = set(exclude)
        out: list[Example] = []
        for e in rows:
            if n is not None and len(out) >= n:
                break
            key = self.problem_key(e)
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    # ----- reward -----

    def extract(self, completion: str) -> str | None:
        """The final answer in the task's format, or None when there is none."""
        raise NotImplementedError

    def check(self, answer: str, example: Example) -> bool:
        """Whether an extracted answer solves the example."""
        raise NotImplementedError

    def well_formatted(self, answer: str, example: Example) -> bool:
        """Whether an extracted answer has the expected shape (earns the format bonus)."""
        return True

    def is_correct(self, completion: str, example: Example) -> bool:
        """Whether the completion's final answer is right; never raises."""
        try:
            answer = self.extract(completion)
            return answer is not None and bool(self.check(answer, example))
        except Exception:  # a bug in a checker must not crash a training run; score it wrong
            return False

    def score(self, completion: str, example: Example) -> float:
        """Reward in [0, 1]: 0.9 if correct + 0.1 if the answer is well formatted; never raises."""
        try:
            answer = self.extract(completion)
            if answer is None:
                return 0.0
            correct = bool(self.check(answer, example))
            formatted = correct or bool(self.well_formatted(answer, example))
        except Exception:
            return 0.0
        return (1.0 - FORMAT_WEIGHT) * correct + FORMAT_WEIGHT * formatted


def _rows(generate: Callable[..., Iterable[Example]], *args: Any) -> list[dict[str, Any]]:
    """The generated examples as plain rows (what the on-disk cache keeps)."""
    return [asdict(e) for e in generate(*args)]


# ----- the registry -----

_REGISTRY: dict[str, type[Task]] = {}
_HOOKS: list[Callable[[type[Task]], None]] = []


def register(cls: type[Task]) -> type[Task]:
    """Make the task class known by its `name`; returns it (usable as a class decorator).

    Registering a class of the same module and name again (a re-run notebook cell) replaces it.
    """
    _check_task_class(cls)
    old = _REGISTRY.get(cls.name)
    if old is not None and _qualified(old) != _qualified(cls):
        raise ValueError(f"task name {cls.name!r} is already registered by {_qualified(old)}")
    clash = [c.name for c in _REGISTRY.values() if c.env_id == cls.env_id and c.name != cls.name]
    if clash:
        raise ValueError(f"{cls.__name__}: env_id {cls.env_id!r} is already task {clash[0]!r}'s")
    _REGISTRY[cls.name] = cls
    for hook in _HOOKS:
        hook(cls)
    return cls


def on_register(hook: Callable[[type[Task]], None]) -> None:
    """Call `hook(cls)` for every registered task class now and for every one registered later
    (metaenv registers the gym ids this way, so inner never imports gymnasium)."""
    _HOOKS.append(hook)
    for cls in registered():
        hook(cls)


def registered() -> tuple[type[Task], ...]:
    """The registered task classes, in registration order (the built-in tasks first)."""
    return tuple(_REGISTRY.values())


def task_names() -> tuple[str, ...]:
    """The names of the registered tasks, in registration order."""
    return tuple(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The registered class of task `name`; ValueError naming the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {task_names()}")
    return _REGISTRY[name]


def get_task(name: str, scale: str = "embedded", **kwargs) -> Task:
    """The task `name` (one of task_names()) at `scale`; kwargs go to the Task constructor."""
    return task_class(name)(scale, **kwargs)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_task_class(cls: type) -> None:
    """Raise ValueError naming what a task class lacks before anything is built from it."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"register expects a subclass of inner.tasks.Task, got {cls!r}")
    for attr in ("name", "env_id"):
        if not isinstance(getattr(cls, attr), str) or not getattr(cls, attr):
            raise ValueError(f"{cls.__name__}.{attr} must be a non-empty string")
    scales = set(cls.levels)
    if not scales or not scales <= set(SCALES):
        raise ValueError(f"{cls.__name__}.levels must map some of {SCALES} to (levels, default)")
    for attr in ("levels", "completion_lengths"):
        table = getattr(cls, attr)
        if set(table) != scales:
            raise ValueError(f"{cls.__name__}.{attr} must cover the scales {sorted(scales)}")
        for scale, (grid, default) in table.items():
            if default not in grid:
                raise ValueError(f"{cls.__name__}.{attr}[{scale!r}]: default {default!r} "
                                 f"is not in {tuple(grid)}")
    missing = scales - set(cls.sizes)
    if missing:
        raise ValueError(f"{cls.__name__}.sizes lacks the scales {sorted(missing)}")
    if not 0.0 <= cls.sft_early_fraction <= 1.0 or cls.sft_repeats < 1:
        raise ValueError(f"{cls.__name__}: sft_early_fraction must lie in [0, 1] and "
                         "sft_repeats be >= 1")

