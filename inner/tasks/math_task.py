"""MATH: competition mathematics; the final answer is the last \\boxed{...}, checked by math-verify.

(Named math_task.py so that no module of the package is called `math`.)

Embedded scale: two reasoning-gym generators, alternating: `simple_equations` (algebra: a linear
equation in one variable, solved one step per line) and `basic_arithmetic` with + - * and no
brackets (prealgebra: evaluated with operator precedence, one operation per line; the generator's
own answer folds left to right, so ours is recomputed). Answers in \\boxed{}, as in MATH.
(`fraction_simplification` was tried: a model this small does not learn gcds in minutes.)
Difficulty levels (embedded) grow the number of terms and the size of the values:
1 = one operation, 2 = up to three terms of one digit (default), 3 and 4 longer and larger.
Paper scale: train from DigitalLearningGmbH/MATH-lighteval (MATH train, 7500 problems), test
MATH-500 (HuggingFaceH4/MATH-500); dev is carved from train. Levels 0 = all, 1-5 = MATH level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fractions import Fraction

import sympy
from sympy.parsing.sympy_parser import TokenError, parse_expr

from inner.tasks import arith, sources
from inner.tasks.answers import boxed_answer, math_equal, math_parse
from inner.tasks.base import Example, Task, register

EQUATIONS = {
    1: dict(min_terms=2, max_terms=2, min_value=1, max_value=9),
    2: dict(min_terms=2, max_terms=3, min_value=1, max_value=9),
    3: dict(min_terms=3, max_terms=3, min_value=1, max_value=20),
    4: dict(min_terms=3, max_terms=4, min_value=1, max_value=50),
}
ARITHMETIC = {
    1: dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    2: dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1),
    3: dict(min_terms=4, max_terms=4, min_digits=1, max_digits=1),
    4: dict(min_terms=4, max_terms=4, min_digits=2, max_digits=2),
}
HUB = {
    "train": sources.HubSplit("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
    "test": sources.HubSplit("HuggingFaceH4/MATH-500", None, "test"),
}


class Row(sources.Schema):
    """A row of MATH-lighteval (problem, level "Level 3", type, solution) or of MATH-500
    (problem, solution, answer, subject, level 3)."""

    problem: str
    solution: str
    answer: str | None = None
    level: str | int | None = None
    subject: str | None = None
    type: str | None = None


INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def linear_form(side: str, var: str) -> tuple[Fraction, Fraction] | None:
    """(a, b) with side == a*var + b, for a linear expression in `var` written with digits, `var`,
    + - * and brackets (as reasoning-gym writes its equations); None otherwise. sympy parses it:
    only the generator's own text reaches it, and the characters are checked first."""
    side = side.replace(" ", "")
    if not (len(var) == 1 and var.isalpha() and re.fullmatch(rf"[0-9+\-*(){var}]+", side)):
        return None
    x = sympy.Symbol(var)
    try:
        expr = parse_expr(side, local_dict={var: x})
        if not isinstance(expr, sympy.Expr):  # "()" is a tuple
            return None
        poly = sympy.Poly(expr, x)
    except (SyntaxError, TypeError, TokenError, sympy.SympifyError, sympy.PolynomialError):
        return None
    if poly.degree() > 1:
        return None
    a, b = poly.coeff_monomial(x), poly.coeff_monomial(1)
    return Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q))


def _linear_text(a: Fraction, b: Fraction, var: str) -> str:
    """a*var+b written compactly: "3*x+2", "-x", "x-4"."""
    head = {1: var, -1: f"-{var}"}.get(a, f"{arith.fmt(a)}*{var}")
    return head if b == 0 else f"{head}{'+' if b > 0 else '-'}{arith.fmt(abs(b))}"


def equation_solution(equation: str, var: str) -> tuple[str, str] | None:
    """(worked solution, answer) for a linear equation: expand, isolate, divide, \\boxed{}."""
    left, _, right = equation.replace(" ", "").partition("=")
    lhs, rhs = linear_form(left, var), linear_form(right, var)
    if lhs is None or rhs is None or lhs[0] == 0 or rhs[0] != 0:
        return None
    (a, b), c = lhs, rhs[1]
    lines = []
    # Brackets or several constant terms: show the collected form a*x+b first.
    if "(" in left or len(re.findall(r"(?<=[0-9a-z)])[-+]", left)) > 1:
        lines.append(f"{_linear_text(a, b, var)}={arith.fmt(c)}")
    if b != 0:
        lines.append(f"{_linear_text(a, Fraction(0), var)}={arith.fmt(c - b)}")
    answer = arith.fmt((c - b) / a)
    if a != 1:
        lines.append(f"{var}={answer}")
    return "\n".join([*lines, f"\\boxed{{{answer}}}"]), answer


