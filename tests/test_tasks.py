"""The embedded tasks and their registry: API, splits, difficulty, rewards and answer checkers."""

from __future__ import annotations

import random
import re
import statistics
from fractions import Fraction

import pytest

import inner.tasks as tasks
from inner.tasks import Example, arith, get_task, task_names
from inner.tasks.answers import boxed_answer, hash_answer, math_equal, tagged_answer
from inner.tasks.countdown import solve
from inner.tasks.logic import parse_assignment
from inner.tasks.math_task import equation_solution, linear_form

SMALL = dict(train_size=200, dev_size=40, test_size=60)


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    """This module builds its data afresh, once, with a private on-disk cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMZERO_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(tasks.base, "_CACHE", {})
        yield


@pytest.mark.parametrize("name", task_names())
def test_api_and_disjoint_splits(name):
    task = get_task(name, **SMALL)
    assert task.name == name and task.scale == "embedded"
    assert task.default_difficulty in task.difficulty_levels
    splits = {s: task.examples(s) for s in ("train", "dev", "test")}
    assert len(splits["dev"]) == 40 and len(splits["test"]) == 60
    assert 150 <= len(splits["train"]) <= 200  # train drops the prompts of dev and test
    for key in (lambda e: e.prompt, task.problem_key):  # Countdown: numbers in any order
        keys = {s: {key(e) for e in ex} for s, ex in splits.items()}
        assert not keys["train"] & keys["dev"]
        assert not keys["train"] & keys["test"]
        assert not keys["dev"] & keys["test"]
        assert len(keys["dev"]) == 40 and len(keys["test"]) == 60  # no duplicates
    for ex in splits["dev"] + splits["test"]:
        assert isinstance(ex, Example) and ex.meta["difficulty"] == task.default_difficulty
    assert task.examples("dev") is splits["dev"]  # cached


@pytest.mark.parametrize("name", task_names())
def test_solutions_earn_full_reward_and_wrong_answers_do_not(name):
    task = get_task(name, **SMALL)
    for ex in task.examples("dev") + task.examples("train")[:50]:
        assert task.score(ex.solution, ex) == 1.0 and task.is_correct(ex.solution, ex)
    # Another example's solution is well formatted but (almost always) wrong: 0.1. (Countdown's
    # format reward also asks for this example's numbers, which another example rarely has: 0.)
    dev = task.examples("dev")
    wrong = [task.score(dev[i + 1].solution, dev[i]) for i in range(len(dev) - 1)]
    assert statistics.mean(wrong) < 0.5
    assert all(w in ((0.0, 0.1, 1.0) if name == "countdown" else (0.1, 1.0)) for w in wrong)
    assert task.score("I do not know", dev[0]) == 0.0


@pytest.mark.parametrize("name", task_names())
def test_difficulty_controls_train_only(name):
    task = get_task(name, **{**SMALL, "train_size": 60})
    levels = task.difficulty_levels
    assert len(levels) >= 3
    lengths = []
    for level in levels:
        train = task.examples("train", level)
        assert {e.meta["difficulty"] for e in train} == {level}
        assert not {e.prompt for e in train} & {e.prompt for e in task.examples("test")}
        lengths.append(statistics.mean(len(e.solution) for e in train))
    # Harder levels need longer (or equal) worked solutions, so completion length matters.
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    with pytest.raises(ValueError, match="fixed"):
        task.examples("dev", levels[-1])
    with pytest.raises(ValueError):
        task.examples("train", 99)


@pytest.mark.parametrize("name", ["math", "countdown"])
def test_held_out_problems_at_every_level_never_meet_a_train_or_dev_problem(name):
    task = get_task(name, **{**SMALL, "train_size": 60})
    assert task.held_out_at(task.default_difficulty, 5) == task.examples("test")[:5]
    trained = {task.problem_key(e) for lv in task.difficulty_levels
               for e in task.examples("train", lv)}
    dev = {task.problem_key(e) for e in task.examples("dev")}
    for level in task.difficulty_levels:
        if level == task.default_difficulty:
            continue
        held = task.held_out_at(level, 20)
        assert len(held) == 20 and {e.meta["difficulty"] for e in held} == {level}
        assert not {task.problem_key(e) for e in held} & (trained | dev)
    with pytest.raises(ValueError, match="difficulty 99"):
        task.held_out_at(99, 5)


@pytest.mark.parametrize("name", task_names())
def test_embedded_prompts_and_solutions_are_compact(name):
    dev = get_task(name, **SMALL).examples("dev")
    assert max(len(e.prompt) for e in dev) <= 100
    assert max(len(e.solution) for e in dev) <= 48  # fits the default max_completion_length
    assert all(e.prompt.isascii() and e.solution.isascii() for e in dev)


def test_seeded_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMZERO_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks.base, "_CACHE", {})
    first = get_task("countdown", train_size=10, dev_size=10, test_size=10).examples("dev")
    assert list((tmp_path / "tasks").glob("countdown-*.json"))
    monkeypatch.setattr(tasks.base, "_CACHE", {})

    def no_generation(*args, **kwargs):
        raise AssertionError("should have been read from the disk cache")

    monkeypatch.setattr(type(get_task("countdown")), "generate", no_generation)
    again = get_task("countdown", train_size=10, dev_size=10, test_size=10).examples("dev")
    assert [(e.prompt, e.answer, e.solution, e.meta) for e in again] == [
        (e.prompt, e.answer, e.solution, e.meta) for e in first
    ]
    monkeypatch.undo()
    monkeypatch.setenv("LLMZERO_CACHE", "off")
    other = get_task("countdown", seed=1, train_size=10, dev_size=10, test_size=10).examples("dev")
    assert {e.prompt for e in other} != {e.prompt for e in first}


def test_problem_keys_merge_reordered_countdown_numbers_and_renamed_variables():
    countdown, math = get_task("countdown"), get_task("math")
    a = Example("Use 1,2,3 to make 6.\n", "", "", {"numbers": [1, 2, 3], "target": 6})
    b = Example("Use 3,2,1 to make 6.\n", "", "", {"numbers": [3, 2, 1], "target": 6})
    assert countdown.problem_key(a) == countdown.problem_key(b)
    x = Example("Solve 3*x+1=7.\n", "2", "", {"subject": "algebra"})
    y = Example("Solve 3*y+1=7.\n", "2", "", {"subject": "algebra"})
    assert math.problem_key(x) == math.problem_key(y)


def test_get_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown task 'chess'.*'gsm8k', 'math'"):
        get_task("chess")
    with pytest.raises(ValueError, match="scale"):
        get_task("gsm8k", scale="huge")


# ----- the registry -----


class Reverse(tasks.Task):
    """A toy task: reverse a string of digits."""

    name, env_id = "reverse-test", "LLMZero-ReverseTest-v0"
    levels = {"embedded": ((2, 3), 2)}
    completion_lengths = {"embedded": ((8, 16), 8)}
    sizes = {"embedded": {"train": 40, "dev": 8, "test": 8}}

    def generate(self, n, difficulty, seed):
        rng = random.Random(seed)
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(difficulty))
            yield Example(f"Reverse {digits}.\n", digits[::-1], f"#### {digits[::-1]}",
                          {"difficulty": difficulty})

    def extract(self, completion):
        return hash_answer(completion)

    def check(self, answer, example):
        return answer == example.answer


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry (and no subscribers), restored after the test."""
    monkeypatch.setattr(tasks.base, "_REGISTRY", dict(tasks.base._REGISTRY))
    monkeypatch.setattr(tasks.base, "_HOOKS", [])


