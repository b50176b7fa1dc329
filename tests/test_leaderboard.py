"""The leaderboard harness: statistics, HDF5 run log, kill -9 resume, names, Ray executor."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from benchmarks.leaderboard import report, runlog, stats
from benchmarks.leaderboard.executors import RAY_MISSING, RunSpec, make_executor
from benchmarks.leaderboard.harness import current_runs, fingerprint, is_current, main
from benchmarks.leaderboard.runlog import RunRecord, StageRecord

ROOT = Path(__file__).resolve().parents[1]
# The tiniest real configuration: one-stage episodes of one step, 2 prompts x 2 completions of at
# most 8 tokens, 4 dev/test examples. The harness is under test here, not the learning.
TINY_ENV = {"eval_max_new_tokens": 8, "fixed_hparams": {"prompts_per_step": 2},
            "hparam_grid": {"learning_rate": [1e-4, 1e-3], "num_generations": [2],
                            "temperature": [1.0], "max_completion_length": [4, 8],
                            "beta": [0.0, 0.04]}}
TINY = ["--tasks", "countdown", "--controllers", "fixed", "grid", "--budget", "2", "--stages", "1",
        "--steps-per-stage", "1", "--dev-size", "4", "--test-size", "4", "--threads", "1",
        "--env-kwargs", json.dumps(TINY_ENV)]


# ---- statistics on hand-made data ----------------------------------------------------------------


def _binomial_quantile(n: int, p: float, q: float) -> float:
    """Smallest k/n with P(Binomial(n, p) <= k) >= q, from the exact pmf."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k / n
    return 1.0


def test_bootstrap_ci_matches_the_exact_binomial_quantiles():
    # The bootstrap mean of 0/1 data is Binomial(n, p)/n exactly, so its 2.5% and 97.5% quantiles
    # are known in closed form. n=7, p=3/7 keeps both quantiles away from a CDF jump.
    values = [0, 0, 0, 0, 1, 1, 1]
    mean, lo, hi = stats.bootstrap_ci(values, n_boot=40_000, seed=1)
    assert mean == pytest.approx(3 / 7)
    assert lo == pytest.approx(_binomial_quantile(7, 3 / 7, 0.025))
    assert hi == pytest.approx(_binomial_quantile(7, 3 / 7, 0.975))
    assert lo < mean < hi