def paper_level(level: object) -> int:
    """MATH level 1-5 from "Level 3" or 3; 0 when unknown."""
    m = re.search(r"[1-5]", str(level))
    return int(m.group(0)) if m else 0


class MathTask(Task):
    name = "math"
    env_id = "LLMZero-MATH-v0"
    levels = {"embedded": ((1, 2, 3, 4), 2), "paper": ((0, 1, 2, 3, 4, 5), 0)}
    # Embedded worked solutions: p95 28 tokens at the default level, 56 at the hardest.
    completion_lengths = {"embedded": ((16, 24, 32, 48), 32), "paper": ((512, 1024, 2048), 1024)}
    sft_early_fraction = 0.5

    def generate(self, n: int, difficulty: int, seed: int) -> Iterable[Example]:
        import reasoning_gym  # embedded scale only, and slow to import

        half = (n + 1) // 2
        eqs = reasoning_gym.create_dataset(
            "simple_equations", seed=seed, size=half, **EQUATIONS[difficulty]
        )
        sums = reasoning_gym.create_dataset(
            "basic_arithmetic",
            seed=seed,
            size=half,
            operators=("+", "-", "*"),
            allow_parentheses=False,
            allow_negation=False,
            **ARITHMETIC[difficulty],
        )
        for eq, arithmetic in zip(eqs, sums, strict=True):
            var, equation = eq["metadata"]["variable"], eq["metadata"]["equation"].replace(" ", "")
            worked = equation_solution(equation, var)
            if worked is not None:
                yield Example(
                    prompt=f"Solve {equation}.\n",
                    answer=worked[1],
                    solution=worked[0],
                    meta={"difficulty": difficulty, "subject": "algebra"},
                )
            expression = arithmetic["metadata"]["expression"].replace(" ", "")
            tree = arith.parse(expression)
            if tree is not None:
                answer = arith.fmt(arith.evaluate(tree))
                yield Example(
                    prompt=f"Compute {expression}.\n",
                    answer=answer,
                    solution="\n".join([*arith.steps(tree), f"\\boxed{{{answer}}}"]),
                    meta={"difficulty": difficulty, "subject": "prealgebra"},
                )

    def load(self, split: str, difficulty: int) -> Iterable[Example]:
        for row in sources.rows(split, self.data_path, HUB, self.seed, Row):
            # MATH-500 has an answer column; MATH train has only the solution's last \boxed{}.
            answer = row.get("answer") or boxed_answer(row["solution"])
            level = paper_level(row.get("level"))
            if not answer or (split == "train" and difficulty not in (0, level)):
                continue
            yield Example(
                prompt=f"{row['problem'].strip()}\n{INSTRUCTION}",
                answer=answer,
                solution=row["solution"].strip(),
                meta={"difficulty": level, "subject": row.get("subject") or row.get("type")},
            )

    def problem_key(self, example: Example) -> str:
        # An embedded equation in another variable is the same equation.
        if self.scale == "embedded" and example.meta.get("subject") == "algebra":
            return re.sub(r"[a-z]", "x", example.prompt)
        return example.prompt

    def extract(self, completion: str) -> str | None:
        return boxed_answer(completion)

    def check(self, answer: str, example: Example) -> bool:
        return math_equal(answer, example.answer)

    def well_formatted(self, answer: str, example: Example) -> bool:
        # math-verify returns only the raw string for what it cannot read as mathematics;
        # zoo and nan come from dividing by zero.
        parsed = [x for x in math_parse(answer) if not isinstance(x, str)]
        return any(not (hasattr(x, "has") and x.has(sympy.zoo, sympy.nan)) for x in parsed)

    def answer_early(self, example: Example) -> str | None:
        # The first step's result as the answer.
        return arith.answered_after_first_step(example.solution, example.answer, expression=False)


register(MathTask)
