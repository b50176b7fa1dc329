"""LLMZero: tree search over training checkpoints, with an LLM (or the skills) proposing stages.

A node is a saved env state after a stage. Each iteration: select a leaf by UCT over node values
(the best dev score in the subtree, normalised to [0, 1] over the tree); expand it with K
coordinated multi-parameter transitions from the proposer; evaluate each by training that one stage
from the leaf's state; back up visits and values. Early stopping: a node whose dev score falls
behind the best dev score at the same depth by more than `margin` is never expanded. The budget is
in stages, counted by the env, like every controller.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym

from controllers.base import RunResult, Tracker, default_hparams, episode_stages, plain
from controllers.llm_proposer import Context, LLMProposer, Proposer, on_grid
from controllers.skills import SkillLibrary, StateSummary
from controllers.skills import propose as propose_skills


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
    expanded: bool = False
    source: str = "root"                     # who proposed the stage: "llm" | "skills" | "root"

    def path(self) -> list[Node]:
        """The nodes from the root's first child down to this one."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class SkillProposer:
    """The skills library of the `skills` controller as a proposer; needs no network."""

    library: SkillLibrary | None = None   # None: the default library, with users' skills
    last_source: ClassVar[str] = "skills"

    def propose(self, ctx: Context, space: Any, k: int) -> list[dict]:
        return propose_skills(ctx.state_summary, space, k, library=self.library)


