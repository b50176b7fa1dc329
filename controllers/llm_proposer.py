"""The LLM proposer of the LLMZero agent: diagnose a checkpoint, propose K next-stage settings.

Talks to any OpenAI-compatible chat-completions endpoint (OpenAI, `vllm serve`, ...) through the
`openai` client. Replies are JSON validated against REPLY_SCHEMA and the env's grid; an invalid
reply is retried with the error, then a fallback proposer (the skills) takes over.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import openai

# Shown to the model in the system prompt and checked on every reply.
REPLY_SCHEMA: dict = {
    "type": "object",
    "required": ["diagnosis", "proposals"],
    "properties": {
        "diagnosis": {"type": "string"},
        "proposals": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["hparams", "rationale"],
                "properties": {"hparams": {"type": "object"}, "rationale": {"type": "string"}},
            },
        },
    },
}

# The metrics shown per stage; the rest of TRL's metrics add tokens but little signal.
PROMPT_METRICS = (
    "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
    "grad_norm", "completions/mean_length", "completions/clipped_ratio",
)

SYSTEM_PROMPT = """\
You are an expert in reinforcement-learning post-training of language models with GRPO. You steer \
a training run stage by stage: at each checkpoint you diagnose the training dynamics from the \
per-stage metrics (and the training-curve plot when given) and propose the hyperparameters of the \
next stage. Watch for pathologies such as entropy collapse, KL blow-up, reward plateaus, \
truncated completions and groups with zero reward variance. Capacity parameters \
(max_completion_length, num_generations) usually grow across stages; regularization parameters \
(learning_rate, beta, epsilon, temperature) move in either direction in response to the \
dynamics. Propose coordinated changes of several parameters, each with a short rationale.
Reply with only one JSON object, no prose around it, that follows this JSON schema:
{schema}"""


class LLMEndpointError(RuntimeError):
    """The endpoint cannot be used (unreachable, rejects the key, no model to use)."""


@dataclass
class Context:
    """What a proposer sees of the node it expands; built by the tree search."""

    task: str
    stage: int                      # stages trained from the root to this node
    max_stages: int                 # episode length: the deepest a node can be
    path: list[dict]                # root->node per stage: hparams, dev_score, metrics, pathologies
    hparams: dict                   # the hyperparameters in force at this node
    pathologies: list[str]          # detected at this node
    siblings: list[dict] = field(default_factory=list)  # parent's other children: hparams, dev
    tried: list[dict] = field(default_factory=list)     # hparams already tried from this node
    base_dev_score: float = 0.0
    node_id: int = 0
    plot_png: bytes | None = None   # the training curves of the path, for vision models
    state_summary: Any = None       # what the skills proposer reads, for the fallback


class Proposer(Protocol):
    def propose(self, ctx: Context, space: Any, k: int) -> list[dict]: ...


def resolve_endpoint(
    base_url: str | None, api_key: str | None, model: str | None
) -> tuple[str, str, str | None]:
    """Arguments first, then LLMZERO_* then OPENAI_* variables; vLLM takes any key ("EMPTY")."""
    env = os.environ
    base_url = (base_url or env.get("LLMZERO_BASE_URL") or env.get("OPENAI_BASE_URL")
                or "https://api.openai.com/v1")
    api_key = api_key or env.get("LLMZERO_API_KEY") or env.get("OPENAI_API_KEY") or "EMPTY"
    model = model or env.get("LLMZERO_MODEL") or env.get("OPENAI_MODEL")
    return base_url.rstrip("/"), api_key, model


# ---------------------------------------------------------------------------------------------
# Validation: a small interpreter for the subset of JSON schema used by REPLY_SCHEMA.

_JSON_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float)}


def check_schema(value: Any, schema: dict, where: str = "reply") -> None:
    """Raise ValueError naming the first place where `value` breaks `schema`."""
    expected = schema.get("type")
    if expected and not isinstance(value, _JSON_TYPES[expected]):
        raise ValueError(f"{where} must be a JSON {expected}, got {type(value).__name__}")
    for key in schema.get("required", ()):
        if key not in value:
            raise ValueError(f"{where} is missing the required key {key!r}")
    for key, sub in schema.get("properties", {}).items():
        if key in value:
            check_schema(value[key], sub, f"{where}.{key}")
    if expected == "array":
        if len(value) < schema.get("minItems", 0):
            raise ValueError(f"{where} needs at least {schema['minItems']} item(s)")
        for i, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{where}[{i}]")


def extract_json(text: str) -> Any:
    """Parse the JSON object of a reply; tolerates <think> blocks, code fences, prose around it."""
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.DOTALL).strip()
    candidates = [text]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1))
    if "{" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1])
    error = None
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as e:
            error = e
    raise ValueError(f"reply is not valid JSON ({error})")


def _seconds(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


def _number(value: Any) -> Any:
    # Models sometimes quote numbers ("3e-5"); the grid holds numbers.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def on_grid(hparams: dict, space: Any) -> dict:
    """The full hparam dict snapped through the grid; ValueError naming a bad parameter."""
    unknown = sorted(set(hparams) - set(space.names))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; allowed: {list(space.names)}")
    hparams = {name: _number(value) for name, value in hparams.items()}
    try:
        return space.decode(space.encode(hparams))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(str(e)) from None


def parse_reply(text: str, ctx: Context, space: Any, k: int) -> tuple[str, list[dict]]:
    """(diagnosis, up to k new full hparam dicts) of a reply, or ValueError saying what is wrong."""
    reply = extract_json(text)
    check_schema(reply, REPLY_SCHEMA)
    seen = [on_grid(h, space) for h in ctx.tried]
    proposals = []
    for i, proposal in enumerate(reply["proposals"]):
        try:
            hparams = on_grid({**ctx.hparams, **proposal["hparams"]}, space)
        except ValueError as e:
            raise ValueError(f"reply.proposals[{i}].hparams: {e}") from None
        if hparams not in seen:  # repeats of tried settings would waste a stage
            seen.append(hparams)
            proposals.append(hparams)
    if not proposals:
        raise ValueError("every proposal repeats a setting already tried from this checkpoint")
    return reply["diagnosis"], proposals[:k]


# ---------------------------------------------------------------------------------------------
# The prompt.

def summarize_metrics(metrics: list[dict]) -> str:
    """One line per stage: first -> last (mean) of the metrics worth showing."""
    parts = []
    for name in PROMPT_METRICS:
        values = [m[name] for m in metrics if isinstance(m.get(name), int | float)]
        if values:
            mean = sum(values) / len(values)
            parts.append(f"{name} {values[0]:.3g}->{values[-1]:.3g} ({mean:.3g})")
    return "; ".join(parts) or "no metrics"


def _text(content: str | list) -> str:
    """The text of a message's content (images left out)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _changes(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if before.get(k) != v}