def test_bootstrap_ci_degenerate_cases_and_determinism():
    assert stats.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    assert stats.bootstrap_ci([0.25]) == pytest.approx((0.25, 0.25, 0.25))
    assert all(math.isnan(x) for x in stats.bootstrap_ci([]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    # Normal data: the percentile CI is close to mean +- 1.96 s/sqrt(n) (within bootstrap noise).
    x = rng.normal(loc=2.0, scale=1.0, size=400)
    mean, lo, hi = stats.bootstrap_ci(x)
    half = 1.96 * x.std() / math.sqrt(x.size)
    assert lo == pytest.approx(mean - half, abs=0.1 * half)
    assert hi == pytest.approx(mean + half, abs=0.1 * half)


def test_summary_relative_improvements_follow_their_definitions():
    def rec(ctrl, seed, test):
        return RunRecord(task="t", controller=ctrl, seed=seed, test_score=test, dev_score=test,
                         base_dev_score=0.2, budget=4, stages_spent=4)

    records = [rec("base", 0, 0.2), rec("grid", 0, 0.3), rec("grid", 1, 0.5),
               rec("tpe", 0, 0.45), rec("tpe", 1, 0.35)]
    rows = {r["controller"]: r for r in report.summarize(records, order=["tpe", "grid"])}
    assert list(rows) == ["base", "tpe", "grid"]
    assert rows["grid"]["test_mean"] == pytest.approx(0.4)
    assert rows["tpe"]["rel_vs_base"] == pytest.approx((0.4 - 0.2) / 0.2)
    assert rows["tpe"]["rel_vs_grid"] == pytest.approx(0.0)
    assert rows["base"]["rel_vs_grid"] == pytest.approx((0.2 - 0.4) / 0.4)
    assert rows["tpe"]["test_ci_low"] <= 0.4 <= rows["tpe"]["test_ci_high"]


def test_meta_training_cost_gets_its_own_column_only_when_paid():
    def rec(ctrl, cost):
        return RunRecord(task="t", controller=ctrl, seed=0, test_score=0.3, dev_score=0.3,
                         base_dev_score=0.2, budget=4, stages_spent=4, extra={"cost": cost})

    plain = [rec("base", {}), rec("grid", {"stages": 4})]
    assert "meta-train" not in report.markdown(report.summarize(plain))
    sb3 = rec("sb3", {"stages": 4, "meta_train_seconds": 556.2, "meta_train_real_stages": 24})
    rows = report.summarize([*plain, sb3])
    assert [r["meta_train_seconds"] for r in rows][2] == pytest.approx(556.2)
    table = report.markdown(rows)
    assert "meta-train s (real stages)" in table
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
             if line.startswith(("| base", "| grid", "| sb3"))]
    ends = {row[0]: row[-1] for row in cells}
    assert ends == {"base": "—", "grid": "—", "sb3": "556 (24)"}


def test_llm_rows_show_their_fallback_share_and_other_rows_do_not():
    def rec(ctrl, seed, cost):
        return RunRecord(task="t", controller=ctrl, seed=seed, test_score=0.3, dev_score=0.3,
                         base_dev_score=0.2, budget=4, stages_spent=4, extra={"cost": cost})

    plain = [rec("base", 0, {}), rec("llmzero", 0, {"stages": 4})]
    assert "LLM fallbacks" not in report.markdown(report.summarize(plain))
    llm = [rec("llmzero-llm", s, {"llm_expansions": 4, "llm_fallbacks": f})
           for s, f in ((0, 1), (1, 0))]
    table = report.markdown(report.summarize([*plain, *llm]))
    header = next(line for line in table.splitlines() if line.startswith("| controller | test"))
    column = [c.strip() for c in header.split("|")].index("LLM fallbacks")
    width = header.count("|")  # the per-task table's rows, not the overview's
    cells = {line.split("|")[1].strip(): line.split("|")[column].strip()
             for line in table.splitlines()
             if line.startswith(("| llmzero", "| base")) and line.count("|") == width}
    assert cells == {"base": "n/a", "llmzero": "n/a", "llmzero-llm": "12%"}  # (1/4 + 0/4) / 2


def test_overview_has_a_row_per_controller_and_a_column_per_task():
    def rec(task, ctrl, score):
        return RunRecord(task=task, controller=ctrl, seed=0, test_score=score, dev_score=score,
                         base_dev_score=0.2, budget=4, stages_spent=4 if ctrl != "base" else 0)

    records = [rec("a", "base", 0.2), rec("a", "grid", 0.3), rec("b", "base", 0.5),
               rec("b", "grid", 0.25)]
    lines = report.overview(report.summarize(records))
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells[0] == ["controller", "a", "b", "stages", "seconds"]
    assert cells[2] == ["base", "0.200", "0.500", "0.0", "0"]
    assert cells[3][:4] == ["grid", "0.300 (+50.0%)", "0.250 (-50.0%)", "4.0"]
    assert "\n".join(lines) in report.markdown(report.summarize(records))


def test_head_tables_give_cis_over_seeds_and_paired_verdicts_per_task():
    def rec(task, ctrl, seed, score):
        return RunRecord(task=task, controller=ctrl, seed=seed, test_score=score,
                         dev_score=score, base_dev_score=0.2, budget=4,
                         stages_spent=0 if ctrl == "base" else 4)

    records = [rec(t, "base", 0, 0.2) for t in ("a", "b")]
    for s in range(5):
        records += [rec("a", "grid", s, 0.30 + 0.01 * s), rec("a", "llmzero", s, 0.40 + 0.01 * s),
                    rec("b", "grid", s, 0.50 + 0.01 * s), rec("b", "llmzero", s, 0.45 + 0.01 * s)]
    table = report.markdown(report.summarize(records))
    head = [line for line in table.split("\n\n") if line.startswith("| controller | a | b |")]
    scores, vs_grid = ([[c.strip() for c in line.split("|")[1:-1]] for line in h.splitlines()]
                       for h in head[:2])
    llm = next(r for r in scores if r[0] == "llmzero")
    assert llm[1].startswith("0.420 [") and llm[2].startswith("0.470 [")  # mean [CI over seeds]
    llm = next(r for r in vs_grid if r[0] == "llmzero")
    assert llm[1].startswith("+0.100 [") and llm[1].endswith("better")
    assert llm[2].startswith("-0.050 [") and llm[2].endswith("worse")
    assert next(r for r in vs_grid if r[0] == "grid")[1:] == ["—", "—"]
    assert not any(r[0] == "base" for r in vs_grid)


# ---- the HDF5 run log ----------------------------------------------------------------------------


def _record(controller: str = "tpe", seed: int = 0) -> RunRecord:
    stages = [StageRecord(episode=0, stage=i, hparams={"learning_rate": lr, "loss_type": "grpo",
                                                       "epsilon_high": None},
                          dev_score=0.1 * i, reward=0.1, pathologies=["plateau"] if i else [],
                          metrics=[{"reward": 0.5 + j, "clip_ratio/low_mean": 0.0}
                                   for j in range(2)],
                          seconds=1.5, tokens=100.0)
              for i, lr in enumerate([1e-4, 3e-5])]
    return RunRecord(task="countdown", controller=controller, seed=seed, test_score=0.25,
                     dev_score=0.1, base_dev_score=0.0, budget=2, stages_spent=2, tokens=200.0,
                     seconds=3.0, wall_s=4.0, started_at=1.0, finished_at=5.0,
                     schedule=[{"learning_rate": 1e-4}, {"learning_rate": 3e-5}], stages=stages,
                     anytime=[(0, 0.0), (1, 0.0), (2, 0.1)], settings={"fingerprint": "x"},
                     extra={"llm_tokens": 0})


def test_runlog_round_trip_and_resume_listing(tmp_path):
    a, b = _record("tpe", 0), _record("grid", 1)
    runlog.save_run(tmp_path, a)
    runlog.save_run(tmp_path, b)
    (tmp_path / "runs" / "x.h5.123.tmp").write_bytes(b"half a file")  # a killed writer's leftover
    loaded = runlog.load_runs(tmp_path)
    assert set(loaded) == {a.key, b.key}
    assert runlog.remove_temp_files(tmp_path) == 1
    assert not list((tmp_path / "runs").glob("*.tmp"))
    got = loaded[a.key]
    hp = dict(got.stages[1].hparams)
    assert math.isnan(hp.pop("epsilon_high"))  # None is stored as NaN in a numeric column
    assert hp == {"learning_rate": 3e-5, "loss_type": "grpo"}
    assert got.stages[1].metrics == a.stages[1].metrics  # "/" in metric names survives
    assert got.stages[1].pathologies == ["plateau"] and got.stages[0].pathologies == []
    assert got.schedule == a.schedule and got.anytime == a.anytime
    assert (got.test_score, got.settings, got.finished_at) == (0.25, {"fingerprint": "x"}, 5.0)

    path = runlog.write_combined(tmp_path, list(loaded.values()))
    assert {r.key for r in runlog.read_combined(path)} == {a.key, b.key}


def test_per_item_test_correctness_round_trips_and_is_empty_in_old_logs(tmp_path):
    rec = _record("grid", 3)
    rec.test_correct = [True, False, False, True, True]
    path = runlog.save_run(tmp_path, rec)
    with h5py.File(path, "r") as f:
        assert f["test_correct"].dtype == np.uint8
        assert f["test_correct"][()].tolist() == [1, 0, 0, 1, 1]
    got = runlog.load_runs(tmp_path)[rec.key]
    assert got.test_correct == [True, False, False, True, True]
    combined = runlog.write_combined(tmp_path, [rec])
    assert runlog.read_combined(combined)[0].test_correct == rec.test_correct
    with h5py.File(path, "a") as f:
        del f["test_correct"]  # as a log written before per-item correctness was stored
    assert runlog.load_runs(tmp_path)[rec.key].test_correct == []


def test_combined_file_survives_a_writer_that_dies_midway(tmp_path):
    path = runlog.write_combined(tmp_path, [_record("tpe")])

    class Killed(Exception):
        pass

    def dying_fill(f):
        f.create_group("countdown/partial")
        raise Killed  # stands in for a kill while the new file is being written

    with pytest.raises(Killed):
        runlog._atomic_h5(path, dying_fill)
    assert [r.key for r in runlog.read_combined(path)] == [("countdown", "tpe", 0)]
    assert not list(tmp_path.glob("*.tmp"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # as a full disk or a broken copy leaves it


def test_an_unreadable_run_log_is_named_and_set_aside_for_its_run_to_run_again(tmp_path):
    a, b = _record("tpe", 0), _record("grid", 1)
    runlog.save_run(tmp_path, a)
    bad = runlog.save_run(tmp_path, b)
    _truncate(bad)
    with pytest.raises(runlog.UnreadableRunLog, match=rf"run log {bad} cannot be read"):
        runlog.load_runs(tmp_path)  # the read-only reader names the file and moves nothing
    assert bad.exists()
    done, notes = runlog.recover_runs(tmp_path)
    assert set(done) == {a.key}
    assert notes == [notes[0]] and str(bad) in notes[0]
    assert "moved to countdown__grid__seed1.h5.corrupt-1, and the run runs again" in notes[0]
    assert (tmp_path / "runs" / "countdown__grid__seed1.h5.corrupt-1").exists()
    _truncate(runlog.save_run(tmp_path, b))  # broken again: a second name, the first kept
    assert "corrupt-2" in runlog.recover_runs(tmp_path)[1][0]


def test_an_unreadable_combined_log_is_named_and_set_aside(tmp_path):
    path = runlog.write_combined(tmp_path, [_record("tpe")])
    assert runlog.recover_combined(tmp_path) is None  # readable: left alone
    _truncate(path)
    with pytest.raises(runlog.UnreadableRunLog, match=rf"{path} cannot be read"):
        runlog.read_combined(path)
    with pytest.MonkeyPatch.context() as mp:  # the report command names it and the way out
        mp.setattr(sys, "argv", ["report", str(tmp_path)])
        with pytest.raises(SystemExit, match=rf"{path} cannot be read .*Rerun the leaderboard "
                                             r"command that made it: it rebuilds leaderboard\.h5"):
            report.main()
    note = runlog.recover_combined(tmp_path)
    assert note is not None and "moved to leaderboard.h5.corrupt-1" in note
    assert not path.exists() and (tmp_path / "leaderboard.h5.corrupt-1").exists()


def test_the_harness_reruns_a_run_whose_log_is_broken_and_rebuilds_the_combined_log(
        tmp_path, capsys):
    out = tmp_path / "results"
    argv = [*TINY[:3], "fixed", *TINY[5:], "--out", str(out), "--no-report"]
    assert main(argv) == 0
    fixed, base = (out / "runs" / f"countdown__{c}__seed0.h5" for c in ("fixed", "base"))
    base_stamp = base.stat().st_mtime_ns
    _truncate(fixed)
    (out / "leaderboard.h5").write_bytes(b"not an HDF5 file")
    capsys.readouterr()
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"run log {fixed} cannot be read" in printed
    assert "moved to countdown__fixed__seed0.h5.corrupt-1, and the run runs again" in printed
    assert "1 of 2 runs already finished; 1 to run" in printed
    assert "moved to leaderboard.h5.corrupt-1, and rebuilt from the run files" in printed
    assert base.stat().st_mtime_ns == base_stamp  # the readable run was kept
    assert runlog.read_run_file(fixed).stages_spent >= 1  # the broken one ran again
    records = runlog.read_combined(out / "leaderboard.h5")
    assert {r.key for r in records} == {("countdown", "base", 0), ("countdown", "fixed", 0)}


def test_a_clone_without_run_files_goes_on_from_the_committed_combined_log(tmp_path, capsys):
    # git keeps leaderboard.h5, not runs/: a fresh clone must not start a long run again ...
    out = tmp_path / "results"
    argv = ["--preset", "standard", *TINY[:3], "fixed",
            *TINY[5:], "--seeds", "0", "--out", str(out), "--no-report"]
    assert main(argv) == 0
    before = {r.key: r for r in runlog.read_combined(out / "leaderboard.h5")}
    shutil.rmtree(out / "runs")
    capsys.readouterr()
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "2 finished run(s) restored from" in printed
    assert "2 of 2 runs already finished; 0 to run" in printed
    restored = runlog.load_runs(out)
    assert set(restored) == set(before)
    for key, rec in before.items():  # the record itself, not a re-run
        assert restored[key].finished_at == rec.finished_at
        assert restored[key].test_score == rec.test_score


def test_a_smoke_run_in_a_clone_trains_again(tmp_path, capsys):
    # ... but the quick preset is the install check: it trains what a clone holds.
    out = tmp_path / "results"
    argv = [*TINY[:3], "fixed", *TINY[5:], "--out", str(out), "--no-report"]
    assert main(argv) == 0
    shutil.rmtree(out / "runs")
    capsys.readouterr()
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "restored" not in printed and "0 of 2 runs already finished; 2 to run" in printed


def test_a_run_made_with_other_settings_is_in_no_combined_log_until_it_runs_again():
    spec = RunSpec("countdown", "tpe", 0, 2, "LLMZero-Countdown-v0", {"stages": 1})
    old, now = _record("tpe", 0), _record("tpe", 0)
    old.settings = {"fingerprint": fingerprint(replace(spec, budget=3))}  # an older protocol's
    now.settings = {"fingerprint": fingerprint(spec)}
    assert not is_current(spec, {old.key: old}) and current_runs([spec], {old.key: old}) == []
    assert is_current(spec, {now.key: now}) and current_runs([spec], {now.key: now}) == [now]


def test_the_stage_cache_of_a_finished_seed_is_dropped(tmp_path):
    out = tmp_path / "results"
    argv = [*TINY[:5], "--seeds", "0", "1", *TINY[5:], "--out", str(out), "--no-report"]
    assert main(argv) == 0
    records = runlog.load_runs(out)
    written = sum(r.extra.get("stage_cache", {}).get("misses", 0) for r in records.values())
    assert written > 0  # the runs wrote entries
    assert (out / "stage_cache").is_dir()
    assert not list((out / "stage_cache").rglob("result.json"))  # and dropped with their seeds


# ---- the command line ----------------------------------------------------------------------------


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--tasks", "gsm8k", "chess", "--out", str(tmp_path)])
    msg = str(e.value)
    assert "chess" in msg and all(t in msg for t in ("gsm8k", "math", "countdown", "logic"))
    with pytest.raises(SystemExit) as e:
        main(["--controllers", "fixed,alphazero", "--out", str(tmp_path)])
    msg = str(e.value)
    assert "alphazero" in msg
    assert all(c in msg for c in ("fixed", "progressive", "grid", "random", "tpe", "pbt"))
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "argument --budget: must be >= 1, got 0"),
    (["--seeds", "0", "-1"], "argument --seeds: must be >= 0, got -1"),
    (["--dev-size", "0"], "argument --dev-size: must be >= 1, got 0"),
    (["--test-size", "ten"], "argument --test-size: expected an integer >= 1, got 'ten'"),
    (["--env-kwargs", "[1, 2]"], "argument --env-kwargs: expected a JSON object"),
    (["--controller-kwargs", '{"grid": {"n_pointz": 3}}'],
     "argument --controller-kwargs: grid takes no 'n_pointz'; it takes name, storage, "
     "study_name, stages, order"),
    (["--controller-kwargs", '{"llmzero": {"kk": 3}}'],
     "argument --controller-kwargs: llmzero: unknown setting(s) ['kk'] for llmzero with "
     "proposer 'skills'; the search takes ['c_uct', 'k',"),
    (["--controller-kwargs", '{"fixed": 5}'],
     "argument --controller-kwargs: fixed's settings must be a JSON object, got 5"),
])
def test_bad_arguments_are_argparse_errors_before_any_run(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--tasks", "countdown", *args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2  # argparse's usage error
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()  # nothing ran, not even the base model


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        with pytest.raises(SystemExit) as e:
            main(["--tasks", "countdown", "--out", str(out)])
        assert e.value.code == 2
        assert f"argument --out: {tmp_path / 'taken'} is a file" in capsys.readouterr().err


def test_a_bad_env_setting_stops_the_harness_before_the_base_run(tmp_path):
    with pytest.raises(SystemExit, match=r"the env of countdown cannot be built with these "
                                         r"settings: .*'bogus'"):
        main(["--tasks", "countdown", "--env-kwargs", '{"bogus": 1}', "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_an_llm_endpoint_adds_the_llm_proposer_row_without_its_key(monkeypatch, tmp_path):
    from benchmarks.leaderboard.harness import (
        LLM_ROW,
        build_specs,
        fingerprint,
        parse_args,
        resolve,
    )

    monkeypatch.setenv("LLMZERO_API_KEY", "sk-secret-0123456789abcdef")
    argv = ["--tasks", "logic", "--out", str(tmp_path)]
    assert LLM_ROW not in resolve(parse_args(argv)).controllers  # no endpoint, no row
    monkeypatch.setenv("LLMZERO_BASE_URL", "http://127.0.0.1:9/v1")
    a = parse_args([*argv, "--llm-model", "local-model"])
    preset = resolve(a)
    assert preset.controllers[-1] == LLM_ROW and "llmzero" in preset.controllers
    spec = next(s for s in build_specs(preset, a) if s.controller == LLM_ROW)
    assert spec.make_name == "llmzero"
    assert spec.make_kwargs["proposer"] == "llm"
    assert spec.make_kwargs["base_url"] == "http://127.0.0.1:9/v1"
    assert spec.make_kwargs["model"] == "local-model"
    assert Path(spec.make_kwargs["run_dir"]).parent == tmp_path / "llm"  # transcripts kept
    assert "secret" not in repr(spec) and "secret" not in fingerprint(spec)


def test_a_second_leaderboard_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    held = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running leaderboard holds it
        with pytest.raises(SystemExit, match="another leaderboard is writing"):
            main(["--tasks", "countdown", "--controllers", "fixed", "--out", str(tmp_path)])
    finally:
        os.close(held)


def _run_files(out: Path) -> dict[str, tuple[int, float]]:
    """Each run file -> (mtime_ns, finished_at written inside it)."""
    out_files = {}
    for p in sorted((out / "runs").glob("*.h5")):
        with h5py.File(p, "r") as f:
            out_files[p.name] = (p.stat().st_mtime_ns, float(f.attrs["finished_at"]))
    return out_files


def test_end_to_end_killed_with_sigkill_then_resumed(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.leaderboard", *TINY, "--out", str(out)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while (not list((out / "runs").glob("*.h5")) and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()  # still running: the kill lands mid-way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _run_files(out)
    assert 1 <= len(before) < 3, "the kill should land after the first run and before the last"
    for p in [*(out / "runs").glob("*.h5"), *out.glob("*.h5")]:
        with h5py.File(p, "r"):  # never a corrupt file, whenever the kill landed
            pass

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert f"{len(before)} of 3 runs already finished" in done.stdout
    assert re.fullmatch(r"runs=2 tasks=1 controllers=2 wall_s=\d+\.\d", lines[-1])

    after = _run_files(out)
    assert set(after) == {"countdown__base__seed0.h5", "countdown__fixed__seed0.h5",
                          "countdown__grid__seed0.h5"}
    for name, stamp in before.items():
        assert after[name] == stamp, f"{name} was run again"

    # The combined log holds every stage of every run.
    records = {r.key: r for r in runlog.read_combined(out / "leaderboard.h5")}
    assert set(records) == {("countdown", c, 0) for c in ("base", "fixed", "grid")}
    for key in [("countdown", "fixed", 0), ("countdown", "grid", 0)]:
        r = records[key]
        assert 1 <= r.stages_spent <= 2 and len(r.stages) == r.stages_spent
        assert all(len(s.metrics) == 1 and "reward" in s.metrics[0] for s in r.stages)
        assert all("learning_rate" in s.hparams for s in r.stages)
        assert 0.0 <= r.test_score <= 1.0 and r.anytime[0] == (0, r.base_dev_score)
        # Per-item test correctness: one per test item, and the score is its mean.
        assert len(r.test_correct) == 4 and all(isinstance(c, bool) for c in r.test_correct)
        assert r.test_score == pytest.approx(sum(r.test_correct) / 4)
        # One-stage episodes: every stage ends an episode, so the rule chooses among them.
        assert len(r.schedule) == 1 and not r.extra["select_fallback"]
        assert r.extra["episode_end"] in ("stages", "token_cap")
    assert records[("countdown", "grid", 0)].stages_spent == 2  # two one-stage trials

    # Tables and plots with the right rows.
    csv_rows = (out / "leaderboard.csv").read_text().strip().splitlines()
    assert [r.split(",")[:2] for r in csv_rows[1:]] == [["countdown", c]
                                                        for c in ("base", "fixed", "grid")]
    md = (out / "leaderboard.md").read_text()
    assert "## countdown" in md and "| fixed |" in md and "| grid |" in md
    assert "--steps-per-stage 1" in md  # the command that made it
    assert "Smoke run, not for conclusions" in md  # a budget of 2 stages and one seed
    assert "smoke run, not for conclusions" in done.stdout
    runs_csv = (out / "runs.csv").read_text().splitlines()
    assert runs_csv[0].startswith("task,controller,seed,test_score,dev_score,stages,tokens,seconds")
    assert len(runs_csv) == 4  # the header, base, fixed, grid
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0] and set(summary["pairs"]["countdown"]) == {"base", "fixed",
                                                                               "grid"}
    for name in ("anytime_countdown", "schedule_countdown", "differences", "iqm", "profile",
                 "structure"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000


# ---- executors -----------------------------------------------------------------------------------


def test_ray_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SystemExit) as e:
        make_executor("ray")
    assert str(e.value) == RAY_MISSING and 'pip install "llmzero-gym[distributed]"' in RAY_MISSING


def test_ray_executor_runs_two_runs_in_parallel():
    import ray  # a test dependency (the `test` extra), never skipped

    env_kwargs = {**TINY_ENV, "stages": 1, "steps_per_stage": 1, "dev_size": 4, "test_size": 4,
                  "device": "cpu"}
    specs = [RunSpec("countdown", "fixed", seed, 1, "LLMZero-Countdown-v0", env_kwargs,
                     threads=1) for seed in (0, 1)]
    executor = make_executor("ray", num_cpus=2, threads=1)
    try:
        seen: list[tuple] = []
        outcomes = list(executor.map(specs, on_stage=lambda key, n: seen.append((key, n))))
    finally:
        executor.close()
    assert not ray.is_initialized()
    assert sorted(s.seed for s, _, _ in outcomes) == [0, 1]
    for spec, rec, err in outcomes:
        assert err is None, err
        assert rec.key == spec.key and rec.stages_spent == 1 and len(rec.stages) == 1
    # Stage progress came back from the workers through the queue.
    assert {(k, n) for k, n in seen} >= {(s.key, 1) for s in specs}


def test_presets_are_complete(monkeypatch):
    import controllers
    from benchmarks.leaderboard.harness import PRESETS, parse_args, resolve

    quick, full = PRESETS["quick"], PRESETS["full"]
    assert set(quick.tasks) == set(full.tasks) == {"gsm8k", "math", "countdown", "logic"}
    assert quick.controllers is None and len(quick.seeds) == 1  # None: the whole registry
    monkeypatch.delenv("LLMZERO_BASE_URL", raising=False)
    resolved = resolve(parse_args(["--preset", "quick"]))
    # Registration order; a controller is left out only with a note that says why.
    left_out = [c for c in controllers.REGISTRY if c not in resolved.controllers]
    assert resolved.controllers == tuple(c for c in controllers.REGISTRY if c not in left_out)
    assert all(any(n.startswith(f"{c} left out: ") for n in resolved.notes) for c in left_out)
    assert len(full.seeds) >= 5 and full.budget > quick.budget
    assert all(p.budget >= p.stages for p in (quick, full))
