"""The generated blocks of README.md and docs/*.md, written from the committed results.

A block is the text between ``<!-- BEGIN name ... -->`` and ``<!-- END name -->``; ``BLOCKS`` says
which committed file each name is made from, and how. After a study or the standard leaderboard
has run again, rewrite the blocks and commit them with the results:

    python -m benchmarks.readme            # rewrite every block in place
    python -m benchmarks.readme --check    # exit 1, naming each block that differs

tests/test_docs.py runs the check, so a number retyped into a block, or left stale, fails.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.leaderboard.report import head_tables

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks.readme"
BEGIN = re.compile(r"^<!-- BEGIN ([\w-]+)\b.*-->$", re.MULTILINE)
BLOCK = re.compile(r"^<!-- BEGIN (?P<name>[\w-]+)\b.*?-->\n.*?^<!-- END (?P=name) -->$",
                   re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """A generated block: the files it is made from (relative to the repository root) and the
    function that turns their texts, in that order, into the block's Markdown."""

    sources: tuple[str, ...]
    make: Callable[..., str]


def verbatim(text: str) -> str:
    """A study's own Markdown report, as it wrote it."""
    return text.strip()


def base_model_card(text: str) -> str:
    """The shipped base model's card (inner/assets/base/training.json): its recipe and its
    greedy accuracy at each task's default difficulty."""
    card = json.loads(text)
    cfg = card["config"]
    early = ", ".join(f"{task} {share:.0%}" for task, share in cfg["early_answers"])
    lines = [f"A GPT-2 of {card['parameters']:,} parameters ({cfg['n_layer']} layers x "
             f"{cfg['n_embd']}, char-level tokenizer), fine-tuned on {card['sft_pairs']:,} worked "
             f"solutions for {cfg['steps']:,} AdamW steps ({card['sft_seconds']:,.0f} s; final "
             f"loss {card['final_loss']:.3f}). Share of the pairs with a step to skip that answer "
             f"early on purpose: {early}.",
             "",
             "| task | dev accuracy (items) | test accuracy (items) |",
             "|---|---|---|"]
    for task, acc in card["accuracy"].items():
        lines.append(f"| {task} | {acc['dev_accuracy']:.3f} ({acc['dev_n']}) "
                     f"| {acc['test_accuracy']:.3f} ({acc['test_n']}) |")
    return "\n".join(lines)


def sb3_policy(text: str) -> str:
    """The sb3 policy's meta-training record (results/sb3/policy.json)."""
    meta = json.loads(text)
    returns = meta["eval"]
    lines = [f"Made by `{meta['command']}`: PPO, {meta['timesteps']:,} timesteps on surrogate envs "
             f"fitted to {meta['real_stages']} real stages on env seeds {meta['train_seeds']} "
             f"({meta['wall_s']:,.0f} s from collection to policy). Mean episode return on the "
             f"surrogates over {returns['episodes_per_task']} episodes per task: PPO "
             f"{returns['surrogate_return_ppo']:+.3f}, a random policy "
             f"{returns['surrogate_return_random']:+.3f}.",
             "",
             "| task | real transitions | out-of-fold R² of a stage's dev change | PPO return "
             "| random return |",
             "|---|---|---|---|---|"]
    for task, fit in meta["surrogate"].items():
        ret = returns["by_task"][task]
        lines.append(f"| {task} | {fit['transitions']} | {fit['cv_r2_dev_delta']:+.3f} "
                     f"| {ret['ppo']:+.3f} | {ret['random']:+.3f} |")
    return "\n".join(lines)


# The headroom target (docs/headroom.md): a gap in test accuracy of at least this much with a 95%
# CI above 0, adaptive over the best constant on 3 of the 4 tasks, best over default on all 4.
HEADROOM_GAP = 0.03
HEADROOM_TARGETS = (("best adaptive - best constant", "gap", 3),
                    ("best schedule - default", "best_vs_default", 4))


