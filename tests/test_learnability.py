"""The learnability benchmark's command line: schedule overrides and the table it writes."""

from __future__ import annotations

import pytest

from benchmarks.learnability import markdown, parse_override


def test_overrides_parse_numbers_and_strings_and_reject_malformed_items():
    assert parse_override("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert parse_override("num_generations=16") == ("num_generations", 16)
    assert parse_override("loss_type=dapo") == ("loss_type", "dapo")
    for bad in ("temperature", "=0.7"):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            parse_override(bad)


def test_table_has_a_row_per_task_and_seed_and_marks_a_skipped_control():
    row = {"task": "gsm8k", "base_dev": 0.4, "base_test": 0.42, "dev": 0.45, "test": 0.46,
           "shuffled_test": 0.37, "stage_s_median": 4.7, "stage_s_max": 5.0, "wall_s": 44.0}
    table = markdown([row | {"seed": 0}, row | {"seed": 1, "shuffled_test": None}])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| gsm8k | 0 |") and "| +0.040 | 0.370 |" in lines[2]
    assert lines[3].startswith("| gsm8k | 1 |") and "| +0.040 | - |" in lines[3]
