"""LLMZero: tree search over training checkpoints, with an LLM (or the skills) proposing stages.

A node is a saved env state after a stage. Each iteration: select a leaf by UCT over node values
(the best dev score in the subtree, normalised to [0, 1] over the tree); expand it with K
coordinated multi-parameter transitions from the proposer; evaluate each by training that one stage
from the leaf's state; back up visits and values. Early stopping: a node whose dev score falls
behind the best dev score at the same depth by more than `margin` is never expanded. The budget is
in stages, counted by the env, like every controller.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym

from controllers.base import RunResult, Tracker, default_hparams, episode_stages, plain
from controllers.llm_proposer import LLMEndpointError, LLMProposer
from controllers.proposers import (
    FALLBACK,
    LLM,
    Context,
    Proposal,
    Proposer,
    ReplayProposer,
    SkillProposer,
    on_grid,
)
from controllers.skills import StateSummary


@dataclass(eq=False)
class Node:
    """A checkpoint: the env state after the stage trained with `hparams` from `parent`."""

    id: int
    depth: int                               # stages trained from the root
    hparams: dict[str, Any]                  # the stage that led here (the defaults at the root)
    state: Any = field(repr=False)           # env.unwrapped.save_state()
    dev_score: float
    metrics: list[dict] = field(default_factory=list, repr=False)  # per-step, this stage only
    pathologies: list[str] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)
    children: list[Node] = field(default_factory=list, repr=False)
    visits: int = 1                          # nodes in the subtree (each one stage of training)
    best: float = -math.inf                  # best dev score in the subtree
    terminal: bool = False                   # the episode ended here (last stage or diverged)
    expansions: int = 0                      # times the proposer was asked for its children
    source: str = "root"                     # who proposed the stage (controllers.proposers)
    samples: list[dict] = field(default_factory=list, repr=False)  # dev samples of this state

    @property
    def expanded(self) -> bool:
        return self.expansions > 0

    def path(self) -> list[Node]:
        """The nodes from the root's first child down to this one."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class LLMZero:
    """Tree search over checkpoints (UCT + early stopping) with K proposals per expansion.

    `proposer`: any object with propose(ctx, space, k) (controllers.proposers), or a name that
    `make_proposer` builds with its defaults. `controllers.make("llmzero", proposer="llm",
    base_url=..., model=...)` routes the search's settings here and the rest to the proposer.
    """

    name: str = "llmzero"
    proposer: Proposer | str = field(default_factory=SkillProposer)
    k: int = 3
    c_uct: float = 0.5          # values are in [0, 1]; small budgets reward exploitation
    margin: float = 0.05        # dev-score gap behind the best at the same depth that prunes
    # Expansions of one node; a node is expanded again once its subtree is closed, and its next
    # prompt lists what was tried. None: 1 with the skills (whose second answer would only be
    # their lower-ranked moves; this keeps the offline search as published), else 2.
    max_expansions: int | None = None
    # Stop when more than this share of at least 4 LLM expansions fell back to the skills: the
    # run would measure the skills, not the LLM.
    max_fallback_rate: float = 0.25
    run_dir: str | None = None  # tree.json (and the LLM's transcript); LLM default: runs/...

    def __post_init__(self) -> None:
        if isinstance(self.proposer, str):
            self.proposer = make_proposer(self.proposer)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_expansions is not None and self.max_expansions < 1:
            raise ValueError(f"max_expansions must be >= 1 or None, got {self.max_expansions}")
        if not 0.0 <= self.max_fallback_rate <= 1.0:
            raise ValueError(f"max_fallback_rate must be in [0, 1], got {self.max_fallback_rate}")

    def expansions_per_node(self) -> int:
        if self.max_expansions is not None:
            return self.max_expansions
        return 1 if isinstance(self.proposer, SkillProposer) else 2

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        proposer = self.proposer
        run_dir = Path(self.run_dir) if self.run_dir else None
        if hasattr(proposer, "start"):  # before reset: a dead endpoint costs no stage
            run_dir = proposer.start(run_dir, seed)
        tracker = Tracker(env, budget, seed)
        space = tracker.space
        root = Node(id=0, depth=0, hparams=default_hparams(space), state=tracker.root,
                    dev_score=tracker.base_dev, samples=list(tracker.last_info.get("samples", [])))
        tree = Tree(root, episode_stages(env), self.c_uct, self.margin, self.expansions_per_node())
        stages_saved = 0

        while tracker.remaining > 0:
            leaf, saved = tree.next_leaf(cost=min(self.k, tracker.remaining))
            if leaf is None:
                break  # every branch is expanded to the episode's end or pruned
            stages_saved += saved
            leaf.expansions += 1
            ctx = self.context(env, tree, leaf, tracker)
            offered = proposer.propose(ctx, space, self.k)
            tree.expansions.append({"node": leaf.id, "source": expansion_source(offered),
                                    "children": []})
            self.check_fallbacks(tree.expansions)
            for p in self.admissible(offered, ctx, space):
                if tracker.remaining < 1:
                    break
                tracker.load(leaf.state)
                dev, done = tracker.step([n.hparams for n in leaf.path()] + [p.hparams])
                info = tracker.last_info
                child = tree.add(leaf, p.hparams, env.unwrapped.save_state(), dev,
                                 metrics=list(info.get("metrics", [])),
                                 pathologies=list(info.get("pathologies", [])),
                                 samples=list(info.get("samples", [])), terminal=done,
                                 source=p.source)
                tree.expansions[-1]["children"].append(child.id)
            tree.release_states()

        return self.result(tracker, proposer, tree, stages_saved, run_dir)

    def admissible(self, offered: list[Proposal], ctx: Context, space: Any) -> list[Proposal]:
        """The offered settings, on the grid, without repeats, at most k."""
        out: list[Proposal] = []
        tried = ctx.tried_hparams()
        for p in offered:
            p = dataclasses.replace(p, hparams=plain(on_grid(p.hparams, space)))
            if all(p.hparams != q.hparams for q in out) and p.hparams not in tried:
                out.append(p)
        return out[: self.k]

    def check_fallbacks(self, expansions: list[dict]) -> None:
        """Stop a run whose LLM expansions mostly fell back to the skills."""
        asked, fallbacks = llm_counts(expansions)
        if asked >= 4 and fallbacks / asked > self.max_fallback_rate:
            raise LLMEndpointError(
                f"skills fallback in {fallbacks} of {asked} LLM expansions (share "
                f"{fallbacks / asked:.2f}) exceeds max_fallback_rate={self.max_fallback_rate}: "
                "the run would measure the skills, not the LLM. The transcript says why.")

    def context(self, env: gym.Env, tree: Tree, leaf: Node, tracker: Tracker) -> Context:
        """What the proposer sees of `leaf`: its path, the tree around it, the budget."""
        u = env.unwrapped
        best = max(tree.nodes, key=lambda n: n.dev_score)  # max keeps the earliest of equals
        siblings = [] if leaf.parent is None else [s for s in leaf.parent.children if s is not leaf]
        budget = u.budget
        return Context(
            task=f"{u.task_name} ({u.scale} scale)", node_id=leaf.id, stage=leaf.depth,
            max_stages=tree.max_depth, hparams=dict(leaf.hparams),
            path=[outcome(n) | {"metrics": n.metrics} for n in leaf.path()],
            pathologies=list(leaf.pathologies), base_dev_score=tracker.base_dev,
            samples=list(leaf.samples), siblings=[outcome(s) for s in siblings],
            tried=[outcome(c) for c in leaf.children],
            best={"dev_score": best.dev_score, "node": best.id,
                  "path": [n.hparams for n in best.path()]},
            remaining_stages=tracker.remaining,
            tokens_left=None if budget.max_tokens is None else int(budget.remaining_tokens),
            dev_size=getattr(u, "dev_size", None),
            steps_per_stage=getattr(u, "steps_per_stage", None),
            plot=functools.partial(_plot, u, leaf.state),
            state_summary=state_summary(leaf, tracker.base_dev, getattr(u, "dev_size", None)),
        )

    def result(self, tracker: Tracker, proposer: Proposer, tree: Tree, stages_saved: int,
               run_dir: Path | None) -> RunResult:
        asked, fallbacks = llm_counts(tree.expansions)
        cost = {**(proposer.cost() if hasattr(proposer, "cost") else {}),
                "llm_expansions": asked, "llm_fallbacks": fallbacks}
        record = {
            "nodes": [node_record(n) for n in tree.nodes],
            "expansions": tree.expansions,
            "pruned": [n.id for n in tree.pruned()],
            "stages_saved": stages_saved,
            "best_at_depth": dict(tree.best_at_depth),
            "proposer": repr(proposer),
            "settings": {"k": self.k, "c_uct": self.c_uct, "margin": self.margin,
                         "max_expansions": tree.max_expansions},
        }
        if hasattr(proposer, "usage"):
            record["llm_usage"] = dict(proposer.usage)
        tracker.trials.extend(
            {"number": n.id, "schedule": [p.hparams for p in n.path()], "dev_score": n.dev_score,
             "source": n.source} for n in tree.nodes[1:]
        )
        if run_dir is not None:
            record["run_dir"] = str(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "tree.json").write_text(json.dumps(record, indent=1, default=str))
        result = tracker.result(self.name, tree=record)
        result.cost.update(cost)
        return result


