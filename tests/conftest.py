"""Shared tiny fixtures: a 2-digit addition task following the Task protocol, a tiny GPT-2, and
a tiny Qwen3 model directory built once per session (the paper-scale model path)."""

from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field

import pytest
import torch

from inner.models import load_model, tiny_gpt2
from inner.tiny_qwen3 import build_tiny_qwen3
from inner.tokenizer import build_char_tokenizer

torch.set_num_threads(2)  # the CI machine has 2 cores shared by everything


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    solution: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


class AdditionTask:
    """`12+34=` -> `46`: reward 1 for the right number, 0.1 for any number; exact-match accuracy."""

    name = "addition"
    scale = "embedded"
    difficulty_levels = (1, 2)  # number of digits per operand
    default_difficulty = 2

    def __init__(self, n_train: int = 2000, n_dev: int = 100, n_test: int = 100, seed: int = 0):
        self.sizes = {"train": n_train, "dev": n_dev, "test": n_test}
        self.seed = seed
        self._cache: dict = {}

    def examples(self, split: str, difficulty: int | None = None) -> list[Example]:
        level = self.default_difficulty if split != "train" or difficulty is None else difficulty
        key = (split, level)
        if key not in self._cache:
            # All splits come from one seeded pool of distinct pairs, so they never overlap.
            top = 10**level
            pairs = [(a, b) for a in range(top) for b in range(top)]
            random.Random(self.seed * 1000 + level).shuffle(pairs)
            bounds = {"dev": (0, self.sizes["dev"])}
            bounds["test"] = (bounds["dev"][1], bounds["dev"][1] + self.sizes["test"])
            bounds["train"] = (bounds["test"][1], bounds["test"][1] + self.sizes["train"])
            lo, hi = bounds[split]
            self._cache[key] = [
                Example(f"{a}+{b}=", str(a + b), str(a + b), {"a": a, "b": b, "difficulty": level})
                for a, b in pairs[lo:hi]
            ]
        return self._cache[key]

    @staticmethod
    def _number(completion: str) -> str | None:
        match = re.match(r"\s*(-?\d+)", completion)
        return match.group(1) if match else None

    def score(self, completion: str, example: Example) -> float:
        number = self._number(completion)
        if number is None:
            return 0.0
        return 1.0 if number == example.answer else 0.1

    def is_correct(self, completion: str, example: Example) -> bool:
        return self._number(completion) == example.answer


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on `n` torch threads, then restore the previous number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def task():
    return AdditionTask()


@pytest.fixture
def task_factory():
    """AdditionTask itself, for tests that need other split sizes."""
    return AdditionTask


@pytest.fixture
def tiny_model(tokenizer):
    """A ~50k-parameter GPT-2: enough to exercise every code path in milliseconds."""
    return tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> str:
    """A ~130k-parameter Qwen3 with its BPE tokenizer and chat template, warm-started on GSM8K:
    it writes "#### n" answers often enough that GRPO rewards are not all zero."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    with torch_threads(1):
        return str(build_tiny_qwen3(path, sft_steps=100, sft_tasks=("gsm8k",)))


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: ops this small gain nothing from a second, and
    on the busy shared machine two ran the tiny Qwen3's env steps ~20x slower (measured)."""
    with torch_threads(1):
        yield


@pytest.fixture(params=["gpt2", "qwen3"])
def causal_lm(request, tokenizer, tiny_model):
    """(model, tokenizer) of each architecture the sampler and the loss must handle."""
    if request.param == "gpt2":
        return tiny_model, tokenizer
    return load_model(request.getfixturevalue("tiny_qwen3_dir"))