def test_the_built_in_tasks_are_registered_in_order_with_their_own_data():
    assert task_names() == ("gsm8k", "math", "countdown", "logic")
    assert [c.env_id for c in tasks.registered()] == [
        "LLMZero-GSM8K-v0", "LLMZero-MATH-v0", "LLMZero-Countdown-v0", "LLMZero-Logic-v0"]
    for cls in tasks.registered():
        assert tasks.task_class(cls.name) is cls and type(get_task(cls.name)) is cls
        for scale in tasks.SCALES:  # every built-in task has both scales
            grid, default = cls.completion_lengths[scale]
            assert default in grid and list(grid) == sorted(grid)


def test_a_new_task_is_one_class_and_one_register_call(registry):
    seen = []
    tasks.on_register(lambda cls: seen.append(cls.name))  # told of every task, past and future
    assert seen == ["gsm8k", "math", "countdown", "logic"]
    assert tasks.register(Reverse) is Reverse
    assert seen[-1] == task_names()[-1] == "reverse-test"
    task = get_task("reverse-test")
    dev, train = task.examples("dev"), task.examples("train", 3)
    assert len(dev) == 8 and {len(e.answer) for e in train} == {3}
    assert all(task.score(e.solution, e) == 1.0 for e in dev)
    assert task.score("#### 0", dev[0]) == (0.1 if dev[0].answer != "0" else 1.0)
    assert task.answer_early(dev[0]) is None  # the default: nothing to cut
    with pytest.raises(ValueError, match="'reverse-test' has no paper scale"):
        get_task("reverse-test", "paper")
    tasks.register(Reverse)  # again, as a re-run notebook cell does: replaces, no error
    assert task_names().count("reverse-test") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(env_id=""), "Bad.env_id must be a non-empty string"),
        (dict(completion_lengths={"embedded": ((8, 16), 12)}),
         r"completion_lengths\['embedded'\]: default 12 is not in \(8, 16\)"),
        (dict(levels={"embedded": ((2,), 2), "paper": ((0,), 0)}),
         "completion_lengths must cover the scales"),
        (dict(levels={"huge": ((1,), 1)}), "levels must map some of"),
        (dict(name="gsm8k"), "'gsm8k' is already registered by inner.tasks.gsm8k.GSM8KTask"),
        (dict(env_id="LLMZero-GSM8K-v0"), "is already task 'gsm8k'"),
        (dict(sft_early_fraction=1.5), "sft_early_fraction"),
    ],
)
def test_register_names_what_a_task_class_gets_wrong(registry, change, message):
    before = tasks.registered()
    with pytest.raises(ValueError, match=message):
        tasks.register(type("Bad", (Reverse,), change))
    with pytest.raises(ValueError, match="subclass of inner.tasks.Task"):
        tasks.register(object)
    assert tasks.registered() == before