def _plot(env: Any, state: Any) -> bytes:
    """The training curves of `state`'s path (the env draws those of its loaded state)."""
    env.load_state(state)
    return env.render_png()


def outcome(node: Node) -> dict:
    """A node as a proposer sees a tried stage: its hyperparameters, dev score, pathologies."""
    return {"hparams": node.hparams, "dev_score": node.dev_score,
            "pathologies": node.pathologies, "source": node.source}


def llm_counts(expansions: list[dict]) -> tuple[int, int]:
    """Expansions an LLM was asked for, and those of them the skills answered instead."""
    asked = [e["source"] for e in expansions if e["source"] in (LLM, FALLBACK)]
    return len(asked), asked.count(FALLBACK)


def expansion_source(proposals: list[Proposal]) -> str:
    """Who proposed an expansion: a fallback marks the whole of it."""
    sources = [p.source for p in proposals]
    return FALLBACK if FALLBACK in sources else (sources[0] if sources else "none")


def make_proposer(name: str, **settings: Any) -> Proposer:
    """The proposer called `name` ("skills", "llm", "replay") built with its `settings`."""
    factories: dict[str, Callable[..., Proposer]] = {
        "skills": SkillProposer, "llm": LLMProposer, "replay": ReplayProposer}
    if name not in factories:
        raise ValueError(f"proposer must be one of {sorted(factories)} or a proposer object, "
                         f"got {name!r}")
    factory = factories[name]
    allowed = set(inspect.signature(factory).parameters)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        search = sorted(f.name for f in dataclasses.fields(LLMZero))
        raise TypeError(f"unknown setting(s) {unknown} for llmzero with proposer {name!r}; "
                        f"the search takes {search}, the proposer {sorted(allowed)}")
    if name == "llm":
        settings.setdefault("fallback", SkillProposer())
    return factory(**settings)