def headroom_verdict(text: str) -> str:
    """The headroom study's gaps (results/headroom.json) against the target, task by task."""
    tasks = json.loads(text)["tasks"]

    def tasks_where(key: str, least: float) -> list[str]:
        return [t for t, r in tasks.items() if r[key]["mean"] >= least and r[key]["ci"][0] > 0]

    lines = [f"Against the target (a gap of at least {HEADROOM_GAP} with its 95% CI above 0):", ""]
    for label, key, needed in HEADROOM_TARGETS:
        met = tasks_where(key, HEADROOM_GAP)
        lines.append(f"* {label}: met on {len(met)} of {len(tasks)} tasks "
                     f"({', '.join(met) or 'none'}); the target is {needed}.")
    held = tasks_where("gap_vs_last_stage_held", -1.0)
    lines.append("* best adaptive - its last stage held, CI above 0 (the path itself pays): "
                 f"{', '.join(held) or 'none'}.")
    return "\n".join(lines)


# The learnability targets (docs/learnability.md): the base model's test accuracy within this
# range, the default schedule's test gain at least this much, no stage slower than this.
BASE_ACCURACY = (0.05, 0.60)
MIN_GAIN = 0.05
MAX_STAGE_S = 20.0


def learnability_verdict(text: str) -> str:
    """The learnability study's rows (results/learnability.json) against its targets."""
    rows = json.loads(text)

    def met(ok: Callable[[dict], bool]) -> str:
        misses = sorted({r["task"] for r in rows if not ok(r)})
        return f"met on {len(rows) - len(misses)} of {len(rows)} runs" + (
            f" (not on {', '.join(misses)})" if misses else "")

    low, high = BASE_ACCURACY
    control = ", ".join(f"{r['task']} {r['shuffled_test'] - r['base_test']:+.3f}" for r in rows
                        if r["shuffled_test"] is not None)
    return "\n".join([
        "Against the targets:", "",
        f"* the base model's test accuracy within [{low:.2f}, {high:.2f}]: "
        f"{met(lambda r: low <= r['base_test'] <= high)};",
        f"* the default schedule's test gain at least +{MIN_GAIN}: "
        f"{met(lambda r: r['test'] - r['base_test'] >= MIN_GAIN)};",
        f"* no stage slower than {MAX_STAGE_S:.0f} s: "
        f"{met(lambda r: r['stage_s_max'] <= MAX_STAGE_S)} "
        f"(slowest {max(r['stage_s_max'] for r in rows):.1f} s);",
        f"* the shuffled control's test change over the base: {control or 'not run'}."])


# The first line of a leaderboard report's header (benchmarks.leaderboard.harness.header).
SETTINGS = re.compile(r"^Made by `(?P<command>[^`]+)`; settings: `(?P<settings>\{.*\})`\.$",
                      re.MULTILINE)
LEFT_OUT = re.compile(r"^(?P<name>[\w-]+) left out: ", re.MULTILINE)


def presets_table(*reports: str) -> str:
    """What each committed leaderboard run was: its command and settings, from its report's
    header."""
    lines = ["| preset | command | seeds | budget | episode | dev / test | controllers run |",
             "|---" * 7 + "|"]
    for text in reports:
        found = SETTINGS.search(text)
        if found is None:
            raise ValueError("a leaderboard.md without its 'Made by ...; settings: ...' header")
        s = json.loads(found["settings"])
        left_out = [m["name"] for m in LEFT_OUT.finditer(text)]
        lines.append(
            f"| {s['name']} | `{found['command']}` | {', '.join(map(str, s['seeds']))} "
            f"| {budget_cell(s)} | {s['stages']} stages x "
            f"{s['steps_per_stage']} steps | {s['dev_size']} / {s['test_size']} | "
            f"{', '.join(s['controllers'])}"
            + (f"; left out: {', '.join(left_out)}" if left_out else "") + " |")
    return "\n".join(lines)


