"""The LLM client of the LLMZero agent: asks an OpenAI-compatible endpoint for K next stages.

Talks to any chat-completions endpoint (OpenAI, `vllm serve`, Ollama, ...) through the `openai`
client, and copes with what real servers do:
- the reply schema goes in `response_format` (strict JSON schema, grid values as enums); a server
  that refuses it gets plain JSON instructions for the rest of the run;
- the token limit goes as `max_completion_tokens`, or as `max_tokens` where only that works;
- connection errors, 429 and 5xx are retried with exponential backoff (at least Retry-After),
  a timed-out request at most once: a server that hangs fails within one timeout and one retry;
- a reply that is not a chat completion (a proxy's HTML page, a body that is not JSON) is an
  EndpointReplyError naming the URL and the content type;
- replies are read tolerantly and only invalid proposals are dropped (`controllers.llm_prompt`);
  a reply with none usable is re-asked, then the fallback proposer (the skills) answers.
`check()` sends a one-token chat before the run trains anything and names what fails: an
unreachable or hanging server, a rejected key (401, with or without a model), a model it does
not serve, a server error (5xx: the server's fault, not the settings'). Every request, reply and
expansion goes to `<run_dir>/transcript.jsonl`, which `proposer="replay"` re-runs offline.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
from openai.types.chat import ChatCompletion

from controllers.llm_prompt import (
    build_prompt,
    parse_reply,
    reply_schema,
    retry_prompt,
    system_prompt,
)
from controllers.proposers import EXPANSION_EVENT, FALLBACK, LLM, Context, Proposal, Proposer

# Request parameters a server may refuse with a 400, and what the client does instead.
RESPONSE_FORMAT, COMPLETION_LIMIT = "response_format", "max_completion_tokens"
# Seconds and retries unless an argument or the environment says otherwise. The check's worst
# case against a hanging server is two timeouts and one backoff: 2 x 25 + 1 = 51 s.
TIMEOUT, CHECK_TIMEOUT, NETWORK_RETRIES = 120.0, 25.0, 4
TIMEOUT_RETRIES = 1  # a request that timed out is tried once more, never network_retries times
T = TypeVar("T")


class LLMEndpointError(RuntimeError):
    """The endpoint cannot be used (unreachable, rejects the key or the model, no usable reply)."""


class EndpointReplyError(LLMEndpointError):
    """The endpoint answered, but not with a chat completion (e.g. a proxy's HTML page)."""


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


def _setting(value: float | None, variable: str, default: float, low: float, kind: type) -> Any:
    """An argument, else the environment variable, else the default; ValueError naming the
    argument or the variable when it is not a number (`kind`) >= low."""
    noun = "an integer" if kind is int else "a number"
    source = "argument" if value is not None else variable
    if value is None:
        text = os.environ.get(variable)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not {noun}") from None
    whole = kind is not int or (isinstance(value, int | float) and value == int(value))
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            value >= low and whole):
        name = variable.removeprefix("LLMZERO_").lower()
        raise ValueError(f"{name} must be {noun} >= {low:g}, got {value!r} ({source})")
    return kind(value)


