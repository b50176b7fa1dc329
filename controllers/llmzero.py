"""LLMZero: tree search over training checkpoints, with an LLM (or the skills) proposing stages.

A node is a saved env state after a stage. Each iteration trains one stage: descend from the root
by UCT over node values (the best dev score in the subtree, normalised to [0, 1] over the tree);
at a node whose children are fewer than its progressive-widening width, floor(c * visits ** alpha)
capped at K, train its next proposal as a new child instead; back up visits and values. A node's
proposals come from the proposer in one call of K ranked, coordinated multi-parameter settings,
asked the first time the node grows and trained one at a time as its width allows. So the search
goes deep where it has few visits and widens where it has many, and K is budget-aware (None:
budget // episode stages, at least 2). Early stopping: a node whose dev score falls behind the
best at its depth by more than `margin` (`margin_se` standard errors of the dev score, from the
dev set's size) gets no new child. When the budget left is only enough to take the deepest open
node to the episode's end and no node has ended an episode yet, the search finishes that path
first. The chosen state follows the one selection rule of every controller (the Tracker's,
`controllers.base.SELECT_RULE_TEXT`): the best on dev among the nodes whose episode ended. The
budget is the Tracker's, like every controller's.
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
from typing import Any, ClassVar

import gymnasium as gym

from controllers.base import (
    RunResult,
    Tracker,
    check_budget,
    check_int,
    check_nonnegative,
    default_hparams,
    episode_stages,
    plain,
)
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
from metaenv.pathologies import dev_standard_error


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
    failed: bool = False                     # the stage failed (divergence, out of memory)
    expansions: int = 0                      # times the proposer was asked for its children
    pending: list[Proposal] = field(default_factory=list, repr=False)  # proposed, not trained
    call: int = -1                           # index in Tree.expansions of its latest call
    source: str = "root"                     # who proposed the stage (controllers.proposers)
    samples: list[dict] = field(default_factory=list, repr=False)  # dev samples of this state
    tokens: int = 0                          # tokens sampled on the path from the root

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
    """Tree search over checkpoints (UCT, progressive widening, early stopping), K proposals per
    proposer call.

    `proposer`: any object with propose(ctx, space, k) (controllers.proposers), or a name that
    `make_proposer` builds with its defaults. `controllers.make("llmzero", proposer="llm",
    base_url=..., model=...)` routes the search's settings here and the rest to the proposer.
    """

    name: str = "llmzero"
    proposer: Proposer | str = field(default_factory=SkillProposer)
    # Proposals per call, and most children per node per call; None: budget // episode stages,
    # at least 2.
    k: int | None = None
    c_uct: float = 0.5          # values are in [0, 1]; small budgets reward exploitation
    # Progressive widening: a node with `visits` nodes in its subtree may have
    # floor(widen_c * visits ** widen_alpha) children (at least 1, at most k per call), more only
    # once every child's subtree is closed. 0.4: a second child at 6 visits, a fourth at 32; in a
    # simulation with random dev scores the tree alone reaches the end of an 8-stage episode in
    # 92-97% of 32-stage runs (0.5: 13-46%; tests/test_llmzero.py).
    widen_c: float = 1.0
    widen_alpha: float = 0.4
    # Dev-score gap behind the best at the same depth that prunes: `margin`, or when None
    # `margin_se` standard errors of the dev score (metaenv.pathologies.dev_standard_error). Two
    # equally good nodes differ by more than 2 standard errors about 8% of the time.
    margin: float | None = None
    margin_se: float = 2.0
    # Proposer calls for one node; a node is asked again once its proposals are all trained, and
    # its next prompt lists what was tried. None: 1 with the skills (whose second answer would
    # only be their lower-ranked moves), else 2.
    max_expansions: int | None = None
    # Stop when more than this share of at least 4 LLM expansions fell back to the skills: the
    # run would measure the skills, not the LLM.
    max_fallback_rate: float = 0.25
    run_dir: str | None = None  # tree.json (and the LLM's transcript); LLM default: runs/...
    unspent_reason: ClassVar[str | None] = (
        "the tree closed before the budget ended: every node ended the episode, has its most "
        "children, or was pruned and its state freed")

    def __post_init__(self) -> None:
        if isinstance(self.proposer, str):
            self.proposer = make_proposer(self.proposer)
        check_int("k", self.k, 1, optional=True)
        check_int("max_expansions", self.max_expansions, 1, optional=True)
        if not 0.0 <= self.max_fallback_rate <= 1.0:
            raise ValueError(f"max_fallback_rate must be in [0, 1], got {self.max_fallback_rate}")
        if self.widen_c <= 0 or not 0.0 <= self.widen_alpha <= 1.0:
            raise ValueError(f"widen_c must be > 0 and widen_alpha in [0, 1], got "
                             f"{self.widen_c} and {self.widen_alpha}")
        check_nonnegative("c_uct", self.c_uct)
        check_nonnegative("margin_se", self.margin_se)
        if self.margin is not None:
            check_nonnegative("margin", self.margin)

    def expansions_per_node(self) -> int:
        if self.max_expansions is not None:
            return self.max_expansions
        return 1 if isinstance(self.proposer, SkillProposer) else 2

    def width(self, budget: int, stages: int) -> int:
        """K: the most children of a node, and the proposals asked for in one call."""
        return self.k if self.k is not None else max(2, budget // max(stages, 1))

    def pruning_margin(self, dev_size: int | None) -> float:
        """The dev-score gap that prunes: `margin`, else `margin_se` standard errors (no pruning
        when the dev set's size is unknown)."""
        if self.margin is not None:
            return self.margin
        se = dev_standard_error(dev_size)
        return self.margin_se * se if se > 0 else math.inf

    def fits(self, budget: int, stages: int) -> str | None:
        if budget < stages:
            return (f"at budget {budget} no path reaches the end of a {stages}-stage episode, "
                    "so no whole schedule can be chosen")
        if budget < 2 * stages:
            return (f"at budget {budget} only {budget - stages} stages are left beside the one "
                    f"path to the end of a {stages}-stage episode: the search barely branches")
        return None

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        check_budget(budget)   # before the proposer contacts its endpoint
        proposer = self.proposer
        run_dir = Path(self.run_dir) if self.run_dir else None
        if hasattr(proposer, "start"):  # before reset: a dead endpoint costs no stage
            run_dir = proposer.start(run_dir, seed)
        tracker = Tracker(env, budget, seed)
        space, k = tracker.space, self.width(budget, episode_stages(env))
        root = Node(id=0, depth=0, hparams=default_hparams(space), state=tracker.root,
                    dev_score=tracker.base_dev, samples=list(tracker.last_info.get("samples", [])))
        dev_size = tracker.last_info.get("dev_size", getattr(env.unwrapped, "dev_size", None))
        calls = self.expansions_per_node()
        tree = Tree(root, episode_stages(env), self.c_uct, self.pruning_margin(dev_size), calls,
                    max_children=k * calls, widen_c=self.widen_c, widen_alpha=self.widen_alpha,
                    need=functools.partial(budget_to_end, tracker, episode_stages(env)))
        stages_saved = 0

        while tracker.remaining > 0:
            leaf, saved = tree.next_leaf(tracker.remaining)
            if leaf is None:
                break  # every branch is expanded to the episode's end, capped or pruned
            stages_saved += saved
            if not leaf.pending:
                self.expand(env, tree, leaf, tracker, k)
                continue   # the tree changed: select again (a call may bring no proposal)
            p = leaf.pending.pop(0)
            tracker.load(leaf.state)
            dev, done = tracker.step([n.hparams for n in leaf.path()] + [p.hparams])
            info = tracker.last_info
            child = tree.add(leaf, p.hparams, env.unwrapped.save_state(), dev,
                             metrics=list(info.get("metrics", [])),
                             pathologies=list(info.get("pathologies", [])),
                             samples=list(info.get("samples", [])), terminal=done,
                             failed=info.get("failure") is not None, source=p.source,
                             tokens=int(info.get("cost", {}).get("tokens", 0)))
            tree.expansions[leaf.call]["children"].append(child.id)
            tree.release_states()

        return self.result(tracker, proposer, tree, stages_saved, run_dir, k)

    def expand(self, env: gym.Env, tree: Tree, leaf: Node, tracker: Tracker, k: int) -> None:
        """Ask the proposer for `leaf`'s next K settings (one call); they wait in `leaf.pending`."""
        leaf.expansions += 1
        ctx = self.context(env, tree, leaf, tracker)
        offered = self.proposer.propose(ctx, tracker.space, k)
        leaf.call = len(tree.expansions)
        tree.expansions.append({"node": leaf.id, "source": expansion_source(offered),
                                "children": []})
        self.check_fallbacks(tree.expansions)
        leaf.pending = self.admissible(offered, ctx, tracker.space, k)

    def admissible(self, offered: list[Proposal], ctx: Context, space: Any,
                   k: int) -> list[Proposal]:
        """The offered settings, on the grid, without repeats, at most k."""
        out: list[Proposal] = []
        tried = ctx.tried_hparams()
        for p in offered:
            p = dataclasses.replace(p, hparams=plain(on_grid(p.hparams, space)))
            if all(p.hparams != q.hparams for q in out) and p.hparams not in tried:
                out.append(p)
        return out[:k]

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
               run_dir: Path | None, k: int) -> RunResult:
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
            "finished_at": tree.finished_at,
            "settings": {"k": k, "c_uct": self.c_uct, "margin": tree.margin,
                         "max_children": tree.max_children,
                         "widen_c": self.widen_c, "widen_alpha": self.widen_alpha,
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
    """The search tree: UCT descent with progressive widening, early stopping by depth, and a
    budget guard that finishes one path to the episode's end."""

    root: Node
    max_depth: int                       # the episode's length: nodes this deep are terminal
    c_uct: float = 0.5
    margin: float = math.inf
    max_expansions: int = 1              # proposer calls for one node
    max_children: int = 3                # most children of one node (K per call x calls)
    widen_c: float = 1.0
    widen_alpha: float = 0.4
    nodes: list[Node] = field(default_factory=list)
    best_at_depth: dict[int, float] = field(default_factory=dict)  # the best dev curve
    expansions: list[dict] = field(default_factory=list)  # node, source, children: in order
    finishing: Node | None = None        # the head of the path the budget guard finishes
    finished_at: int | None = None       # nodes in the tree when the guard took over, if it did
    # The budget a node's path needs to end its episode (the guard's measure); None: one unit a
    # stage to `max_depth`.
    need: Callable[[Node], int] | None = None

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
        if parent is self.finishing:
            self.finishing = None if child.terminal else child
        return child

    def width(self, node: Node) -> int:
        """Children `node` may have now: floor(widen_c * visits ** widen_alpha), at least 1, at
        most `max_children`."""
        return max(1, min(self.max_children,
                          math.floor(self.widen_c * node.visits ** self.widen_alpha)))

    def behind(self, node: Node) -> bool:
        """The node's dev score trails the best at its depth by more than the margin."""
        return node.dev_score < self.best_at_depth[node.depth] - self.margin

    def open(self, node: Node) -> bool:
        """The node can still get a child: a proposal waits, or the proposer may be asked."""
        return not node.terminal and bool(node.pending or node.expansions < self.max_expansions)

    def grows(self, node: Node, prune: bool = True, widen: bool = True) -> bool:
        """A child may be added here: open, under its width (its cap when not `widen`), not
        pruned."""
        limit = self.width(node) if widen else self.max_children
        return (self.open(node) and node.state is not None and len(node.children) < limit
                and not (prune and self.behind(node)))

    def reached_end(self) -> bool:
        """Some node ended its episode (its last stage or its token cap: a whole schedule)."""
        return any(n.terminal and not n.failed for n in self.nodes[1:])

    def deepest_open(self) -> Node | None:
        """The open node (with its state) closest to the episode's end; ties: the best dev."""
        found = [n for n in self.nodes if self.open(n) and n.state is not None]
        return max(found, key=lambda n: (n.depth, n.dev_score, -n.id), default=None)

    def release_states(self) -> None:
        """Keep states only where a child may still come; the env frees the others.

        Terminal nodes end the episode, proposer calls are capped, and pruning is final (the best
        curve only rises), so no later stage starts from those; the path the guard may finish is
        kept. The Tracker holds the chosen state.
        """
        keep = {id(self.finishing), id(self.deepest_open())}
        for node in self.nodes:
            if id(node) in keep:
                continue
            if not self.open(node) or self.behind(node):
                node.state = None

    def pruned(self) -> list[Node]:
        """Nodes early stopping keeps from growing (as of now)."""
        return [n for n in self.nodes if self.open(n) and self.behind(n)]

    def select(self, node: Node, prune: bool = True) -> Node | None:
        """The node to grow under `node`: itself when under its width, else the first child in
        UCT order whose subtree has one, else itself past its width (up to its cap) when every
        child's subtree is closed; None if the whole subtree is closed."""
        if node.terminal:
            return None
        if self.grows(node, prune):
            return node
        lo = min(n.dev_score for n in self.nodes)
        hi = max(n.dev_score for n in self.nodes)
        # sorted() is stable: among equal scores the earlier child (higher proposal rank) wins.
        for child in sorted(node.children, key=lambda c: -self.uct(c, node.visits, lo, hi)):
            leaf = self.select(child, prune)
            if leaf is not None:
                return leaf
        return node if self.grows(node, prune, widen=False) else None

    def uct(self, child: Node, parent_visits: int, lo: float, hi: float) -> float:
        value = (child.best - lo) / (hi - lo) if hi > lo else 0.5
        return value + self.c_uct * math.sqrt(math.log(parent_visits) / child.visits)

    def next_leaf(self, remaining: int) -> tuple[Node | None, int]:
        """The node to grow by one stage, and the stages early stopping saved by this choice: 1
        when the same search without early stopping would have grown a pruned node instead.

        With `remaining` budget left and no whole schedule yet, once the deepest open node needs
        it all to reach the episode's end (`need`), that path is finished first, one stage a call.
        """
        if self.finishing is None and not self.reached_end():
            deepest = self.deepest_open()
            if deepest is not None and remaining <= (self.need(deepest) if self.need else
                                                     self.max_depth - deepest.depth):
                self.finishing, self.finished_at = deepest, len(self.nodes)
        if self.finishing is not None:
            if self.open(self.finishing):
                return self.finishing, 0
            self.finishing = None    # its proposals ran out: back to the search
        leaf = self.select(self.root, prune=True)
        naive = self.select(self.root, prune=False)
        if leaf is None:   # only pruned nodes can grow: they get the rest of the budget
            return naive, 0
        saved = 1 if naive is not None and naive is not leaf and self.behind(naive) else 0
        return leaf, saved


def budget_to_end(tracker: Tracker, max_depth: int, node: Node) -> int:
    """What taking `node`'s path on to its episode's end costs of `tracker.remaining`: its stages
    left, each at its last stage's tokens (under a token budget; the episode token cap may end it
    sooner)."""
    left = max_depth - node.depth
    stage = node.tokens - node.parent.tokens if node.parent is not None else 0
    if stage <= 0:
        return left
    cap = tracker.env.unwrapped.episode_token_cap
    if cap is not None:
        left = min(left, max(1, math.ceil((cap - node.tokens) / stage)))
    return left * tracker.units(stage)


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
