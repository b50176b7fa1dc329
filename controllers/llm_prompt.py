"""What the LLM proposer says to the model, and how it reads the reply.

The reply contract is ``{"diagnosis": str, "proposals": [{"hparams": {...}, "rationale": str}]}``;
within ``hparams`` a missing name keeps its value at the checkpoint. `reply_schema` is the same
contract with every grid's values as enums, for servers that take structured outputs.
`parse_reply` reads a reply the way real servers send it (thoughts before a bare ``</think>``,
code fences, text after the JSON) and drops only the proposals that are invalid.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from controllers.proposers import Context, on_grid
from metaenv import pathologies

# Shown per stage as first / last / min / max over its steps.
TREND_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "entropy", "kl",
                 "completions/clipped_ratio", "completions/mean_length")
SAMPLE_CHARS = 300  # a dev sample's prompt or completion is cut to this many characters

# What each hyperparameter does (never which way it should move).
HPARAM_EFFECTS = {
    "learning_rate": "AdamW step size of each policy update",
    "beta": "weight of the KL penalty to the base (reference) model; 0 turns it off",
    "epsilon": "clip range of the policy-probability ratio: below 1 - epsilon it is clipped",
    "epsilon_high": "upper clip of the ratio, 1 + epsilon_high (unset: epsilon)",
    "temperature": "sampling temperature of the training completions (dev is decoded greedily)",
    "top_p": "nucleus-sampling mass of the training completions",
    "num_generations": "completions sampled per prompt: the group whose rewards are normalised "
                       "into advantages",
    "prompts_per_step": "distinct prompts per training step",
    "max_completion_length": "token limit of a training completion; one that reaches it is cut",
    "loss_type": "how token losses are averaged: grpo per sequence, dapo per token, dr_grpo by "
                 "a constant",
    "scale_rewards": "what advantages are divided by: the group's reward std, the batch's, none",
    "num_iterations": "optimizer updates per sampled batch",
    "max_grad_norm": "gradient-norm clip",
    "weight_decay": "AdamW weight decay",
    "difficulty": "level of the training problems (dev is always at the task's default level)",
}

SYSTEM_PROMPT = """\
You steer the GRPO post-training of a language model, one stage at a time. A stage trains a fixed \
number of steps from a saved checkpoint with the hyperparameters you choose, then scores the model \
on a dev set (greedy decoding, accuracy in [0, 1]). Every checkpoint is kept, so the search can \
train any of them further. The result is the checkpoint with the highest dev score among those \
that ended an episode (its last stage, or its episode token cap), when the budget is spent.

What each hyperparameter does:
{effects}

Pathology detectors, run on every stage (a stage lists the ones that fired):
{detectors}

At a checkpoint, diagnose the training dynamics from its metrics and samples, then propose \
settings for the next stage, each with a short rationale.
Reply with only one JSON object, no text around it:
{contract}
"hparams" maps each hyperparameter to one of its grid values; a name you leave out keeps its \
value at the checkpoint."""

CONTRACT = ('{"diagnosis": "<string>", "proposals": [{"hparams": {"<name>": <value>, ...}, '
            '"rationale": "<string>"}, ...]}')


def system_prompt(space: Any) -> str:
    effects = "\n".join(f"- {name}: {HPARAM_EFFECTS.get(name, 'see its grid')}"
                        for name in space.names)
    detectors = "\n".join(f"- {d.describe()}" for d in pathologies.DETECTORS)
    return SYSTEM_PROMPT.format(effects=effects, detectors=detectors, contract=CONTRACT)


def retry_prompt(error: str) -> str:
    """The re-ask after a reply without one usable proposal, in the model's terms."""
    return (f"No proposal in your reply could be used: {error}. Reply again with only the JSON "
            f"object {CONTRACT}, with values from the grid.")


# ---------------------------------------------------------------------------------------------
# The reply: its schema, its models, and tolerant parsing.

def _number(value: Any) -> Any:
    # Models sometimes quote numbers ("3e-5"); the grids hold numbers.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


_STRICT = ConfigDict(extra="forbid")


class _Envelope(BaseModel):
    diagnosis: str = ""
    proposals: list[Any] = Field(min_length=1)


class _Item(BaseModel):
    hparams: dict[str, Any]
    rationale: str = ""