def build_prompt(ctx: Context, space: Any, k: int) -> str:
    """The user message: task, grid, path from the root, siblings, pathologies, the request."""
    lines = [
        f"Task: {ctx.task}. Objective: the highest dev score (accuracy in [0, 1]) at any "
        f"checkpoint. This checkpoint has trained {ctx.stage} of at most {ctx.max_stages} stages.",
        "",
        "Hyperparameter grid (use only these values):",
    ]
    lines += [f"  {name}: {json.dumps(list(space.grids[name]))}" for name in space.names]
    lines += ["", "Path from the base model (hyperparameters: the changes of each stage):",
              f"  base model: dev {ctx.base_dev_score:.3f}"]
    previous: dict = {}
    for i, stage in enumerate(ctx.path, 1):
        changed = stage["hparams"] if i == 1 else _changes(previous, stage["hparams"])
        lines.append(f"  stage {i}: {json.dumps(changed)} -> dev {stage['dev_score']:.3f}")
        lines.append(f"    metrics first->last (mean): {summarize_metrics(stage['metrics'])}")
        if stage.get("pathologies"):
            lines.append(f"    pathologies: {', '.join(stage['pathologies'])}")
        previous = stage["hparams"]
    lines += ["", f"Current hyperparameters: {json.dumps(ctx.hparams)}",
              f"Pathologies at this checkpoint: {', '.join(ctx.pathologies) or 'none detected'}"]
    if ctx.siblings:
        lines += ["", "Alternatives tried from the previous checkpoint (siblings of this one):"]
        for sib in ctx.siblings:
            flags = f" [{', '.join(sib['pathologies'])}]" if sib.get("pathologies") else ""
            lines.append(f"  {json.dumps(_changes(ctx.hparams, sib['hparams']))} "
                         f"-> dev {sib['dev_score']:.3f}{flags}")
    if ctx.tried:
        lines += ["", "Already tried from this checkpoint (do not repeat):"]
        lines += [f"  {json.dumps(_changes(ctx.hparams, h))}" for h in ctx.tried]
    lines += ["", f"Diagnose this checkpoint, then propose {k} distinct settings for the next "
              "stage. In each proposal's \"hparams\" give only the parameters you change; the "
              "others keep their current values."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

class LLMProposer:
    """Proposes next-stage hyperparameters with an LLM; keeps usage counts and a JSONL transcript.

    `max_retries`: re-asks after an invalid reply; `network_retries`: retries of a failed request
    (connection errors, 429, 5xx) with exponential backoff `backoff * 2**i`, capped at `max_backoff`
    seconds. The openai client's own retries are off so that every attempt is ours and recorded.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        vision: bool = False,
        max_retries: int = 2,
        network_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        timeout: float = 120.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        extra_body: dict | None = None,
        fallback: Proposer | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self.base_url, key, self.model = resolve_endpoint(base_url, api_key, model)
        self.vision, self.max_retries, self.network_retries = vision, max_retries, network_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_tokens, self.extra_body = temperature, max_tokens, extra_body
        self.fallback = fallback
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # The key lives only inside the client (and is scrubbed from anything we write).
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout
        )
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0,
                      "invalid_replies": 0, "network_retries": 0, "fallbacks": 0,
                      "expansions": 0, "prompt_chars": 0}
        self.last_source = "llm"  # who made the last proposals: "llm" or the fallback "skills"

    def __repr__(self) -> str:
        return (f"LLMProposer(base_url={self.base_url!r}, model={self.model!r}, "
                f"vision={self.vision})")

    # -- the endpoint -------------------------------------------------------------------------

    def check(self, timeout: float = 10.0) -> list[str]:
        """Probe the endpoint (GET /models); a clear LLMEndpointError if it cannot be used."""
        client = self._client.with_options(timeout=timeout, max_retries=0)
        try:
            served = [m.id for m in client.models.list()]
        except openai.APIConnectionError as e:
            raise LLMEndpointError(
                f"LLM endpoint {self.base_url} is unreachable ({type(e).__name__}: {e}). Start the "
                "server or point LLMZERO_BASE_URL at a running OpenAI-compatible endpoint."
            ) from None
        except openai.AuthenticationError:
            raise LLMEndpointError(
                f"LLM endpoint {self.base_url} rejected the API key (HTTP 401); "
                "set LLMZERO_API_KEY."
            ) from None
        except openai.APIStatusError:
            served = []  # it answers but lists no models; the first chat request will tell
        if self.model is None:
            if len(served) != 1:
                raise LLMEndpointError(
                    f"no model given and {self.base_url} serves {len(served)} models; set "
                    f"LLMZERO_MODEL (served: {served[:10]})."
                )
            self.model = served[0]  # a `vllm serve` endpoint has exactly one
        elif served and self.model not in served:
            warnings.warn(f"{self.model!r} is not listed by {self.base_url}", stacklevel=2)
        return served

    def _scrub(self, text: str) -> str:
        # Servers may echo the key in an error message. Placeholder keys ("EMPTY", "x") are too
        # short to be secrets, and replacing them would garble the transcript.
        key = self._client.api_key
        return text.replace(key, "***") if key and len(key) >= 8 else text

    def _log(self, record: dict) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "transcript.jsonl", "a") as f:
            f.write(self._scrub(json.dumps(record)) + "\n")

    def _chat(self, messages: list[dict]) -> str:
        """One completion, retrying transient failures with exponential backoff."""
        kwargs: dict = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        for attempt in range(self.network_retries + 1):
            try:
                response = self._client.chat.completions.create(**kwargs)
                break
            except (openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as e:
                if attempt == self.network_retries:
                    raise
                delay = self.backoff * 2**attempt
                if isinstance(e, openai.APIStatusError):  # a 429 may say how long to wait
                    delay = max(delay, _seconds(e.response.headers.get("retry-after")))
                delay = min(delay, self.max_backoff)
                self.usage["network_retries"] += 1
                self._log({"event": "network_error", "error": f"{type(e).__name__}: {e}",
                           "retry_in_s": delay})
                time.sleep(delay)
        self.usage["requests"] += 1
        text = (response.choices[0].message.content or "") if response.choices else ""
        if response.usage is not None:
            self.usage["prompt_tokens"] += response.usage.prompt_tokens or 0
            self.usage["completion_tokens"] += response.usage.completion_tokens or 0
        else:  # some servers omit usage: estimate ~4 characters per token rather than count 0
            self.usage["prompt_tokens"] += math.ceil(len(json.dumps(messages)) / 4)
            self.usage["completion_tokens"] += math.ceil(len(text) / 4)
        return text

    # -- proposing ----------------------------------------------------------------------------

    def _messages(self, ctx: Context, space: Any, k: int) -> list[dict]:
        text = build_prompt(ctx, space, k)
        content: str | list = text
        if self.vision and ctx.plot_png:
            url = "data:image/png;base64," + base64.b64encode(ctx.plot_png).decode()
            content = [{"type": "text", "text": text},
                       {"type": "image_url", "image_url": {"url": url}}]
        system = SYSTEM_PROMPT.format(schema=json.dumps(REPLY_SCHEMA))
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def _loggable(self, messages: list[dict], ctx: Context, expansion: int) -> list[dict]:
        """Messages for the transcript, the image saved beside it as a PNG instead of base64."""
        if not (self.vision and ctx.plot_png):
            return messages
        name = f"curves_{expansion:04d}_node{ctx.node_id}.png"
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / name).write_bytes(ctx.plot_png)
        out = []
        for m in messages:
            if isinstance(m["content"], list):
                m = {**m, "content": [p if p["type"] == "text" else {"type": "image_url",
                                                                     "image_url": {"url": name}}
                                      for p in m["content"]]}
            out.append(m)
        return out

    def propose(self, ctx: Context, space: Any, k: int) -> list[dict]:
        """Up to k new full hyperparameter dicts for the next stage from `ctx`'s node."""
        expansion = self.usage["expansions"]
        self.usage["expansions"] += 1
        messages = self._messages(ctx, space, k)
        self.usage["prompt_chars"] += sum(len(_text(m["content"])) for m in messages)
        base = {"expansion": expansion, "node": ctx.node_id}
        reason = ""
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._chat(messages)
            except openai.APIError as e:  # retries spent, or a non-transient HTTP error
                reason = f"request failed: {type(e).__name__}: {e}"
                break
            record = {**base, "event": "chat", "attempt": attempt,
                      "messages": self._loggable(messages, ctx, expansion), "reply": reply}
            try:
                diagnosis, proposals = parse_reply(reply, ctx, space, k)
            except ValueError as e:
                self.usage["invalid_replies"] += 1
                reason = f"invalid reply: {e}"
                self._log({**record, "error": str(e)})
                messages = messages + [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"Your reply was invalid: {e}. Reply again with "
                     "only the JSON object, following the schema and the grid."},
                ]
                continue
            self._log({**record, "error": None})
            self._log({**base, "event": "accepted", "source": "llm", "diagnosis": diagnosis,
                       "proposals": proposals})
            self.last_source = "llm"
            return proposals
        if self.fallback is None:
            raise LLMEndpointError(f"no usable reply for node {ctx.node_id}: {self._scrub(reason)}")
        self.usage["fallbacks"] += 1
        self.last_source = "skills"
        proposals = self.fallback.propose(ctx, space, k)
        self._log({**base, "event": "fallback", "source": "skills", "reason": reason,
                   "proposals": proposals})
        return proposals
