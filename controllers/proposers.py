"""The proposer protocol of the LLMZero tree search: what a proposer sees, what it returns.

A proposer is any object with ``propose(ctx, space, k) -> list[Proposal]``: K next-stage settings
for the checkpoint that ``ctx`` describes, each carrying who proposed it. Two optional methods:
``start(run_dir, seed)`` is called once before a run trains anything (and returns the folder it
writes to), ``cost()`` returns what the run paid outside the env (LLM calls and tokens).

Here: the skills proposer (offline, deterministic), the replay of a recorded run, and the grid
check every proposal passes. The LLM proposer is in `controllers.llm_proposer`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controllers.skills import DEFAULT_LIBRARY, SkillLibrary

# Who proposed a stage. A fallback is the skills answering for an LLM that gave nothing usable.
LLM, SKILLS, FALLBACK = "llm", "skills", "skills-fallback"
# The transcript event that records one expansion's proposals; the replay reads only these.
EXPANSION_EVENT = "expansion"


@dataclass(frozen=True)
class Proposal:
    """One next-stage setting: the full hyperparameter dict, who proposed it, and why."""

    hparams: dict[str, Any]
    source: str
    rationale: str = ""

    def record(self) -> dict[str, Any]:
        return {"hparams": self.hparams, "source": self.source, "rationale": self.rationale}


@dataclass
class Context:
    """What a proposer sees of the node it expands; built by the tree search."""

    task: str                       # e.g. "gsm8k (embedded scale)"
    node_id: int
    stage: int                      # stages trained from the root to this node
    max_stages: int                 # episode length: the deepest a node can be
    hparams: dict                   # in force at this node (the defaults at the root)
    path: list[dict]                # root->node per stage: hparams, dev_score, metrics, pathologies
    pathologies: list[str]          # fired at this node
    base_dev_score: float = 0.0
    samples: list[dict] = field(default_factory=list)   # this checkpoint's dev samples
    siblings: list[dict] = field(default_factory=list)  # parent's other children: hparams, dev
    tried: list[dict] = field(default_factory=list)     # earlier proposals from this node, ditto
    best: dict | None = None        # the best node in the tree: dev_score, node, path (hparams)
    remaining_stages: int | None = None   # of the run's budget
    tokens_left: int | None = None  # when the env has a token budget
    dev_size: int | None = None
    steps_per_stage: int | None = None
    plot: Callable[[], bytes] | None = field(default=None, repr=False)  # the path's curves, PNG
    state_summary: Any = None       # what the skills read (controllers.skills.StateSummary)

    def tried_hparams(self) -> list[dict]:
        return [t["hparams"] for t in self.tried]


class Proposer(Protocol):
    def propose(self, ctx: Context, space: Any, k: int) -> list[Proposal]: ...


def on_grid(hparams: dict, space: Any) -> dict:
    """The full hparam dict as the grid's own values; ValueError naming a bad parameter."""
    unknown = sorted(set(hparams) - set(space.names))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; allowed: {list(space.names)}")
    try:
        return space.complete(hparams)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(str(e)) from None


@dataclass
class SkillProposer:
    """The skills library of the `skills` controller as a proposer; needs no network."""

    library: SkillLibrary | None = None   # None: the default library, with users' skills

    def propose(self, ctx: Context, space: Any, k: int) -> list[Proposal]:
        # A node expanded again gets the next-ranked settings, not the ones already tried.
        library, tried = self.library or DEFAULT_LIBRARY, ctx.tried_hparams()
        candidates = library.proposals(ctx.state_summary, space, k + len(tried))
        return [Proposal(c.hparams, SKILLS, f"{c.skill}: {c.description}")
                for c in candidates if c.hparams not in tried][:k]


class ReplayError(RuntimeError):
    """The search asked for an expansion the transcript does not hold."""


@dataclass
class ReplayProposer:
    """Re-runs a recorded run without its endpoint: each expansion returns what was recorded.

    `transcript`: a run's transcript.jsonl, or the run folder holding it. With the same env, seed,
    budget and search settings on the same machine the search makes the same tree and scores.
    """

    transcript: str | Path
    expansions: list[dict] = field(default_factory=list, init=False, repr=False)
    position: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        path = Path(self.transcript)
        path = path / "transcript.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no transcript at {path}")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.expansions = [r for r in records if r.get("event") == EXPANSION_EVENT]
        if not self.expansions:
            raise ReplayError(f"{path} records no expansion ({EXPANSION_EVENT!r} events)")

    def start(self, run_dir: Path | None, seed: int) -> Path | None:
        self.position = 0
        return run_dir

    def propose(self, ctx: Context, space: Any, k: int) -> list[Proposal]:
        if self.position >= len(self.expansions):
            raise ReplayError(f"the transcript holds {len(self.expansions)} expansions and the "
                              "search asks for another: is the budget the recorded run's?")
        record = self.expansions[self.position]
        if record["node"] != ctx.node_id:
            raise ReplayError(
                f"expansion {self.position} of the transcript is of node {record['node']}, the "
                f"search expands node {ctx.node_id}: the env, seed, settings or machine differ")
        self.position += 1
        return [Proposal(p["hparams"], p["source"], p.get("rationale", ""))
                for p in record["proposals"]]