# ----- split sizes: never smaller than asked -----


def test_a_split_that_cannot_hold_the_asked_size_is_an_error_naming_both_sizes():
    # Two-digit strings: 100 distinct problems in all, 8 of them in dev.
    with pytest.raises(tasks.SplitSizeError) as e:
        Reverse(dev_size=8, test_size=95).examples("test")
    msg = str(e.value)
    assert "task 'reverse-test' (embedded scale, seed 0)" in msg
    held = int(re.search(r"the test split holds (\d+) distinct problems, 95 asked", msg)[1])
    assert 80 <= held <= 92 and f"pass test_size={held} or less" in msg
    with pytest.raises(tasks.SplitSizeError, match=r"the dev split holds \d+ distinct problems, "
                                                   "101 asked"):
        Reverse(dev_size=101).examples("dev")


def test_a_short_draw_is_drawn_again_longer_and_keeps_its_first_problems(monkeypatch):
    # 80 of the 92 problems outside dev need more than the first draw's 136 rows; the longer
    # draw starts with the shorter one, so a split's first problems never change with its size.
    draws, build = [], Reverse._build

    def counted(self, split, difficulty, n=None):
        draws.append((split, n))
        return build(self, split, difficulty, n)

    small = Reverse(test_size=20).examples("test")
    monkeypatch.setattr(Reverse, "_build", counted)
    large = Reverse(test_size=80).examples("test")
    assert len(large) == 80 and len({e.prompt for e in large}) == 80
    assert large[:20] == small
    assert draws == [("dev", 28), ("test", 136), ("test", 272)]  # the spare, then twice that


# ----- checkers -----


def test_gsm8k_answer_extraction():
    assert hash_answer("5+5=10\n#### 10") == "10"
    assert hash_answer("#### 1,000") == "1000" and hash_answer("#### $12.") == "12"
    assert hash_answer("#### 3\n#### 4") == "4"  # the last one counts
    assert hash_answer("#### 9**9") is None and hash_answer("#### ٥") is None
    assert hash_answer("no answer") is None
    assert math_equal("1000", "1000") and math_equal("1000.0", "1000")
    assert not math_equal("999", "1000")


