"""The four tasks behind one interface: examples per split and a bounded, never-raising reward.

Each task builds its data at two scales: "embedded" (procedural, from reasoning-gym, compact
prompts for a tiny char-level model) and "paper" (the real dataset through `datasets`, from the
hub or a local path). The reward code is the same at both scales.

Splits: dev and test are built first, at the default difficulty, with their own seeds; test drops
any problem that is in dev and train drops any problem that is in dev or test. So the evaluation
splits never depend on which training difficulty was asked for, and no split overlaps another.
A problem is its prompt, or a task's coarser `problem_key` (e.g. Countdown's numbers in any order).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

SPLITS = ("train", "dev", "test")
SCALES = ("embedded", "paper")
TASK_NAMES = ("gsm8k", "math", "countdown", "logic")

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


class Task:
    """Base class: split construction and caching, the reward; subclasses supply data and checks."""

    name: str = ""
    # Per scale: (levels, default). Paper scale level 0 means "the dataset's natural mix".
    levels: dict[str, tuple[tuple[int, ...], int]] = {}
    sizes: dict[str, dict[str, int | None]] = {
        "embedded": {"train": 4000, "dev": 256, "test": 512},
        "paper": {"train": None, "dev": 200, "test": None},
    }

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
        self.scale = scale
        self.seed = seed
        self.data_path = None if data_path is None else str(data_path)
        defaults = self.sizes[scale]
        self.size = {
            "train": train_size if train_size is not None else defaults["train"],
            "dev": dev_size if dev_size is not None else defaults["dev"],
            "test": test_size if test_size is not None else defaults["test"],
        }
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
            type(self).__name__,
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
            else:
                dev = self._unique(self._build("dev", level), self.size["dev"], set())
                dev_keys = {self.problem_key(e) for e in dev}
                test = self._unique(self._build("test", level), self.size["test"], dev_keys)
                _CACHE[(*base, "dev", level)] = dev
                _CACHE[(*base, "test", level)] = test
        return _CACHE[(*base, split, level)]

    def _build(self, split: str, difficulty: int) -> Iterable[Example]:
        """Raw examples of a split before de-duplication; dev/test may return extra."""
        if self.scale == "embedded":
            # reasoning-gym seeds item i with seed + i, so split seeds lie far apart; dev/test
            # ask for spare rows to survive de-duplication.
            offset = {"train": 10 + difficulty, "dev": 1, "test": 2}[split]
            n = self.size[split] if split == "train" else int(self.size[split] * 1.5) + 16
            seed = 100_000_000 * self.seed + 1_000_000 * offset
            from inner.tasks.cache import cached  # the cache module imports this one

            params = dict(task=self.name, n=n, difficulty=difficulty, seed=seed)
            return cached(self.name, params, lambda: self.generate(n, difficulty, seed))
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


def get_task(name: str, scale: str = "embedded", **kwargs) -> Task:
    """The task `name` (one of TASK_NAMES) at `scale`; kwargs go to the Task constructor."""
    from inner.tasks.countdown import CountdownTask
    from inner.tasks.gsm8k import GSM8KTask
    from inner.tasks.logic import LogicTask
    from inner.tasks.math_task import MathTask

    classes = {"gsm8k": GSM8KTask, "math": MathTask, "countdown": CountdownTask, "logic": LogicTask}
    if name not in classes:
        raise ValueError(f"unknown task {name!r}; choose one of {TASK_NAMES}")
    return classes[name](scale, **kwargs)
