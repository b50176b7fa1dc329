"""Bad completions score 0 quickly and never raise, on every task."""

from __future__ import annotations

import random
import time

import pytest

import inner.tasks as tasks
from inner.tasks import arith, get_task, task_names
from inner.tasks.answers import math_equal, sympy_safe

DEEP = "(" * 10_000 + "1" + ")" * 10_000
ADVERSARIAL = {
    "power tower": "9**9**9",
    "power tower in every format": "#### 9**9**9 <answer>9**9**9</answer> \\boxed{9**9**9}",
    "latex tower": "\\boxed{9^{9^{9}}}",
    "big exponent": "\\boxed{2^{100000}}",
    "big factorial": "\\boxed{99999!}",
    "power of powers": "\\boxed{(9^9)^(9^9)}",
    "import": "__import__('os').system('true')",
    "import in every format": "#### __import__('os') <answer>__import__('os')</answer> "
    "\\boxed{__import__('os')}",
    "100k characters": "1" * 100_000,
    "100k in every format": "#### " + "9" * 100_000 + "\\boxed{" + "9" * 100_000 + "}"
    "<answer>" + "1+" * 50_000 + "1</answer>",
    "unicode digits": "#### ٥ \\boxed{５} <answer>٣+٥+٧</answer>",
    "nested 10k": DEEP,
    "nested 10k in every format": f"#### {DEEP} \\boxed{{{DEEP}}} <answer>{DEEP}</answer>",
    "nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "many openers": "<answer>" * 20_000 + "\\boxed{" * 10_000 + "####" * 10_000,
    "division by zero": "<answer>1/0</answer> \\boxed{1/0}",
    "empty": "",
    "whitespace": " \n\t ",
    "not a string": None,
}


@pytest.fixture(scope="module")
def loaded():
    """One small example per task; each reward path is exercised once so imports are warm."""
    tasks.base._CACHE.clear()
    out = {}
    for name in task_names():
        task = get_task(name, train_size=8, dev_size=4, test_size=4)
        example = task.examples("dev")[0]
        task.score(example.solution, example)
        task.score("#### 1 \\boxed{x+1} <answer>A=knave</answer>", example)
        out[name] = (task, example)
    return out


@pytest.mark.parametrize("name", task_names())
@pytest.mark.parametrize("label", list(ADVERSARIAL))
def test_bad_completion_scores_zero_fast(loaded, name, label):
    task, example = loaded[name]
    completion = ADVERSARIAL[label]
    start = time.perf_counter()
    score = task.score(completion, example)
    correct = task.is_correct(completion, example)
    elapsed = time.perf_counter() - start
    assert score == 0.0 and correct is False
    assert elapsed < 0.2, f"{name} / {label} took {elapsed:.2f}s"


def test_random_garbage_never_raises(loaded):
    rng = random.Random(0)
    alphabet = "0123456789+-*/()<>answer#{}\\boxed^! =,AB"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for task, example in loaded.values():
            assert 0.0 <= task.score(text, example) <= 1.0
        arith.parse(text)


def test_sympy_guard():
    for ok in ["3", "\\frac{2}{3}", "2^{10}\\cdot 3^5", "x^2+1", "\\sqrt{2}", "5!"]:
        assert sympy_safe(ok), ok
    for bad in [
        "9^{9^{9}}",
        "2^{100000}",
        "99999!",
        "(9^9)^(9^9)",
        "9**9**9",
        "__import__",
        "x" * 1000,
        "٥",
        "(" * 20 + "1" + ")" * 20,
        "1" * 60,
    ]:
        assert not sympy_safe(bad), bad
    start = time.perf_counter()
    assert not math_equal("\\sqrt{2}^{99999999}", "2")
    assert time.perf_counter() - start < 0.2
