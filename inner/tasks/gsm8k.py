"""GSM8K: grade-school arithmetic word problems; the final answer is the number after "####".

Embedded scale: reasoning-gym's `chain_sum` (multi-step integer + and -), not `gsm_symbolic`,
whose long word problems are too long and too hard for a tiny char-level model. The prompt is
the bare expression and the worked solution computes it left to right, one step per line, then
"#### <number>" as in GSM8K, so that the checker is the same as at the paper scale.

Difficulty levels (embedded): 1, 2 = 2, 3 one-digit terms (2 is the default); 3 = 3 two-digit
terms; 4 = 4 two-digit terms. (Calibrated so that the shipped base model solves some but not most
default problems; its accuracy is in inner/assets/base/training.json.)
Paper scale: openai/gsm8k "main"; levels 0 = all, 1 = at most 2 calculation steps, 2 = 3-4,
3 = 5 or more (steps counted by the solution's <<...>> annotations); dev is carved from train.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from inner.tasks import arith, sources
from inner.tasks.answers import hash_answer, math_equal
from inner.tasks.base import Example, Task, register

CHAIN_SUM = {
    1: dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    2: dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1),
    3: dict(min_terms=3, max_terms=3, min_digits=2, max_digits=2),
    4: dict(min_terms=4, max_terms=4, min_digits=2, max_digits=2),
}
HUB = {
    "train": sources.HubSplit("openai/gsm8k", "main", "train"),
    "test": sources.HubSplit("openai/gsm8k", "main", "test"),
}


class Row(sources.Schema):
    """A row of openai/gsm8k: the question, and the worked answer that ends in "#### <n>"."""

    question: str
    answer: str


INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def worked_solution(expression: str) -> tuple[str, str]:
    """(solution, answer) for a +/- chain: one "a+b=c" line per step, then "#### answer"."""
    tree = arith.parse(expression.replace(" ", ""))
    answer = arith.fmt(arith.evaluate(tree))
    return "\n".join([*arith.steps(tree), f"#### {answer}"]), answer


def paper_level(solution: str) -> int:
    """Difficulty level of a GSM8K solution from its number of calculator annotations."""
    n = solution.count("<<")
    return 1 if n <= 2 else 2 if n <= 4 else 3


class GSM8KTask(Task):
    name = "gsm8k"
    env_id = "LLMZero-GSM8K-v0"
    levels = {"embedded": ((1, 2, 3, 4), 2), "paper": ((0, 1, 2, 3), 0)}
    # Embedded worked solutions: p95 23 tokens at the default level, 43 at the hardest.
    completion_lengths = {"embedded": ((16, 32, 48, 72), 48), "paper": ((256, 512, 1024), 512)}
    sft_early_fraction = 0.6

    def generate(self, n: int, difficulty: int, seed: int) -> Iterable[Example]:
        import reasoning_gym  # embedded scale only, and slow to import

        data = reasoning_gym.create_dataset("chain_sum", seed=seed, size=n, **CHAIN_SUM[difficulty])
        for item in data:
            expression = item["metadata"]["expression"].replace(" ", "")
            solution, answer = worked_solution(expression)
            yield Example(
                prompt=f"What is {expression}?\n",
                answer=answer,
                solution=solution,
                meta={"difficulty": difficulty, "expression": expression},
            )

    def load(self, split: str, difficulty: int) -> Iterable[Example]:
        for row in sources.rows(split, self.data_path, HUB, self.seed, Row):
            answer = hash_answer(row["answer"])
            level = paper_level(row["answer"])
            if answer is None or (split == "train" and difficulty not in (0, level)):
                continue
            yield Example(
                prompt=f"{row['question'].strip()}\n{INSTRUCTION}",
                answer=answer,
                # The dataset's calculator annotations <<48/2=24>> are not part of the text.
                solution=re.sub(r"<<[^>]*>>", "", row["answer"]).strip(),
                meta={"difficulty": level},
            )

    def extract(self, completion: str) -> str | None:
        return hash_answer(completion)

    def check(self, answer: str, example: Example) -> bool:
        return math_equal(answer, example.answer)

    def answer_early(self, example: Example) -> str | None:
        # The first step's result as the answer.
        return arith.answered_after_first_step(example.solution, example.answer, expression=False)


register(GSM8KTask)
