"""Logic: knights and knaves. Knights always tell the truth, knaves always lie; who is which?

The answer names every person's role inside <answer>...</answer>, as "A=knight,B=knave" or as
"(1) Zoey is a knight (2) Oliver is a knave" (the K&K / Logic-RL format); both parse into the
same assignment, which must equal the unique solution exactly.

Embedded scale: reasoning-gym's `knights_knaves`; the prompt is rebuilt from the item's
statement trees with letter names and compact statements ("A: B knave; B: if A knight then C
knave"), a few tens of characters instead of several hundred. The solution is the answer alone:
the reasoning is the sequential choice of each role. Difficulty levels: 1, 2 (default), 3 =
2, 3, 4 people. Paper scale: K-and-K/knights-and-knaves (train/test jsonl files, 2-8 people);
dev is carved from train; levels 0 = all, 2-8 = that many people.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pydantic

from inner.tasks import sources
from inner.tasks.answers import tagged_answer
from inner.tasks.base import Example, Task, register

PEOPLE = {1: 2, 2: 3, 3: 4}
NAMES = "ABCDEFGH"
HUB = {
    "train": sources.HubSplit("K-and-K/knights-and-knaves", data_files="train/*.jsonl"),
    "test": sources.HubSplit("K-and-K/knights-and-knaves", data_files="test/*.jsonl"),
}


class Row(sources.Schema):
    """A row of K-and-K/knights-and-knaves: the quiz, its people and their roles (True for a
    knight), and the optional chain of thought."""

    quiz: str
    names: list[str]
    solution: list[bool]
    cot_head: str | None = None
    cot_repeat_steps: list[str] | None = None
    cot_foot: str | None = None

    @pydantic.model_validator(mode="after")
    def _one_role_per_name(self) -> Row:
        if len(self.names) != len(self.solution):
            raise ValueError(f"'names' has {len(self.names)} people but 'solution' "
                             f"{len(self.solution)} roles")
        return self


INSTRUCTION = (
    "Think step by step, then give the identity of every person inside <answer> </answer> "
    "tags, one per line, for example <answer>(1) Zoey is a knight\n(2) Oliver is a knave</answer>."
)


def render(statement: tuple, names: str) -> str:
    """A reasoning-gym statement tree as compact text: "A knight", "not(...)", "if .. then ..."."""
    kind, args = statement[0], statement[1:]
    if kind == "telling-truth":
        return f"{names[args[0]]} knight"
    if kind == "lying":
        return f"{names[args[0]]} knave"

    def sub(s: tuple) -> str:
        text = render(s, names)
        return text if s[0] in ("telling-truth", "lying") else f"({text})"

    if kind == "not":
        inner = args[0]
        if inner[0] in ("telling-truth", "lying"):  # "not A knight" is simply "A knave"
            role = "knave" if inner[0] == "telling-truth" else "knight"
            return f"{names[inner[1]]} {role}"
        return f"not {sub(inner)}"
    if kind in ("and", "or"):
        return f" {kind} ".join(sub(s) for s in args)
    if kind == "->":
        return f"if {sub(args[0])} then {sub(args[1])}"
    if kind == "<=>":
        return f"{sub(args[0])} iff {sub(args[1])}"
    raise ValueError(f"unknown statement {kind!r}")


def canonical(names: list[str], knights: list[bool]) -> str:
    """The canonical answer: "A=knight,B=knave"."""
    roles = ("knight" if k else "knave" for k in knights)
    return ",".join(f"{n}={r}" for n, r in zip(names, roles, strict=True))


def parse_assignment(text: str, terms: tuple[str, str] = ("knight", "knave")) -> dict[str, bool]:
    """Name -> is-knight from "A=knight, B is a knave, (3) Cy is a knight"; {} if contradictory."""
    knight, knave = (re.escape(t) for t in terms)
    pattern = rf"([A-Za-z][A-Za-z'-]*)\s*(?:=|:|\bis\b)\s*(?:an?\s+)?({knight}|{knave})\b"
    found: dict[str, bool] = {}
    for name, role in re.findall(pattern, text, flags=re.IGNORECASE):
        is_knight = role.lower() == terms[0].lower()
        if found.setdefault(name.lower(), is_knight) != is_knight:
            return {}
    return found


class LogicTask(Task):
    name = "logic"
    env_id = "LLMZero-Logic-v0"
    levels = {"embedded": ((1, 2, 3), 2), "paper": ((0, 2, 3, 4, 5, 6, 7, 8), 0)}
    # Embedded worked solutions: p95 44 tokens at the default level, 53 at the hardest.
    completion_lengths = {"embedded": ((32, 48, 64), 48), "paper": ((256, 512, 1024), 512)}
    sft_early_fraction = 0.5

    def generate(self, n: int, difficulty: int, seed: int) -> Iterable[Example]:
        import reasoning_gym  # embedded scale only, and slow to import

        people = PEOPLE[difficulty]
        data = reasoning_gym.create_dataset("knights_knaves", seed=seed, size=n, n_people=people)
        names = list(NAMES[:people])
        for item in data:
            statements = item["metadata"]["statements"]
            knights = [bool(k) for k in item["metadata"]["solution"]]
            said = "; ".join(f"{names[i]}: {render(s, NAMES)}" for i, s in enumerate(statements))
            answer = canonical(names, knights)
            yield Example(
                prompt=f"{said}\n",
                answer=answer,
                solution=f"<answer>{answer}</answer>",
                meta={"difficulty": difficulty, "names": names, "solution": knights},
            )

    def load(self, split: str, difficulty: int) -> Iterable[Example]:
        for row in sources.rows(split, self.data_path, HUB, self.seed, Row):
            names, knights = list(row["names"]), [bool(k) for k in row["solution"]]
            if split == "train" and difficulty not in (0, len(names)):
                continue
            lines = [
                f"({i + 1}) {n} is a {'knight' if k else 'knave'}"
                for i, (n, k) in enumerate(zip(names, knights, strict=True))
            ]
            steps = [row.get("cot_head"), *(row.get("cot_repeat_steps") or []), row.get("cot_foot")]
            think = " ".join(s for s in steps if s)
            answer = "\n".join(lines)
            yield Example(
                prompt=f"{row['quiz'].strip()}\n{INSTRUCTION}",
                answer=canonical(names, knights),
                solution=(f"<think>\n{think}\n</think>\n" if think else "")
                + f"<answer>\n{answer}\n</answer>",
                meta={"difficulty": len(names), "names": names, "solution": knights},
            )

    def extract(self, completion: str) -> str | None:
        return tagged_answer(completion)

    def check(self, answer: str, example: Example) -> bool:
        names, knights = example.meta["names"], example.meta["solution"]
        expected = {n.lower(): k for n, k in zip(names, knights, strict=True)}
        return parse_assignment(answer) == expected

    def well_formatted(self, answer: str, example: Example) -> bool:
        found = parse_assignment(answer)
        return set(found) == {n.lower() for n in example.meta["names"]}

    def answer_early(self, example: Example) -> str | None:
        # Every person but the last: an incomplete assignment.
        answer_line = example.solution.split("\n")[-1]
        people = example.answer.split(",")
        if example.answer not in answer_line or len(people) < 2:
            return None
        return answer_line.replace(example.answer, ",".join(people[:-1]))


register(LogicTask)
