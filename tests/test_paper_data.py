"""Paper-scale loading, exercised for real on small local files in each hub dataset's columns."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import datasets
import pytest
import reasoning_gym

import inner.tasks as tasks
from inner.tasks import SplitSizeError, get_task
from inner.tasks.logic import render
from inner.tasks.sources import DataError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: the hub is switched off for `datasets`."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(tasks.base, "_CACHE", {})


ISLAND = (
    "A very special island is inhabited only by knights and knaves. "
    "Knights always tell the truth, and knaves always lie."
)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def gsm8k_row(i: int) -> dict:
    a, b, c = 3 + i, 4 + i % 5, 2 + i % 3
    steps = [f"He has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples."]
    if i % 2:  # odd rows need three steps (difficulty level 2), even rows one (level 1)
        steps += [f"Then {a + b}*{c} = <<{a + b}*{c}={(a + b) * c}>>{(a + b) * c}."] * 3
    answer = (a + b) * c if i % 2 else a + b
    return {
        "question": f"Tom has {a} apples and buys {b}, question {i}. How many?",
        "answer": "\n".join(steps) + f"\n#### {answer:,}",
    }


def test_gsm8k_local_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(40)])
    write_jsonl(tmp_path / "test.jsonl", [gsm8k_row(i) for i in range(100, 112)])
    task = get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=8)
    assert task.difficulty_levels == (0, 1, 2, 3) and task.default_difficulty == 0
    train, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert len(dev) == 8 and len(test) == 12 and len(train) == 32  # dev is carved from train
    assert not {e.prompt for e in train} & {e.prompt for e in dev}
    ex = test[1]
    assert ex.prompt.startswith("Tom has 104 apples") and ex.prompt.endswith('after "####".')
    assert ex.answer == str((104 + 5) * (2 + 101 % 3)) and "<<" not in ex.solution
    for e in train + dev + test:
        assert task.score(e.solution, e) == 1.0
    assert task.score("so #### 1,000,000", ex) == 0.1
    assert {e.meta["difficulty"] for e in task.examples("train", 2)} == {2}
    assert len(task.examples("train", 1)) + len(task.examples("train", 2)) == len(train)


def test_math_local_files_train_lighteval_test_math500(tmp_path):
    train = [
        {
            "problem": f"What is ${i}/{2 * i + 2}$ in lowest terms? ({i})",
            "level": f"Level {1 + i % 5}",
            "type": "Prealgebra",
            "solution": f"So $\\boxed{{\\frac{{{i}}}{{{2 * i + 2}}}}}$.",
        }
        for i in range(1, 41)
    ]
    test = [
        {
            "problem": f"Compute ${i}^2$.",
            "solution": f"${i}^2 = \\boxed{{{i * i}}}$",
            "answer": str(i * i),
            "subject": "Algebra",
            "level": 1 + i % 5,
            "unique_id": f"test/algebra/{i}.json",
        }
        for i in range(10)
    ]
    datasets.Dataset.from_list(train).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    write_jsonl(tmp_path / "test" / "math500.jsonl", test)
    task = get_task("math", scale="paper", data_path=tmp_path, dev_size=5)
    dev, test_ex = task.examples("dev"), task.examples("test")
    assert len(dev) == 5 and len(test_ex) == 10
    assert test_ex[3].answer == "9" and test_ex[3].prompt.endswith("within \\boxed{}.")
    assert dev[0].answer.startswith("\\frac")
    for e in task.examples("train") + dev + test_ex:
        assert task.score(e.solution, e) == 1.0
    level3 = task.examples("train", 3)
    assert level3 and {e.meta["difficulty"] for e in level3} == {3}
    # math-verify equivalence on a real-format answer.
    frac = next(e for e in task.examples("train") if e.answer == "\\frac{2}{6}")
    assert task.is_correct("\\boxed{1/3}", frac) and not task.is_correct("\\boxed{1/2}", frac)


def test_countdown_single_local_file_carves_dev_and_test(tmp_path):
    rows = []
    for i in range(80):
        nums = [10 + i, 2 + i % 3, 4 + i % 5] + ([i % 9 + 1] if i % 2 else [])  # distinct puzzles
        rows.append({"target": nums[0] * nums[1] + sum(nums[2:]), "nums": nums})
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "countdown.parquet"))
    task = get_task("countdown", scale="paper", data_path=tmp_path / "countdown.parquet")
    assert task.difficulty_levels == (0, 3, 4)
    train, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert len(dev) == len(test) == 20 and len(train) == 40
    prompts = [{e.prompt for e in s} for s in (train, dev, test)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    ex = dev[0]
    assert ex.prompt.startswith(f"Using the numbers {ex.meta['numbers']}, create an equation")
    for e in train + dev + test:
        assert task.score(e.solution, e) == 1.0  # solutions found by the exhaustive solver
        assert e.solution.startswith("<think>") and e.solution.endswith("</answer>")
    assert {len(e.meta["numbers"]) for e in task.examples("train", 4)} == {4}


def test_logic_local_files_in_knights_and_knaves_layout(tmp_path):
    def rows(n_people: int, seed: int, n: int) -> list[dict]:
        out = []
        for item in reasoning_gym.create_dataset(
            "knights_knaves", seed=seed, size=n, n_people=n_people
        ):
            meta = item["metadata"]
            names = [str(x) for x in meta["names"]]
            text = [
                f"({i + 1}) {nm} is a {'knight' if k else 'knave'}"
                for i, (nm, k) in enumerate(zip(names, meta["solution"], strict=True))
            ]
            said = " ".join(
                f'{nm} says: "{render(s, names)}".'
                for nm, s in zip(names, meta["statements"], strict=True)
            )
            out.append(
                {
                    "quiz": f"{ISLAND} You meet {n_people} inhabitants: {', '.join(names)}. "
                    f"{said} So who is a knight and who is a knave?",
                    "names": names,
                    "knight_knave": {"knight": "knight", "knave": "knave"},
                    "solution": [bool(k) for k in meta["solution"]],
                    "solution_text": " and ".join(t[4:] for t in text),
                    "solution_text_format": "\n".join(text),
                    "cot_head": "Let's think step by step, by considering who is lying.",
                    "cot_repeat_steps": [f"Assume {names[0]} is a knight."],
                    "cot_foot": "This leads to a feasible solution.",
                    "statements": str(meta["statements"]),
                    "index": len(out),
                }
            )
        return out

    # reasoning-gym seeds item i with seed + i: far-apart seeds give distinct puzzles.
    write_jsonl(tmp_path / "train" / "people2_num200.jsonl", rows(2, 1000, 12))
    write_jsonl(tmp_path / "train" / "people3_num1000.jsonl", rows(3, 2000, 12))
    write_jsonl(tmp_path / "test" / "people3_num100.jsonl", rows(3, 3000, 6))
    task = get_task("logic", scale="paper", data_path=tmp_path, dev_size=4)
    train, dev, test = (task.examples(s) for s in ("train", "dev", "test"))
    assert len(dev) == 4 and len(test) == 6 and len(train) == 20
    ex = test[0]
    assert "<answer>" in ex.prompt and ex.solution.startswith("<think>\nLet's think")
    people = list(zip(ex.meta["names"], ex.meta["solution"], strict=True))
    assert ex.answer == ",".join(f"{n}={'knight' if k else 'knave'}" for n, k in people)
    for e in train + dev + test:
        assert task.score(e.solution, e) == 1.0
    assert {len(e.meta["names"]) for e in task.examples("train", 2)} == {2}
    flipped = ",".join(f"{n}={'knave' if k else 'knight'}" for n, k in people)
    assert task.score(f"<answer>{flipped}</answer>", ex) == 0.1


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_task("gsm8k", scale="paper", data_path=tmp_path / "nowhere").examples("test")
    with pytest.raises(FileNotFoundError, match="no train data"):
        get_task("gsm8k", scale="paper", data_path=tmp_path).examples("dev")


def test_importing_the_tasks_loads_no_dataset_library():
    code = (
        "import sys, inner.tasks; inner.tasks.get_task('gsm8k', 'paper'); "
        "print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- bad data files: named errors, never a silently empty or smaller split -----------------------


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.jsonl'}: the file is empty"):
        get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=2).examples("dev")


def test_a_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps(gsm8k_row(i)) for i in range(5)]
    lines[2] = lines[2][:-9]  # cut off mid-value
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(10, 30)])
    with pytest.raises(DataError, match=r"test\.jsonl: line 3 is not valid JSON"):
        get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=2).examples("test")


def test_a_row_without_a_field_is_named_by_file_line_and_field(tmp_path):
    rows = [gsm8k_row(i) for i in range(8)]
    del rows[4]["answer"]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "test.jsonl").write_text("\n" + text)  # a blank first line: line 6 is row 5
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(10, 30)])
    task = get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=2)
    with pytest.raises(DataError,
                       match=r"test\.jsonl line 6 \(row 5\): lacks the field 'answer'"):
        task.examples("test")


def test_a_field_of_the_wrong_type_is_named_with_its_value(tmp_path):
    rows = [gsm8k_row(i) for i in range(20)]
    rows[7]["question"] = 1234
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [gsm8k_row(i) for i in range(100, 104)])
    task = get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=2)
    with pytest.raises(DataError, match=r"train\.jsonl line 8 \(row 8\): field 'question': "
                                        r"Input should be a valid string \(got 1234\)"):
        task.examples("train")


def test_a_list_of_the_wrong_length_or_item_type_is_named(tmp_path):
    good = {"quiz": "A says B is a knave.", "names": ["A", "B"], "solution": [True, False]}
    write_jsonl(tmp_path / "test.jsonl", [good, good | {"solution": [True]}])
    task = get_task("logic", scale="paper", data_path=tmp_path, dev_size=1)
    with pytest.raises(DataError, match=r"test\.jsonl line 2 \(row 2\): 'names' has 2 people "
                                        r"but 'solution' 1 roles"):
        list(task.load("test", 0))
    write_jsonl(tmp_path / "test.jsonl", [good | {"solution": [True, "knave"]}])
    with pytest.raises(DataError, match=r"line 1 \(row 1\): field 'solution\.1': "
                                        r"Input should be a valid boolean \(got 'knave'\)"):
        list(task.load("test", 0))


def test_a_carved_row_is_named_by_its_own_file_and_line(tmp_path):
    rows = [{"target": 10 + i, "nums": [i + 1, 2, 8]} for i in range(40)]
    write_jsonl(tmp_path / "train-0.jsonl", rows[:20])
    write_jsonl(tmp_path / "train-1.jsonl", [{"nums": r["nums"]} for r in rows[20:]])
    task = get_task("countdown", scale="paper", data_path=tmp_path, dev_size=10, test_size=10)
    with pytest.raises(DataError) as e:
        task.examples("dev")
    found = re.search(r"train-1\.jsonl line (\d+) \(row \1\): lacks the field 'target'",
                      str(e.value))
    assert found and 1 <= int(found[1]) <= 20


def test_files_of_two_formats_in_one_split_are_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(20)])
    datasets.Dataset.from_list([gsm8k_row(30)]).to_parquet(str(tmp_path / "train-1.parquet"))
    with pytest.raises(DataError, match=r"mixed file formats for split train: .*train-1\.parquet"):
        get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=2).examples("dev")


def test_a_file_too_short_to_carve_dev_from_is_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(0)])
    with pytest.raises(DataError, match=r"train\.jsonl: 1 train rows, too few to carve a dev"):
        get_task("gsm8k", scale="paper", data_path=tmp_path).examples("dev")


def test_a_split_with_fewer_items_than_asked_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_row(i) for i in range(40)])
    write_jsonl(tmp_path / "test.jsonl", [gsm8k_row(i) for i in range(100, 103)])
    with pytest.raises(SplitSizeError, match=rf"data_path={tmp_path}\): the test split holds 3 "
                                             r"distinct problems, 5 asked"):
        get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=8,
                 test_size=5).examples("test")
    # The paper scale's default dev size (200) caps the 10 rows carved from 40: asking the
    # split for more items than it holds is the error.
    task = get_task("gsm8k", scale="paper", data_path=tmp_path)
    assert len(task.examples("dev")) == 10
    with pytest.raises(SplitSizeError, match=r"the dev split holds 10 distinct problems, "
                                             r"12 asked; pass dev_size=10 or less"):
        get_task("gsm8k", scale="paper", data_path=tmp_path, dev_size=12).examples("dev")