def budget_cell(settings: dict[str, Any]) -> str:
    """A preset's budget in its unit: stages, or tokens (given, or episodes' worth of the cap)."""
    if settings["budget_unit"] != "tokens":
        return f"{settings['budget']} stages"
    if settings.get("budget_tokens"):
        return f"{settings['budget_tokens']} tokens"
    return f"{settings['budget'] / settings['stages']:g} default episodes' worth of tokens"


BLOCKS: dict[str, Block] = {
    "standard-head": Block(("results/standard/leaderboard.md",), head_tables),
    "quick-head": Block(("results/leaderboard.md",), head_tables),
    "presets": Block(("results/leaderboard.md", "results/standard/leaderboard.md"),
                     presets_table),
    "learnability": Block(("results/learnability.md",), verbatim),
    "learnability-verdict": Block(("results/learnability.json",), learnability_verdict),
    "sensitivity": Block(("results/sensitivity.md",), verbatim),
    "sensitivity-beta": Block(("results/sensitivity-beta.md",), verbatim),
    "headroom": Block(("results/headroom.md",), verbatim),
    "headroom-verdict": Block(("results/headroom.json",), headroom_verdict),
    "headroom-levels": Block(("results/headroom_levels.md",), verbatim),
    "base-model": Block(("inner/assets/base/training.json",), base_model_card),
    "base-model-levels": Block(("results/base_model.md",), verbatim),
    "throughput": Block(("results/throughput.md",), verbatim),
    "precision": Block(("results/precision.md",), verbatim),
    "sb3-policy": Block(("results/sb3/policy.json",), sb3_policy),
}


def documents(root: Path = ROOT) -> list[Path]:
    """The files that hold generated blocks: README.md and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(name: str, root: Path = ROOT) -> str:
    """Block `name`, markers included, made from its source under `root`."""
    if name not in BLOCKS:
        raise ValueError(f"unknown generated block {name!r}; known blocks: {sorted(BLOCKS)}")
    block = BLOCKS[name]
    body = block.make(*((root / source).read_text() for source in block.sources))
    return (f"<!-- BEGIN {name}: generated from {' and '.join(block.sources)} by {COMMAND}; "
            f"do not edit -->\n\n{body}\n\n<!-- END {name} -->")


def blocks(text: str, where: str = "text") -> list[re.Match[str]]:
    """The generated blocks of `text`; a BEGIN marker without its END is an error naming
    `where`."""
    found = list(BLOCK.finditer(text))
    opened, closed = BEGIN.findall(text), [m["name"] for m in found]
    if opened != closed:
        missing = next((n for n in opened if opened.count(n) != closed.count(n)), opened[0])
        raise ValueError(f"{where}: block {missing!r} has no '<!-- END {missing} -->' after its "
                         "BEGIN marker (or overlaps another block)")
    return found


def fill(text: str, root: Path = ROOT, where: str = "text") -> str:
    """`text` with every generated block rewritten from its source."""
    blocks(text, where)
    return BLOCK.sub(lambda m: render(m["name"], root), text)


def stale(root: Path = ROOT) -> list[str]:
    """`path: name` of every block whose text differs from what its source makes."""
    out = []
    for path in documents(root):
        where = str(path.relative_to(root))
        out += [f"{where}: {m['name']}" for m in blocks(path.read_text(), where)
                if m[0] != render(m["name"], root)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rewrite the generated blocks of README.md and "
                                "docs/*.md from the committed results.")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a block differs from its source")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository's root")
    a = p.parse_args(argv)
    if a.check:
        differ = stale(a.root)
        for entry in differ:
            print(f"stale: {entry} (run {COMMAND})")
        print(f"stale_blocks={len(differ)}")
        return 1 if differ else 0
    changed = 0
    for path in documents(a.root):
        text = path.read_text()
        new = fill(text, a.root, where=str(path.relative_to(a.root)))
        if new != text:
            path.write_text(new)
            changed += 1
    print(f"files_changed={changed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