@functools.lru_cache(maxsize=16)
def _models(grids: tuple[tuple[str, tuple], ...]) -> tuple[type[BaseModel], dict]:
    """The per-grid hparams model (values as Literal enums) and the strict reply JSON schema."""
    fields = {name: (Annotated[Literal[values], BeforeValidator(_number)], ...)
              for name, values in grids}
    hparams = create_model("HParams", __config__=_STRICT, **fields)
    proposal = create_model("Proposal", __config__=_STRICT, hparams=(hparams, ...),
                            rationale=(str, ...))
    reply = create_model("Reply", __config__=_STRICT, diagnosis=(str, ...),
                         proposals=(list[proposal], ...))
    return hparams, reply.model_json_schema()


def _grid_key(space: Any) -> tuple[tuple[str, tuple], ...]:
    return tuple((name, tuple(space.grids[name])) for name in space.names)


def reply_schema(space: Any) -> dict:
    """The reply's JSON schema for `response_format` (strict: every name, grid values as enums)."""
    return _models(_grid_key(space))[1]


def extract_json(text: str) -> Any:
    """The reply's JSON value: after the last ``</think>``, the first complete JSON object.

    Tries ``raw_decode`` from each ``{`` (so fences and text around it do not matter) and prefers
    an object with "proposals" over any earlier one (a thought that quotes a setting).
    """
    text = (text or "").rsplit("</think>", 1)[-1]
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and "proposals" in value:
            return value
        found.append(value)
        start = text.find("{", end)
    if found:
        return found[0]
    raise ValueError("the reply holds no complete JSON object")


# pydantic's wording where it would name our classes or echo a whole object.
_PLAIN = {"extra_forbidden": "not a hyperparameter of this run", "missing": "missing",
          "model_type": "must be a JSON object", "dict_type": "must be a JSON object"}


def _errors(e: ValidationError, where: str) -> str:
    """pydantic's errors in the reply's own terms: where in the JSON, and what is wrong."""
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join([where, *map(str, err["loc"])]).strip(".") or "the reply"
        got = json.dumps(err.get("input"), default=str)
        if err["type"] in _PLAIN:
            parts.append(f"{loc}: {_PLAIN[err['type']]}"
                         + (f" (got {got})" if err["type"].endswith("_type") else ""))
        else:
            parts.append(f"{loc}: {err['msg']} (got {got})")
    return "; ".join(parts)


@dataclass
class ParsedReply:
    diagnosis: str = ""
    proposals: list[tuple[dict, str]] = field(default_factory=list)  # (full hparams, rationale)
    dropped: list[str] = field(default_factory=list)                # why each invalid one went

    @property
    def error(self) -> str:
        return "; ".join(self.dropped)


def parse_reply(text: str, ctx: Context, space: Any, k: int) -> ParsedReply:
    """The usable proposals of a reply (full hparam dicts on the grid, at most k) and why the
    others were dropped; ValueError when the reply itself breaks the contract."""
    try:
        envelope = _Envelope.model_validate(extract_json(text))
    except ValidationError as e:
        raise ValueError(_errors(e, "")) from None
    hparams_model = _models(_grid_key(space))[0]
    seen = [on_grid(h, space) for h in ctx.tried_hparams()]
    out = ParsedReply(envelope.diagnosis)
    for i, raw in enumerate(envelope.proposals):
        where = f"proposals[{i}]"
        try:
            item = _Item.model_validate(raw)
            where += ".hparams"
            full = hparams_model.model_validate({**ctx.hparams, **item.hparams}).model_dump()
        except ValidationError as e:
            out.dropped.append(_errors(e, where))
            continue
        hparams = on_grid(full, space)
        if hparams in seen:  # a repeat would spend a stage to learn nothing
            out.dropped.append(f"{where}: repeats a setting already tried from this checkpoint")
            continue
        seen.append(hparams)
        out.proposals.append((hparams, item.rationale))
    out.proposals = out.proposals[:k]
    return out


# ---------------------------------------------------------------------------------------------
# The user message.

def _changes(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if before.get(k) != v}


def _stage_changes(path: list[dict]) -> list[dict]:
    """Each stage's hyperparameters as its changes to the stage before (the first in full)."""
    return [hp if i == 0 else _changes(path[i - 1], hp) for i, hp in enumerate(path)]


def _trends(metrics: list[dict]) -> list[str]:
    """A first / last / min / max table of the trend metrics over a stage's steps."""
    rows = []
    for name in TREND_METRICS:
        values = [float(m[name]) for m in metrics if isinstance(m.get(name), int | float)]
        if values:
            cells = (values[0], values[-1], min(values), max(values))
            rows.append(f"      {name:<26}" + "".join(f"{v:>9.3g}" for v in cells))
    if not rows:
        return ["    no metrics (the stage failed before logging any)"]
    return [f"      {'metric':<26}{'first':>9}{'last':>9}{'min':>9}{'max':>9}", *rows]


