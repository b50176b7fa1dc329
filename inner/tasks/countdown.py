"""Countdown: combine the given numbers with + - * / to reach a target, each number used once.

The answer is an expression in <answer>...</answer> (the TinyZero format). It is checked by the
bounded parser of `arith` (never `eval`): ASCII digits, + - * / and parentheses only, every
given number used exactly once, exact value with `Fraction`, division by zero rejected.

Embedded scale: reasoning-gym's `countdown` with small numbers and targets, a compact prompt, and
a worked solution of one "a op b=c" line per operation. Difficulty levels: 1 = 3 numbers up to 5,
2 = 3 numbers up to 9 (default), both made with + - * only; 3 = 3 numbers up to 20 and
4 = 4 numbers up to 20, with division too. (Any correct expression scores; division is always
allowed in answers.) The format reward asks for a complete attempt: an expression over exactly
the given numbers, whatever its value.
Paper scale: Jiayi-Pan/Countdown-Tasks-3to4 (train only; dev and test are carved from it) with
the TinyZero prompt; levels 0 = all, 3 and 4 = that many numbers. Its solutions (SFT targets) are
found by a small exhaustive search.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction

from inner.tasks import arith, sources
from inner.tasks.answers import tagged_answer
from inner.tasks.base import Example, Task, register

_NO_DIVISION = ("+", "-", "*")
COUNTDOWN = {
    1: dict(
        min_numbers=3,
        max_numbers=3,
        min_value=1,
        max_value=5,
        min_target=1,
        max_target=20,
        operators=_NO_DIVISION,
    ),
    2: dict(
        min_numbers=3,
        max_numbers=3,
        min_value=1,
        max_value=9,
        min_target=1,
        max_target=30,
        operators=_NO_DIVISION,
    ),
    3: dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=10, max_target=100),
    4: dict(min_numbers=4, max_numbers=4, min_value=1, max_value=20, min_target=10, max_target=100),
}
HUB = {"train": sources.HubSplit("Jiayi-Pan/Countdown-Tasks-3to4", None, "train")}


class Row(sources.Schema):
    """A row of Countdown-Tasks-3to4: the numbers to combine and the target."""

    nums: list[int]
    target: int


PROMPT = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>."
)


def parse_answer(answer: str) -> arith.Node | None:
    """The expression tree of an answer; a trailing "= target" is tolerated."""
    return arith.parse(answer.split("=")[0].strip())


def uses_exactly(tree: arith.Node, numbers: list[int]) -> bool:
    """Whether the tree's number literals are `numbers`, each used once."""
    return sorted(arith.leaves(tree)) == sorted(numbers)


def solves(tree: arith.Node, numbers: list[int], target: int) -> bool:
    """Whether the tree uses exactly `numbers` (each once) and evaluates to `target`."""
    return uses_exactly(tree, numbers) and arith.evaluate(tree) == target


def solve(numbers: list[int], target: int) -> arith.Node | None:
    """An expression over all `numbers` equal to `target`, by exhaustive search; None if none."""

    def search(items: list[tuple[Fraction, arith.Node]]) -> arith.Node | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ta), (b, tb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                candidates = [("-", a - b), ("/", a / b if b else None)]
                if i < j:  # + and * commute: try each pair once
                    candidates += [("+", a + b), ("*", a * b)]
                for op, value in candidates:
                    if value is not None:
                        found = search([*rest, (value, arith.Node(op, left=ta, right=tb))])
                        if found is not None:
                            return found
        return None

    return search([(Fraction(n), arith.Node(None, value=n)) for n in numbers])


def worked_solution(tree: arith.Node) -> str:
    """One "a op b=c" line per operation, then the answer in tags."""
    return "\n".join([*arith.steps(tree), f"<answer>{arith.to_text(tree)}</answer>"])


class CountdownTask(Task):
    name = "countdown"
    env_id = "LLMZero-Countdown-v0"
    levels = {"embedded": ((1, 2, 3, 4), 2), "paper": ((0, 3, 4), 0)}
    # Embedded worked solutions: p95 38 tokens at the default level, 56 at the hardest.
    completion_lengths = {"embedded": ((32, 48, 64, 80), 48), "paper": ((256, 512, 1024), 512)}
    sizes = {
        # Default-level puzzles (3 numbers up to 9) repeat often: beside dev, the test draw
        # holds 405 distinct ones, and the train split is carved around exactly those.
        "embedded": {"train": 4000, "dev": 256, "test": 405},
        "paper": {"train": 20000, "dev": 200, "test": 500},  # 490k rows: cap what is built
    }
    sft_early_fraction = 0.35
    sft_repeats = 4  # the search is the hardest skill: repeated pairs lift its base accuracy

    def generate(self, n: int, difficulty: int, seed: int) -> Iterable[Example]:
        import reasoning_gym  # embedded scale only, and slow to import

        data = reasoning_gym.create_dataset("countdown", seed=seed, size=n, **COUNTDOWN[difficulty])
        for item in data:
            numbers, target = list(item["metadata"]["numbers"]), int(item["metadata"]["target"])
            tree = parse_answer(item["metadata"]["expression"])
            if tree is None or not solves(tree, numbers, target):
                continue  # never seen; guards the SFT targets against generator changes
            yield Example(
                prompt=f"Use {','.join(map(str, numbers))} to make {target}.\n",
                answer=arith.to_text(tree),
                solution=worked_solution(tree),
                meta={"difficulty": difficulty, "numbers": numbers, "target": target},
            )

    def load(self, split: str, difficulty: int) -> Iterable[Example]:
        for row in sources.rows(split, self.data_path, HUB, self.seed, Row):
            numbers, target = [int(x) for x in row["nums"]], int(row["target"])
            if split == "train" and difficulty not in (0, len(numbers)):
                continue
            tree = solve(numbers, target)
            if tree is None:
                continue
            steps = "\n".join(arith.steps(tree))
            yield Example(
                prompt=PROMPT.format(nums=numbers, target=target),
                answer=arith.to_text(tree),
                solution=f"<think>\n{steps}\n</think>\n<answer>{arith.to_text(tree)}</answer>",
                meta={"difficulty": len(numbers), "numbers": numbers, "target": target},
            )

    def problem_key(self, example: Example) -> str:
        # The same numbers in another order are the same puzzle.
        return f"{sorted(example.meta['numbers'])}->{example.meta['target']}"

    def extract(self, completion: str) -> str | None:
        return tagged_answer(completion)

    def check(self, answer: str, example: Example) -> bool:
        tree = parse_answer(answer)
        return tree is not None and solves(tree, example.meta["numbers"], example.meta["target"])

    def well_formatted(self, answer: str, example: Example) -> bool:
        # Every number, as Logic's format reward asks for every person: an expression over a
        # subset (the first step's result, say) is a shortcut, not an attempt.
        tree = parse_answer(answer)
        return (
            tree is not None
            and arith.evaluate(tree) is not None
            and uses_exactly(tree, example.meta["numbers"])
        )

    def answer_early(self, example: Example) -> str | None:
        # The first step's expression as the answer: it leaves out a number.
        return arith.answered_after_first_step(example.solution, example.answer, expression=True)


register(CountdownTask)
