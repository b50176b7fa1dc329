"""The task interface (examples per split, a bounded never-raising reward) and the task registry.

A task is one class: its data and checks, and everything else that is specific to it (the gym id,
difficulty levels, completion-length grid, split sizes, its part of the base model's SFT data).
`register(TaskClass)` makes it known to `get_task`, the env ids (metaenv), the action grids and the
benchmarks' task lists. The four built-in tasks register themselves the same way.

Each task builds its data at two scales: "embedded" (procedural, from reasoning-gym, compact
prompts for a tiny char-level model) and "paper" (the real dataset through `datasets`, from the
hub or a local path). The reward code is the same at both scales.

Difficulty: every task has levels, and the level `MIXTURE` (0): at the embedded scale the equal
mixture of every level, at the paper scale the dataset's natural mix.

Splits: dev and test are built first, with their own seeds; test drops any problem that is in dev
and train drops any problem that is in dev or test. So the evaluation splits never depend on which
training difficulty was asked for, and no split overlaps another. At the embedded scale dev and
test mix every level in equal shares, interleaved level by level so that their first n problems
are mixed too (as real models face test sets that mix levels); at the paper scale they are the
real dataset's.
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
MIXTURE = 0  # the difficulty "every level": equal shares (embedded), the natural mix (paper)

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
    # Per scale: (levels, default training level), MIXTURE (0) among the levels: the equal
    # mixture of the others (embedded), the dataset's natural mix (paper).
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
        # The levels proper (what the mixture mixes, and what results report one by one).
        self.single_levels = tuple(lv for lv in self.difficulty_levels if lv != MIXTURE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale!r}, seed={self.seed})"

    # ----- data -----

    def examples(self, split: str, difficulty: int | None = None) -> list[Example]:
        """The examples of `split`, cached: train at `difficulty` (default: the task's default
        training level); dev and test, which take no difficulty, mix every level."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split != "train" and difficulty is not None:
            raise ValueError(f"{self.name}: {split} mixes every level and takes no difficulty "
                             f"(got {difficulty}); only the train distribution is controllable")
        level = self.default_difficulty if difficulty is None else difficulty
        if level not in self.difficulty_levels:
            raise ValueError(
                f"{self.name}: difficulty {level} not in {self.difficulty_levels} ({self.scale})"
            )
        base = (type(self), self.scale, self.seed, self.data_path,
                tuple(sorted(self.size.items())))
        key = (*base, split, level if split == "train" else None)
        if key not in _CACHE:
            if split == "train":
                _CACHE[key] = self._train_split(level)
            else:
                dev, test = self._evaluation_splits()
                _CACHE[(*base, "dev", None)], _CACHE[(*base, "test", None)] = dev, test
        return _CACHE[key]

    def _train_split(self, level: int) -> list[Example]:
        """Train at `level`, outside dev and test; at the embedded scale the mixture interleaves
        the levels' train splits (equal shares, one level after another; a level whose split is
        shorter, its problems being few, repeats)."""
        if level == MIXTURE and self.scale == "embedded":
            per_level = [self.examples("train", lv) for lv in self.single_levels]
            longest = max(map(len, per_level))
            return [rows[i % len(rows)] for i in range(longest) for rows in per_level]
        held_out = {self.problem_key(e) for s in ("dev", "test") for e in self.examples(s)}
        rows = (e for e in self._build("train", level) if self.problem_key(e) not in held_out)
        train = list(islice(rows, self.size["train"]))
        if not train:
            raise SplitSizeError(f"{self._where()}: the train split at difficulty {level} holds "
                                 "no problem outside dev and test")
        return train

    def _evaluation_splits(self) -> tuple[list[Example], list[Example]]:
        """Dev and test: at the embedded scale equal shares of every level, interleaved."""
        if self.scale != "embedded":
            dev = self._evaluation_split("dev", MIXTURE, set())
            return dev, self._evaluation_split("test", MIXTURE, {self.problem_key(e)
                                                                  for e in dev})
        out = {}
        exclude: set[str] = set()
        for split in ("dev", "test"):
            shares = _shares(self.size[split], len(self.single_levels))
            per_level = [self._evaluation_split(split, lv, exclude, n)
                         for lv, n in zip(self.single_levels, shares, strict=True)]
            out[split] = _interleave(per_level)
            exclude = {self.problem_key(e) for e in out[split]}
        return out["dev"], out["test"]

    def _evaluation_split(self, split: str, level: int, exclude: set[str],
                          n: int | None = None) -> list[Example]:
        """The first `n` (default `size[split]`) distinct problems of dev or test at `level`
        outside `exclude` (all of them for a size of None); SplitSizeError when fewer than
        required or none.

        At the embedded scale a short draw is drawn again, twice and four times as long (the
        generators are seeded per item, so a longer draw keeps the shorter one as its prefix
        and the first problems of a split never change); the paper scale has what its data has.
        """
        share = n is not None and n != self.size[split]  # one level's share of a mixed split
        n = self.size[split] if n is None else n
        rows = self._unique(self._build(split, level, _spare(n)), n, exclude)
        for factor in (2, 4) if self.scale == "embedded" and n is not None else ():
            if len(rows) >= n:
                break
            rows = self._unique(self._build(split, level, factor * _spare(n)), n, exclude)
        required = n if share else self.required[split]
        if (required is not None and len(rows) < required) or not rows:
            asked = f"{required} asked" if required is not None else "at least one asked"
            if share:
                raise SplitSizeError(
                    f"{self._where()}: level {level} holds {len(rows)} distinct {split} "
                    f"problems, and its equal share of {split}_size={self.size[split]} is "
                    f"{required}; pass a smaller {split}_size")
            hint = f"; pass {split}_size={len(rows)} or less" if rows else ""
            raise SplitSizeError(f"{self._where()}: the {split} split holds {len(rows)} "
                                 f"distinct problems, {asked}{hint}")
        return rows

    def _where(self) -> str:
        """The task, its scale and where its data comes from, for error messages."""
        source = f", data_path={self.data_path}" if self.data_path else ""
        return f"task {self.name!r} ({self.scale} scale, seed {self.seed}{source})"

    def held_out_at(self, level: int, n: int) -> list[Example]:
        """The first `n` test problems at `level`, for per-level analyses (at most `n`: the test
        split holds its equal share of each level). At the paper scale, whose test split is the
        dataset's, problems of other levels are drawn like a test split and kept apart from dev
        and from the train split of every level."""
        if level not in self.single_levels:
            raise ValueError(
                f"{self.name}: difficulty {level} not in {self.single_levels} ({self.scale})"
            )
        if self.scale == "embedded":
            return [e for e in self.examples("test") if e.meta.get("difficulty") == level][:n]
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
            offset = {"train": 10, "dev": 100, "test": 200}[split] + difficulty
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


def _shares(n: int, parts: int) -> list[int]:
    """`n` split into `parts` equal shares, the first ones one larger where it does not divide."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _interleave(lists: list[list[Example]]) -> list[Example]:
    """One item of each list in turn (a prefix of the result holds every list's share)."""
    out: list[Example] = []
    for i in range(max(map(len, lists), default=0)):
        out += [rows[i] for rows in lists if i < len(rows)]
    return out


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