def _flags(pathologies: list[str]) -> str:
    return f" [{', '.join(pathologies)}]" if pathologies else ""


def _describe(pathology: str) -> str:
    row = pathologies.detector(pathology)
    return row.describe() if row is not None else f"`{pathology}`"


def _outcomes(ctx: Context, nodes: list[dict]) -> list[str]:
    return [f"  {json.dumps(_changes(ctx.hparams, n['hparams']))} -> dev {n['dev_score']:.3f}"
            f"{_flags(n.get('pathologies', []))}" for n in nodes]


def _cut(text: str) -> str:
    return json.dumps(text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "...")


def _header(ctx: Context) -> list[str]:
    where = ("the base model, no stage trained yet" if ctx.stage == 0
             else f"after stage {ctx.stage}")
    lines = [f"Task: {ctx.task}. This checkpoint (node {ctx.node_id}) is {where}; an episode has "
             f"at most {ctx.max_stages} stages"
             + (f" of {ctx.steps_per_stage} training steps each." if ctx.steps_per_stage else ".")]
    if ctx.remaining_stages is not None:
        tokens = (f" and {ctx.tokens_left:,} training tokens" if ctx.tokens_left is not None
                  else "")
        lines.append(f"Budget left: {ctx.remaining_stages} stages{tokens}; each proposal trained "
                     "costs one stage.")
    if ctx.dev_size:
        n, score = ctx.dev_size, ctx.path[-1]["dev_score"] if ctx.path else ctx.base_dev_score
        p = min(max(score, 1 / n), 1 - 1 / n)  # one item either way: a score of 0 is noisy too
        se = math.sqrt(p * (1 - p) / n)
        lines.append(f"Dev set: {n} problems; one problem weighs {1 / n:.4g} of the dev score "
                     f"(binomial standard error near {score:.3f}: {se:.3f}).")
    if ctx.best is not None:
        steps = [json.dumps(c) for c in _stage_changes(ctx.best["path"])]
        route = " -> ".join(steps) if steps else "the base model itself"
        lines.append(f"Best dev score in the tree: {ctx.best['dev_score']:.3f} at node "
                     f"{ctx.best['node']}, reached by: {route}.")
    return lines


def _path(ctx: Context) -> list[str]:
    lines = ["Path from the base model (each stage's changes, dev score, metrics over its steps):",
             f"  base model: dev {ctx.base_dev_score:.3f}"]
    changes = _stage_changes([stage["hparams"] for stage in ctx.path])
    for i, (stage, changed) in enumerate(zip(ctx.path, changes, strict=True), 1):
        lines.append(f"  stage {i}: {json.dumps(changed)} -> dev {stage['dev_score']:.3f}"
                     f"{_flags(stage.get('pathologies', []))}")
        lines += _trends(stage["metrics"])
    return lines


def _samples(ctx: Context) -> list[str]:
    if not ctx.samples:
        return []
    of = f" of {ctx.dev_size}" if ctx.dev_size else ""
    lines = [f"Dev samples of this checkpoint ({len(ctx.samples)}{of}, greedy):"]
    for s in ctx.samples:
        mark = "correct" if s.get("correct") else "wrong"
        parts = " ".join(f"{key} {_cut(str(s.get(key, '')))}"
                         for key in ("prompt", "completion", "answer"))
        lines.append(f"  [{mark}] {parts}")
    return lines


def build_prompt(ctx: Context, space: Any, k: int) -> str:
    """The user message: budget, dev set, best so far, grid, path with trends, detectors that
    fired, dev samples, siblings, earlier proposals from this checkpoint, and the request."""
    lines = [*_header(ctx), "", "Hyperparameter grid (use only these values):"]
    lines += [f"  {name}: {json.dumps(list(space.grids[name]))}" for name in space.names]
    lines += ["", f"Hyperparameters at this checkpoint: {json.dumps(ctx.hparams)}", "", *_path(ctx)]
    lines += ["", "Detectors fired at this checkpoint:" + ("" if ctx.pathologies else " none")]
    lines += [f"  - {_describe(name)}" for name in ctx.pathologies]
    if ctx.samples:
        lines += ["", *_samples(ctx)]
    if ctx.siblings:
        lines += ["", "Other stages trained from the previous checkpoint (changes to this one's "
                  "hyperparameters):", *_outcomes(ctx, ctx.siblings)]
    if ctx.tried:
        lines += ["", "Already tried from this checkpoint (changes; do not repeat them):",
                  *_outcomes(ctx, ctx.tried)]
    lines += ["", f"Diagnose this checkpoint, then propose {k} distinct settings for the next "
              "stage."]
    return "\n".join(lines)