def _seconds(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


def _refused(error: openai.APIStatusError, sent: dict) -> str | None:
    """The parameter a 400 refuses, if it is one the client can do without."""
    message = str(error).lower()
    if RESPONSE_FORMAT in sent and ("response_format" in message or "json_schema" in message):
        return RESPONSE_FORMAT
    if COMPLETION_LIMIT in sent and COMPLETION_LIMIT in message:
        return COMPLETION_LIMIT
    return None


def _text(content: str | list) -> str:
    """The text of a message's content (images left out)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _fresh_usage() -> dict[str, int]:
    return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "invalid_replies": 0,
            "dropped_proposals": 0, "network_retries": 0, "fallbacks": 0, "expansions": 0,
            "prompt_chars": 0}


class LLMProposer:
    """Proposes next-stage hyperparameters with an LLM; keeps usage counts and a JSONL transcript.

    `max_retries`: re-asks after a reply with no usable proposal; `network_retries`: retries of a
    failed request (connection errors, 429, 5xx) after `backoff * 2**i` seconds, at most
    `max_backoff`; a request that timed out is retried at most once. `timeout`: seconds one
    request may take; `check_timeout`: the endpoint check's. Unset, these three come from
    LLMZERO_TIMEOUT, LLMZERO_CHECK_TIMEOUT and LLMZERO_NETWORK_RETRIES, else 120 s, 25 s and 4.
    `max_completion_tokens`: the reply's token limit (None: the server's).
    `structured=False` never sends `response_format`. The openai client's own retries are off so
    that every attempt is ours and recorded.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        vision: bool = False,
        structured: bool = True,
        max_retries: int = 2,
        network_retries: int | None = None,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        timeout: float | None = None,
        check_timeout: float | None = None,
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        extra_body: dict | None = None,
        fallback: Proposer | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self.base_url, key, self.model = resolve_endpoint(base_url, api_key, model)
        self.timeout = _setting(timeout, "LLMZERO_TIMEOUT", TIMEOUT, 1e-3, float)
        self.check_timeout = _setting(check_timeout, "LLMZERO_CHECK_TIMEOUT", CHECK_TIMEOUT,
                                      1e-3, float)
        network_retries = _setting(network_retries, "LLMZERO_NETWORK_RETRIES", NETWORK_RETRIES,
                                   0, int)
        self.vision, self.max_retries, self.network_retries = vision, max_retries, network_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_completion_tokens = temperature, max_completion_tokens
        self.extra_body, self.fallback = extra_body, fallback
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # The key lives only inside the client (and is scrubbed from anything we write).
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout
        )
        self.structured = structured
        self._reset()

    def __repr__(self) -> str:
        return (f"LLMProposer(base_url={self.base_url!r}, model={self.model!r}, "
                f"vision={self.vision})")

    # -- a run ------------------------------------------------------------------------------

    def start(self, run_dir: Path | None, seed: int) -> Path:
        """Begin a run: its folder (default runs/llmzero-<time>-seed<seed>), fresh counts, and
        the endpoint check, so that a dead endpoint costs no stage."""
        default = Path("runs") / f"llmzero-{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"
        self.run_dir = run_dir or default
        self._reset()
        self._log({"event": "start", "base_url": self.base_url, "model": self.model,
                   "seed": seed})
        self.check()
        return self.run_dir

    def _reset(self) -> None:
        self.usage = _fresh_usage()
        # Parameters this server refused; not sent again in this run.
        self.refused: set[str] = set() if self.structured else {RESPONSE_FORMAT}

    def cost(self) -> dict[str, int]:
        """What this run paid the endpoint (RunResult.cost keys)."""
        u = self.usage
        return {"llm_calls": u["calls"], "llm_tokens": u["prompt_tokens"] + u["completion_tokens"],
                "llm_prompt_tokens": u["prompt_tokens"],
                "llm_completion_tokens": u["completion_tokens"]}

    # -- the endpoint -------------------------------------------------------------------------

    def check(self, timeout: float | None = None) -> None:
        """A one-token chat with the model (its name asked of /models when none was given);
        LLMEndpointError naming the endpoint and what is wrong. `timeout`: seconds per try
        (default check_timeout); a server that hangs fails after two tries."""
        timeout = self.check_timeout if timeout is None else timeout
        client = self._client.with_options(timeout=timeout, max_retries=0)
        try:
            if self.model is None:
                self.model = self._only_model(client)
            self._chat([{"role": "user", "content": "Reply with OK."}], limit=1, client=client)
        except openai.APITimeoutError:
            tries = 1 + min(TIMEOUT_RETRIES, self.network_retries)
            raise LLMEndpointError(
                f"LLM endpoint {self.base_url} did not answer within {timeout:g} s ({tries} "
                "tries): the server hangs or is overloaded. Check it, or allow it longer with "
                "LLMZERO_CHECK_TIMEOUT (seconds)."
            ) from None
        except openai.APIConnectionError as e:
            raise LLMEndpointError(
                f"LLM endpoint {self.base_url} is unreachable ({type(e).__name__}: {e}). Start the "
                "server or point LLMZERO_BASE_URL at a running OpenAI-compatible endpoint."
            ) from None
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        except openai.APIError as e:
            raise LLMEndpointError(f"LLM endpoint {self.base_url} cannot be used "
                                   f"({type(e).__name__}: {self._scrub(str(e))})") from None

    def _status_error(self, e: openai.APIStatusError) -> LLMEndpointError:
        """The endpoint check's error for an HTTP error status, named for what it is."""
        status, said = e.status_code, self._scrub(str(e))
        where = f"LLM endpoint {self.base_url}"
        if status == 401:
            return LLMEndpointError(f"{where} rejected the API key (HTTP 401: {said}); set "
                                    "LLMZERO_API_KEY (or OPENAI_API_KEY) to a key it accepts.")
        if status == 403:
            return LLMEndpointError(f"{where} refused the request (HTTP 403: {said}): the API "
                                    "key is not allowed to use it; check LLMZERO_API_KEY.")
        if status == 429:
            return LLMEndpointError(f"{where} rate-limited every try (HTTP 429: {said}); wait, "
                                    "or raise the key's rate limit.")
        if status >= 500:
            return LLMEndpointError(f"{where} failed with a server error (HTTP {status}: {said}) "
                                    f"on {1 + self.network_retries} tries. The server itself is "
                                    "at fault: check its logs, or try again later.")
        if status == 404 or "model" in said.lower():
            return LLMEndpointError(f"{where} cannot chat with model {self.model!r} "
                                    f"({type(e).__name__}: {said}); set LLMZERO_MODEL to a "
                                    "model it serves.")
        return LLMEndpointError(f"{where} refused the endpoint check (HTTP {status}: {said}).")

    def _only_model(self, client: openai.OpenAI) -> str:
        """The model of an endpoint that serves exactly one (as `vllm serve` does). A key the
        endpoint rejects or a server error propagates (check names it)."""
        url = f"{self.base_url}/models"
        try:
            raw = self._retrying(client.models.with_raw_response.list)
        except openai.APIStatusError as e:
            if e.status_code in (401, 403, 429) or e.status_code >= 500:
                raise
            raise LLMEndpointError(f"no model given and {url} cannot list the models "
                                   f"(HTTP {e.status_code}: {self._scrub(str(e))}); set "
                                   "LLMZERO_MODEL to the model to use.") from None
        page = self._parsed(raw, url, "a model list")
        served = [m.id for m in getattr(page, "data", None) or [] if getattr(m, "id", None)]
        if len(served) != 1:
            raise LLMEndpointError(f"no model given and {self.base_url} serves {len(served)} "
                                   f"models; set LLMZERO_MODEL (served: {served[:10]}).")
        return served[0]

    def _parsed(self, raw: Any, url: str, what: str) -> Any:
        """The parsed body of a raw response; EndpointReplyError naming the URL and the content
        type when it is not JSON (the openai client would hand back the text, or raise)."""
        content_type = raw.headers.get("content-type") or "no content type"
        parsed = None
        if "json" in content_type.lower():
            try:
                parsed = raw.parse()
            except ValueError:  # JSONDecodeError: a JSON content type with another body
                pass
        if parsed is None or isinstance(parsed, str):
            raise EndpointReplyError(f"{url} answered HTTP {raw.status_code} with content type "
                                     f"{content_type!r}, not {what} in JSON: "
                                     f"{self._snippet(raw)}. Is LLMZERO_BASE_URL the server's "
                                     "OpenAI API (ending in /v1), not a web page or a proxy?")
        return parsed

    def _snippet(self, raw: Any) -> str:
        body = self._scrub(raw.http_response.text.strip())
        return repr(body[:120] + ("..." if len(body) > 120 else ""))

    def _completion(self, raw: Any) -> ChatCompletion:
        """A raw chat response as a ChatCompletion; EndpointReplyError if it is not one."""
        url = f"{self.base_url}/chat/completions"
        response = self._parsed(raw, url, "a chat completion")
        # The client builds its models without validation: a foreign JSON body lacks fields.
        choices = getattr(response, "choices", None)
        if not (isinstance(response, ChatCompletion) and isinstance(choices, list)
                and all(hasattr(c, "message") for c in choices)):
            content_type = raw.headers.get("content-type") or "no content type"
            raise EndpointReplyError(f"{url} answered with content type {content_type!r}, but "
                                     "not a chat completion (no 'choices' with a 'message'): "
                                     f"{self._snippet(raw)}")
        return response

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
            f.write(self._scrub(json.dumps(record, default=str)) + "\n")

    def _request(self, kwargs: dict, client: openai.OpenAI) -> ChatCompletion:
        """One completion, retrying transient failures (see _retrying)."""
        create = client.chat.completions.with_raw_response.create
        return self._retrying(lambda: self._completion(create(**kwargs)))

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, retrying transient failures with exponential backoff (a timeout at most
        TIMEOUT_RETRIES times: a server that hangs would hang again)."""
        timeouts = 0
        for attempt in range(self.network_retries + 1):
            try:
                return call()
            except (openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as e:
                timeouts += isinstance(e, openai.APITimeoutError)
                if attempt == self.network_retries or timeouts > TIMEOUT_RETRIES:
                    raise
                delay = self.backoff * 2**attempt
                if isinstance(e, openai.APIStatusError):  # a 429 may say how long to wait
                    delay = max(delay, _seconds(e.response.headers.get("retry-after")))
                delay = min(delay, self.max_backoff)
                self.usage["network_retries"] += 1
                self._log({"event": "network_error", "error": f"{type(e).__name__}: {e}",
                           "retry_in_s": delay})
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _chat(self, messages: list[dict], limit: int | None = None, schema: dict | None = None,
              client: openai.OpenAI | None = None) -> str:
        """The content of one reply; drops a parameter the server refuses and asks again."""
        while True:
            kwargs: dict = {"model": self.model, "messages": messages}
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            if limit is not None:
                legacy = COMPLETION_LIMIT in self.refused
                kwargs["max_tokens" if legacy else COMPLETION_LIMIT] = limit
            if schema is not None and RESPONSE_FORMAT not in self.refused:
                kwargs[RESPONSE_FORMAT] = {"type": "json_schema", "json_schema": {
                    "name": "proposals", "strict": True, "schema": schema}}
            if self.extra_body:
                kwargs["extra_body"] = self.extra_body
            try:
                response = self._request(kwargs, client or self._client)
                break
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                refused = _refused(e, kwargs)
                if refused is None:
                    raise
                self.refused.add(refused)
                self._log({"event": "refused", "parameter": refused,
                           "error": f"{type(e).__name__}: {e}"})
        return self._account(response, messages)

    def _account(self, response: Any, messages: list[dict]) -> str:
        # Only `content`: `reasoning_content` holds thoughts, never the answer.
        self.usage["calls"] += 1
        text = (response.choices[0].message.content or "") if response.choices else ""
        if response.usage is not None:
            self.usage["prompt_tokens"] += response.usage.prompt_tokens or 0
            self.usage["completion_tokens"] += response.usage.completion_tokens or 0
        else:  # some servers omit usage: estimate ~4 characters per token rather than count 0
            self.usage["prompt_tokens"] += math.ceil(len(json.dumps(messages)) / 4)
            self.usage["completion_tokens"] += math.ceil(len(text) / 4)
        return text

    # -- proposing ----------------------------------------------------------------------------

    def _messages(self, ctx: Context, space: Any, k: int) -> tuple[list[dict], bytes | None]:
        text = build_prompt(ctx, space, k)
        content: str | list = text
        png = ctx.plot() if self.vision and ctx.plot is not None else None
        if png is not None:
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            content = [{"type": "text", "text": text},
                       {"type": "image_url", "image_url": {"url": url}}]
        messages = [{"role": "system", "content": system_prompt(space)},
                    {"role": "user", "content": content}]
        return messages, png

    def _loggable(self, messages: list[dict], png: bytes | None, name: str) -> list[dict]:
        """Messages for the transcript, the image saved beside it as a PNG instead of base64."""
        if png is None:
            return messages
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / name).write_bytes(png)
        image = {"type": "image_url", "image_url": {"url": name}}
        return [{**m, "content": [p if p["type"] == "text" else image for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in messages]

    def propose(self, ctx: Context, space: Any, k: int) -> list[Proposal]:
        """Up to k new next-stage settings from `ctx`'s node; the fallback's if none is usable."""
        expansion = self.usage["expansions"]
        self.usage["expansions"] += 1
        messages, png = self._messages(ctx, space, k)
        self.usage["prompt_chars"] += sum(len(_text(m["content"])) for m in messages)
        logged = self._loggable(messages, png, f"curves_{expansion:04d}_node{ctx.node_id}.png")
        base = {"expansion": expansion, "node": ctx.node_id}
        reason = ""
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._chat(messages, limit=self.max_completion_tokens,
                                   schema=reply_schema(space))
            except (openai.APIError, EndpointReplyError) as e:  # retries spent, or not transient
                reason = f"request failed: {type(e).__name__}: {e}"
                break
            try:
                parsed = parse_reply(reply, ctx, space, k)
                error = parsed.error if not parsed.proposals else None
            except ValueError as e:
                parsed, error = None, str(e)
            dropped = parsed.dropped if parsed is not None else []
            self.usage["dropped_proposals"] += len(dropped)
            self._log({**base, "event": "chat", "attempt": attempt, "reply": reply,
                       "dropped": dropped, "error": error,
                       "messages": logged + messages[len(logged):]})
            if error is None:
                proposals = [Proposal(h, LLM, r) for h, r in parsed.proposals]
                self._expansion(base, LLM, proposals, diagnosis=parsed.diagnosis)
                return proposals
            self.usage["invalid_replies"] += 1
            reason = f"invalid reply: {error}"
            messages = messages + [{"role": "assistant", "content": reply},
                                   {"role": "user", "content": retry_prompt(error)}]
        return self._fall_back(ctx, space, k, base, reason)

    def _fall_back(self, ctx: Context, space: Any, k: int, base: dict,
                   reason: str) -> list[Proposal]:
        if self.fallback is None:
            raise LLMEndpointError(f"no usable reply for node {ctx.node_id}: {self._scrub(reason)}")
        self.usage["fallbacks"] += 1
        proposals = [dataclasses.replace(p, source=FALLBACK)
                     for p in self.fallback.propose(ctx, space, k)]
        self._expansion(base, FALLBACK, proposals, reason=reason)
        return proposals

    def _expansion(self, base: dict, source: str, proposals: list[Proposal], **why: str) -> None:
        self._log({**base, "event": EXPANSION_EVENT, "source": source, **why,
                   "proposals": [p.record() for p in proposals]})