def test_math_answer_extraction_and_equivalence():
    assert boxed_answer("so \\boxed{\\frac{2}{3}} done") == "\\frac{2}{3}"
    assert boxed_answer("\\boxed{1} then \\boxed{2}") == "2"
    assert boxed_answer("\\boxed{unclosed") is None and boxed_answer("\\boxed{}") is None
    assert math_equal("\\frac{2}{3}", "2/3") and math_equal("4/6", "2/3")
    assert math_equal("0.5", "\\frac{1}{2}")
    assert not math_equal("3/2", "2/3")
    assert equation_solution("7*(8*l+5)=315", "l") == (
        "56*l+35=315\n56*l=280\nl=5\n\\boxed{5}",
        "5",
    )
    assert equation_solution("8-o=6", "o") == ("-o=-2\no=2\n\\boxed{2}", "2")
    assert equation_solution("x*x=4", "x") is None  # not linear
    assert linear_form("-(4*t-6)+2*t", "t") == (Fraction(-2), Fraction(6))
    for side in ("x*x", "2x", "x/2", "y+1", "1e3+x", "()", "(x+1", "__import__('os')"):
        assert linear_form(side, "x") is None, side   # non-linear, or not the generator's text


def test_countdown_checker():
    task = get_task("countdown", **SMALL)
    ex = Example("Use 3,5,7 to make 22.\n", "3*5+7", "", {"numbers": [3, 5, 7], "target": 22})
    assert task.score("<answer>3*5+7</answer>", ex) == 1.0
    assert task.score("<answer> 7 + 5 * 3 = 22 </answer>", ex) == 1.0
    assert task.score("<answer>(3*5)+7</answer>", ex) == 1.0
    assert task.score("<answer>3*5-7</answer>", ex) == 0.1  # every number, wrong value
    assert task.score("<answer>(7-3)*5</answer>", ex) == 0.1
    # The format reward needs exactly the given numbers: not a subset, an extra or a repeat.
    assert task.score("<answer>3*5+7+0</answer>", ex) == 0.0  # 0 is not a given number
    assert task.score("<answer>3*5+5+2</answer>", ex) == 0.0  # 5 used twice, 7 never
    assert task.score("<answer>15+7</answer>", ex) == 0.0
    assert task.score("<answer>3*5</answer>", ex) == 0.0
    assert task.score("<answer>3/(5-5)+7</answer>", ex) == 0.0  # division by zero: not valid
    assert task.score("<answer>3 x 5 + 7</answer>", ex) == 0.0
    assert task.score("3*5+7", ex) == 0.0  # no tags
    fractions = Example("", "", "", {"numbers": [8, 3, 3], "target": 8})
    assert task.is_correct("<answer>8/3*3</answer>", fractions)  # exact, not float
    tree = solve([4, 7, 2, 9], 46)
    assert tree is not None and arith.evaluate(tree) == 46
    assert sorted(arith.leaves(tree)) == [2, 4, 7, 9]
    assert solve([1, 1, 1], 100) is None


def test_arith_parser_bounds():
    assert arith.evaluate(arith.parse("2*(3+4)-10/5")) == 12
    assert arith.to_text(arith.parse("(1+2)*(3-(4-5))")) == "(1+2)*(3-(4-5))"
    assert arith.to_text(arith.parse("((1+2))+3")) == "1+2+3"
    for bad in [
        "",
        "-1",
        "1.5",
        "2**3",
        "1+",
        "(1",
        "1)",
        "a",
        "1e5",
        "٣",
        "(" * 13 + "1" + ")" * 13,
    ]:
        assert arith.parse(bad) is None, bad
    assert arith.parse("(" * 12 + "1" + ")" * 12) is not None


def test_logic_checker():
    task = get_task("logic", **SMALL)
    ex = Example("", "A=knight,B=knave", "", {"names": ["A", "B"], "solution": [True, False]})
    assert task.score("<answer>A=knight,B=knave</answer>", ex) == 1.0
    assert task.score("<answer>(1) A is a knight\n(2) B is a knave</answer>", ex) == 1.0
    assert task.score("<answer>B=knave, A=Knight</answer>", ex) == 1.0
    assert task.score("<answer>A=knave,B=knave</answer>", ex) == 0.1
    assert task.score("<answer>A=knight</answer>", ex) == 0.0  # incomplete
    assert task.score("<answer>A=knight,A=knave,B=knave</answer>", ex) == 0.0  # contradictory
    assert task.score("<answer>A=knight,B=knave,C=knight</answer>", ex) == 0.0  # not these people
    assert parse_assignment("(1) Zoey is a knave (2) Oliver is a knight") == {
        "zoey": False,
        "oliver": True,
    }
    assert tagged_answer("<answer>x</answer> <answer>y</answer>") == "y"