@dataclass
class LLMZero:
    """Tree search over checkpoints (UCT + early stopping) with K proposals per expansion.

    proposer="skills" runs offline and is deterministic for a seed; proposer="llm" asks an
    OpenAI-compatible endpoint (`base_url`/`api_key`/`model` or LLMZERO_* / OPENAI_* variables),
    with `vision=True` sending the training-curve plot. Prompts and replies go to `run_dir`.
    """

    name: str = "llmzero"
    proposer: str | Proposer = "skills"   # or any object with propose(ctx, space, k)
    k: int = 3
    c_uct: float = 0.5          # values are in [0, 1]; small budgets reward exploitation
    margin: float = 0.05        # dev-score gap behind the best at the same depth that prunes
    vision: bool = False
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    max_retries: int = 2        # re-asks after an invalid reply, then the skills take over
    network_retries: int = 4    # retries of failed requests, exponential backoff from `backoff`
    backoff: float = 1.0
    temperature: float | None = None
    max_tokens: int | None = None
    extra_body: dict | None = None  # e.g. {"chat_template_kwargs": {"enable_thinking": False}}
    run_dir: str | None = None  # default for the LLM: runs/llmzero-<time>-seed<seed>

    def __post_init__(self) -> None:
        if isinstance(self.proposer, str) and self.proposer not in ("skills", "llm"):
            raise ValueError(f"proposer must be 'skills', 'llm' or a Proposer, "
                             f"got {self.proposer!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def make_proposer(self, run_dir: Path | None) -> Proposer:
        if not isinstance(self.proposer, str):
            return self.proposer
        if self.proposer == "skills":
            return SkillProposer()
        llm = LLMProposer(
            base_url=self.base_url, api_key=self.api_key, model=self.model, vision=self.vision,
            max_retries=self.max_retries, network_retries=self.network_retries,
            backoff=self.backoff, temperature=self.temperature, max_tokens=self.max_tokens,
            extra_body=self.extra_body, fallback=SkillProposer(), run_dir=run_dir,
        )
        llm.check()  # an unreachable endpoint is an error now, not after the first stages
        return llm

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        run_dir = Path(self.run_dir) if self.run_dir else None
        if run_dir is None and self.proposer == "llm":
            run_dir = Path("runs") / f"llmzero-{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"
        proposer = self.make_proposer(run_dir)  # before reset: a dead endpoint costs no stage
        tracker = Tracker(env, budget, seed)
        space = tracker.space
        root = Node(id=0, depth=0, hparams=default_hparams(space), state=tracker.root,
                    dev_score=tracker.base_dev)
        tree = Tree(root, episode_stages(env), self.c_uct, self.margin)
        stages_saved = 0

        while tracker.remaining > 0:
            leaf, saved = tree.next_leaf(cost=min(self.k, tracker.remaining))
            if leaf is None:
                break  # every branch is expanded to the episode's end or pruned
            stages_saved += saved
            leaf.expanded = True
            ctx = self.context(env, tree, leaf, tracker.base_dev)
            proposals = self.propose(proposer, ctx, space)
            # Who proposed: the LLM may have fallen back to the skills for this expansion.
            source = getattr(proposer, "last_source", type(proposer).__name__)
            for hp in proposals:
                if tracker.remaining < 1:
                    break
                tracker.load(leaf.state)
                dev, done = tracker.step([n.hparams for n in leaf.path()] + [hp])
                info = tracker.last_info
                tree.add(leaf, hp, env.unwrapped.save_state(), dev,
                         metrics=list(info.get("metrics", [])),
                         pathologies=list(info.get("pathologies", [])), terminal=done,
                         source=source)
            tree.release_states()

        return self.result(tracker, proposer, tree, stages_saved, run_dir)

    def propose(self, proposer: Proposer, ctx: Context, space: Any) -> list[dict]:
        """The proposer's settings, on the grid, without repeats, at most k."""
        out: list[dict] = []
        for hp in proposer.propose(ctx, space, self.k):
            hp = plain(on_grid(hp, space))
            if hp not in out and hp not in ctx.tried:
                out.append(hp)
        return out[: self.k]

    def context(self, env: gym.Env, tree: Tree, leaf: Node, base_dev: float) -> Context:
        """What the proposer sees of `leaf`: its path, siblings, pathologies, plot."""
        path = leaf.path()
        stages = [{"hparams": n.hparams, "dev_score": n.dev_score, "metrics": n.metrics,
                   "pathologies": n.pathologies} for n in path]
        siblings = [] if leaf.parent is None else [
            {"hparams": s.hparams, "dev_score": s.dev_score, "pathologies": s.pathologies}
            for s in leaf.parent.children if s is not leaf
        ]
        plot = None
        if self.vision:  # the env draws the curves of the loaded state's path
            env.unwrapped.load_state(leaf.state)
            plot = env.unwrapped.render_png()
        return Context(
            task=f"{env.unwrapped.task_name} ({env.unwrapped.scale} scale)",
            stage=leaf.depth, max_stages=tree.max_depth, path=stages, hparams=dict(leaf.hparams),
            pathologies=list(leaf.pathologies), siblings=siblings,
            tried=[c.hparams for c in leaf.children], base_dev_score=base_dev, node_id=leaf.id,
            plot_png=plot, state_summary=state_summary(leaf, base_dev),
        )

    def result(self, tracker: Tracker, proposer: Proposer, tree: Tree, stages_saved: int,
               run_dir: Path | None) -> RunResult:
        record = {
            "nodes": [node_record(n) for n in tree.nodes],
            "pruned": [n.id for n in tree.pruned()],
            "stages_saved": stages_saved,
            "best_at_depth": dict(tree.best_at_depth),
            "proposer": repr(proposer),
            "settings": {"k": self.k, "c_uct": self.c_uct, "margin": self.margin},
        }
        tracker.trials.extend(
            {"number": n.id, "schedule": [p.hparams for p in n.path()], "dev_score": n.dev_score,
             "source": n.source} for n in tree.nodes[1:]
        )
        cost_extra = {}
        if isinstance(proposer, LLMProposer):
            record["llm_usage"] = dict(proposer.usage)
            cost_extra = {
                "llm_tokens": proposer.usage["prompt_tokens"] + proposer.usage["completion_tokens"],
                "llm_prompt_tokens": proposer.usage["prompt_tokens"],
                "llm_completion_tokens": proposer.usage["completion_tokens"],
                "llm_requests": proposer.usage["requests"],
            }
        if run_dir is not None:
            record["run_dir"] = str(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "tree.json").write_text(json.dumps(record, indent=1, default=str))
        result = tracker.result(self.name, tree=record)
        result.cost.update(cost_extra)
        return result


@dataclass
class Tree:
    """The search tree: UCT selection on normalised subtree values, early stopping by depth."""

    root: Node
    max_depth: int                       # the episode's length: nodes this deep are terminal
    c_uct: float = 0.5
    margin: float = 0.05
    nodes: list[Node] = field(default_factory=list)
    best_at_depth: dict[int, float] = field(default_factory=dict)  # the best dev curve

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

    def release_states(self) -> None:
        """Keep states only on the frontier; the env frees the weights of the others.

        A node is expanded once, terminal nodes end the episode, and pruning is final (the best
        curve only rises), so no later expansion loads those. The Tracker holds the best state.
        """
        for node in self.nodes:
            if not self.expandable(node) or self.behind(node):
                node.state = None

    def pruned(self) -> list[Node]:
        """Nodes early stopping keeps from being expanded (as of now)."""
        return [n for n in self.nodes if self.expandable(n) and self.behind(n)]

    def select(self, node: Node, prune: bool = True) -> Node | None:
        """The leaf to expand under `node`, children in UCT order; None if the subtree is closed."""
        if self.expandable(node):
            return None if prune and self.behind(node) else node
        lo = min(n.dev_score for n in self.nodes)
        hi = max(n.dev_score for n in self.nodes)
        # sorted() is stable: among equal scores the earlier child (higher proposal rank) wins.
        for child in sorted(node.children, key=lambda c: -self.uct(c, node.visits, lo, hi)):
            leaf = self.select(child, prune)
            if leaf is not None:
                return leaf
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


def state_summary(node: Node, base_dev: float) -> StateSummary:
    """The node as the skills library reads it."""
    path = node.path()
    return StateSummary(
        hparams=dict(node.hparams), metrics=node.metrics,
        history=[m for n in path for m in n.metrics],
        dev_scores=tuple([base_dev] + [n.dev_score for n in path]),
        pathologies=tuple(node.pathologies),
    )


def node_record(node: Node) -> dict:
    """A node as plain data for RunResult.tree and tree.json (no state, no raw metrics)."""
    keys = ("id", "depth", "hparams", "dev_score", "pathologies", "visits", "best", "terminal",
            "expanded", "source")
    record = {k: getattr(node, k) for k in keys}
    record["parent"] = node.parent.id if node.parent is not None else None
    return record


# controllers/__init__.py does not import this module (yet): register on import, and stay quiet
# if the package is still initialising because it is importing us.
if hasattr(_controllers := sys.modules.get("controllers"), "register"):
    _controllers.register("llmzero", LLMZero)