def make_llmzero(proposer: str | Proposer = "skills", **kwargs: Any) -> LLMZero:
    """`controllers.make("llmzero", ...)`: the search's settings to LLMZero, the rest to the
    proposer named by `proposer` (a proposer object takes no settings here)."""
    search = {f.name for f in dataclasses.fields(LLMZero)}
    own = {k: v for k, v in kwargs.items() if k in search}
    rest = {k: v for k, v in kwargs.items() if k not in search}
    if not isinstance(proposer, str) and rest:
        raise TypeError(f"unknown llmzero setting(s) {sorted(rest)}; a proposer object takes "
                        "its settings in its own constructor")
    built = make_proposer(proposer, **rest) if isinstance(proposer, str) else proposer
    return LLMZero(proposer=built, **own)


@dataclass
class Tree:
    """The search tree: UCT selection on normalised subtree values, early stopping by depth."""

    root: Node
    max_depth: int                       # the episode's length: nodes this deep are terminal
    c_uct: float = 0.5
    margin: float = 0.05
    max_expansions: int = 1              # times one node may be expanded
    nodes: list[Node] = field(default_factory=list)
    best_at_depth: dict[int, float] = field(default_factory=dict)  # the best dev curve
    expansions: list[dict] = field(default_factory=list)  # node, source, children: in order

    def __post_init__(self) -> None:
        self.nodes = [self.root]
        self.best_at_depth = {0: self.root.dev_score}
        self.root.best = self.root.dev_score

    def add(self, parent: Node, hparams: dict, state: Any, dev_score: float, **fields: Any) -> Node:
        """A new child of `parent`, backed up to the root."""
        child = Node(id=len(self.nodes), depth=parent.depth + 1, hparams=hparams, state=state,
                     dev_score=dev_score, parent=parent, best=dev_score, **fields)
        child.terminal = child.terminal or child.depth >= self.max_depth
        parent.children.append(child)
        self.nodes.append(child)
        self.best_at_depth[child.depth] = max(self.best_at_depth.get(child.depth, -math.inf),
                                              dev_score)
        ancestor = parent
        while ancestor is not None:
            ancestor.visits += 1
            ancestor.best = max(ancestor.best, dev_score)
            ancestor = ancestor.parent
        return child

    def behind(self, node: Node) -> bool:
        """The node's dev score trails the best at its depth by more than the margin."""
        return node.dev_score < self.best_at_depth[node.depth] - self.margin

    def expandable(self, node: Node) -> bool:
        return not node.expanded and not node.terminal

    def reexpandable(self, node: Node) -> bool:
        return 0 < node.expansions < self.max_expansions and not node.terminal

    def release_states(self) -> None:
        """Keep states only where an expansion may still come; the env frees the others.

        Terminal nodes end the episode, a node's expansions are capped, and pruning is final (the
        best curve only rises), so no later expansion loads those. The Tracker holds the best state.
        """
        for node in self.nodes:
            if not (self.expandable(node) or self.reexpandable(node)) or self.behind(node):
                node.state = None

    def pruned(self) -> list[Node]:
        """Nodes early stopping keeps from being expanded (as of now)."""
        return [n for n in self.nodes if self.expandable(n) and self.behind(n)]

    def select(self, node: Node, prune: bool = True) -> Node | None:
        """The node to expand under `node`, children in UCT order; None if the subtree is closed.

        A node whose children's subtrees are all closed is expanded again, up to its cap.
        """
        if self.expandable(node):
            return None if prune and self.behind(node) else node
        lo = min(n.dev_score for n in self.nodes)
        hi = max(n.dev_score for n in self.nodes)
        # sorted() is stable: among equal scores the earlier child (higher proposal rank) wins.
        for child in sorted(node.children, key=lambda c: -self.uct(c, node.visits, lo, hi)):
            leaf = self.select(child, prune)
            if leaf is not None:
                return leaf
        if self.reexpandable(node) and not (prune and self.behind(node)):
            return node
        return None

    def uct(self, child: Node, parent_visits: int, lo: float, hi: float) -> float:
        value = (child.best - lo) / (hi - lo) if hi > lo else 0.5
        return value + self.c_uct * math.sqrt(math.log(parent_visits) / child.visits)

    def next_leaf(self, cost: int) -> tuple[Node | None, int]:
        """The leaf to expand, and the stages early stopping saved by this choice: `cost` when
        the same search without early stopping would have expanded a pruned node instead."""
        leaf = self.select(self.root, prune=True)
        naive = self.select(self.root, prune=False)
        saved = cost if naive is not None and naive is not leaf and self.behind(naive) else 0
        return leaf, saved


def state_summary(node: Node, base_dev: float, dev_size: int | None = None) -> StateSummary:
    """The node as the skills library reads it (`dev_size` sets its noise margins)."""
    path = node.path()
    return StateSummary(
        hparams=dict(node.hparams), metrics=node.metrics,
        history=[m for n in path for m in n.metrics],
        dev_scores=tuple([base_dev] + [n.dev_score for n in path]),
        pathologies=tuple(node.pathologies), dev_size=dev_size,
    )


def node_record(node: Node) -> dict:
    """A node as plain data for RunResult.tree and tree.json (no state, no raw metrics)."""
    keys = ("id", "depth", "hparams", "dev_score", "pathologies", "visits", "best", "terminal",
            "expanded", "expansions", "source")
    record = {k: getattr(node, k) for k in keys}
    record["parent"] = node.parent.id if node.parent is not None else None
    return record
