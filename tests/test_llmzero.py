"""LLMZero: the LLM proposer against a local OpenAI-compatible server that answers the way real
servers do (one test per quirk), the tree search, the fallback cap and the replay."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from openai_server import (
    MAX_TOKENS_REFUSED,
    Fail,
    Hang,
    OpenAIServer,
    Raw,
    Reply,
    approx_tokens,
    message_text,
)

import controllers
import metaenv  # noqa: F401  (registers the env ids)
from controllers.llm_prompt import HPARAM_EFFECTS, build_prompt, reply_schema, system_prompt
from controllers.llm_proposer import (
    TIMEOUT_RETRIES,
    EndpointReplyError,
    LLMEndpointError,
    LLMProposer,
)
from controllers.llmzero import LLMZero, Node, Tree
from controllers.proposers import FALLBACK, LLM, Context, SkillProposer
from controllers.skills import StateSummary
from inner.models import tiny_gpt2
from inner.tokenizer import build_char_tokenizer
from metaenv import pathologies as P
from metaenv.hparams import build_hparam_space

FAKE_KEY = "sk-test-LLMZERO-do-not-write-7f3a9c2e"
ENV_DOC = Path(__file__).resolve().parents[1] / "docs" / "env.md"


@pytest.fixture
def space():
    return build_hparam_space("gsm8k", difficulty_levels=(1, 2, 3))[0]


def make_context(space, **overrides) -> Context:
    hp = space.decode(space.default_action())
    stage = {"hparams": hp, "dev_score": 0.25, "pathologies": ["entropy_collapse"],
             "metrics": [{"reward": 0.1, "entropy": 0.9, "kl": 0.01},
                         {"reward": 0.3, "entropy": 0.02, "kl": 0.05}]}
    sibling = {"hparams": {**hp, "learning_rate": 1e-3}, "dev_score": 0.05,
               "pathologies": ["kl_blowup"]}
    summary = StateSummary(hp, stage["metrics"], stage["metrics"], (0.2, 0.25),
                           ("entropy_collapse",))
    samples = [{"prompt": "2+3+4=", "completion": "#### 9", "answer": "9", "correct": True}]
    fields = dict(task="gsm8k (embedded scale)", node_id=1, stage=1, max_stages=3, hparams=hp,
                  path=[stage], pathologies=["entropy_collapse"], siblings=[sibling],
                  base_dev_score=0.2, samples=samples, remaining_stages=7, dev_size=64,
                  steps_per_stage=20, best={"dev_score": 0.25, "node": 1, "path": [hp]},
                  state_summary=summary)
    return Context(**(fields | overrides))


def reply(*changes: dict, diagnosis: str = "entropy collapsed") -> str:
    return json.dumps({"diagnosis": diagnosis,
                       "proposals": [{"hparams": c, "rationale": "why"} for c in changes]})


def proposer(server: OpenAIServer, run_dir: Path, **kwargs) -> LLMProposer:
    kwargs = {"base_url": server.base_url, "api_key": FAKE_KEY, "model": "test-model",
              "fallback": SkillProposer(), "run_dir": run_dir, "backoff": 0.001} | kwargs
    return LLMProposer(**kwargs)


def transcript(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "transcript.jsonl").read_text().splitlines()]


def chat_posts(server: OpenAIServer) -> list[dict]:
    """Every chat request the server received, refused ones and the check included."""
    return [r["body"] for r in server.requests if r["path"].endswith("/chat/completions")]


def skills_answer(ctx, space, k) -> list[dict]:
    return [p.hparams for p in SkillProposer().propose(ctx, space, k)]


def assert_key_nowhere(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, "the run wrote nothing to check"
    for path in files:
        assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


# ---- the request: structured outputs, token limits, the prompt ---------------------------------

def test_good_reply_is_decoded_and_the_request_carries_schema_and_context(space, tmp_path):
    ctx = make_context(space)
    longest = max(space.grids["max_completion_length"])
    with OpenAIServer() as server:
        server.push(reply({"learning_rate": 3e-5, "beta": 0.1, "temperature": 1.3},
                          {"max_completion_length": longest, "num_generations": 16}))
        out = proposer(server, tmp_path).propose(ctx, space, k=2)
        body = server.chat_requests()[0]
        auth = server.requests[-1]["headers"]["authorization"]
    assert [p.hparams for p in out] == [
        ctx.hparams | {"learning_rate": 3e-5, "beta": 0.1, "temperature": 1.3},
        ctx.hparams | {"max_completion_length": longest, "num_generations": 16}]
    assert {p.source for p in out} == {LLM} and out[0].rationale == "why"
    assert auth == f"Bearer {FAKE_KEY}"  # sent to the endpoint, and only there
    # Structured outputs: the strict schema with every grid's values as enums.
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == reply_schema(space)
    hparams = fmt["json_schema"]["schema"]["$defs"]["HParams"]
    assert hparams["additionalProperties"] is False and hparams["required"] == list(space.names)
    for name in space.names:
        assert hparams["properties"][name]["enum"] == list(space.grids[name])
    assert "max_tokens" not in body and "max_completion_tokens" not in body  # none asked
    prompt = body["messages"][1]["content"]
    events = transcript(tmp_path)
    assert [e["event"] for e in events] == ["chat", "expansion"]
    assert events[0]["messages"][1]["content"] == prompt and events[0]["dropped"] == []
    assert events[1]["source"] == LLM and events[1]["diagnosis"] == "entropy collapsed"


def test_the_prompt_holds_what_an_expert_would_ask_for(space):
    ctx = make_context(space, tried=[{"hparams": {**make_context(space).hparams, "beta": 0.1},
                                      "dev_score": 0.3, "pathologies": []}], tokens_left=12000)
    prompt = build_prompt(ctx, space, 4)
    for name in space.names:                                                     # the grid
        assert f"  {name}: {json.dumps(list(space.grids[name]))}" in prompt
    assert "Budget left: 7 stages and 12,000 training tokens" in prompt         # the budget
    assert "after stage 1" in prompt and "at most 3 stages of 20 training steps" in prompt
    assert "Dev set: 64 problems; one problem weighs 0.01562" in prompt           # dev noise
    assert "standard error near 0.250: 0.054" in prompt
    assert "Best dev score in the tree: 0.250 at node 1" in prompt               # the best
    assert "stage 1:" in prompt and "-> dev 0.250 [entropy_collapse]" in prompt  # the path
    assert re.search(r"entropy\s+0\.9\s+0\.02\s+0\.02\s+0\.9", prompt)          # trends
    assert f"< {P.ENTROPY_COLLAPSE_MIN} nats" in prompt                          # threshold
    assert '[correct] prompt "2+3+4=" completion "#### 9"' in prompt             # samples
    assert '{"learning_rate": 0.001} -> dev 0.050 [kl_blowup]' in prompt         # a sibling
    assert 'Already tried from this checkpoint' in prompt and '{"beta": 0.1} -> dev 0.300' in prompt
    assert "propose 4 distinct settings" in prompt
    root = make_context(space, stage=0, path=[], pathologies=[], siblings=[])
    root = build_prompt(root, space, 3)
    assert "the base model, no stage trained yet" in root and "base model: dev 0.200" in root
    assert "Detectors fired at this checkpoint: none" in root and "[correct]" in root


def test_the_system_prompt_describes_parameters_without_priming_a_direction(space):
    text = system_prompt(space)
    for name in space.names:
        assert f"- {name}: " in text
    for row in P.DETECTORS:
        assert row.describe() in text
    # The structure statistic measures whether capacity grows and regularization changes
    # direction over stages: neither the prompt nor any parameter's description may say so.
    primers = ("grow", "increase", "decrease", "usually", "either direction", "oscillat",
               "capacity", "regulariz", "anneal", "warm", "early stages", "later stages",
               "over stages", "schedule")
    for primer in primers:
        assert primer not in text.lower()
    for name, effect in HPARAM_EFFECTS.items():
        assert not [w for w in primers if w in effect.lower()], name


def test_max_completion_tokens_is_sent_and_max_tokens_only_where_it_is_refused(space, tmp_path):
    ctx = make_context(space)
    # OpenAI's reasoning models refuse max_tokens: the proposer never sends it unasked.
    with OpenAIServer(refuse={"max_tokens": MAX_TOKENS_REFUSED}) as server:
        server.push(reply({"beta": 0.0}))
        llm = proposer(server, tmp_path / "a", max_completion_tokens=512)
        llm.check()
        assert llm.propose(ctx, space, k=1)[0].source == LLM
        assert server.chat_requests()[0]["max_completion_tokens"] == 512
    # A server that knows only max_tokens: refused once, then max_tokens for the rest of the run.
    refusal = "Unrecognized request argument supplied: max_completion_tokens"
    with OpenAIServer(refuse={"max_completion_tokens": refusal}) as server:
        server.push(reply({"beta": 0.0}), reply({"beta": 0.1}))
        llm = proposer(server, tmp_path / "b", max_completion_tokens=512)
        llm.check()
        llm.propose(ctx, space, k=1)
        llm.propose(ctx, space, k=1)
        posts = chat_posts(server)
    assert [("max_tokens" in b, "max_completion_tokens" in b) for b in posts] == [
        (False, True), (True, False), (True, False), (True, False)]  # the check learnt it
    assert [e["parameter"] for e in transcript(tmp_path / "b") if e["event"] == "refused"] == [
        "max_completion_tokens"]


def test_a_refused_response_format_falls_back_to_plain_json_for_the_run(space, tmp_path):
    ctx = make_context(space)
    refusal = "response_format of type json_schema is not supported by this server"
    with OpenAIServer(refuse={"response_format": refusal}) as server:
        server.push(reply({"beta": 0.0}), reply({"beta": 0.1}))
        llm = proposer(server, tmp_path)
        first, second = llm.propose(ctx, space, k=1), llm.propose(ctx, space, k=1)
        posts = chat_posts(server)
    assert [p.hparams["beta"] for p in first + second] == [0.0, 0.1]
    assert ["response_format" in b for b in posts] == [True, False, False]  # asked once
    assert '"proposals": [{"hparams"' in posts[1]["messages"][0]["content"]  # plain instructions
    assert [e["event"] for e in transcript(tmp_path)].count("refused") == 1


# ---- tolerant parsing: the replies real servers send --------------------------------------------

QUIRKS = {
    # vLLM with a reasoning parser: thoughts (with a valid-looking object) in reasoning_content.
    "reasoning_content": Reply(reply({"beta": 0.0}), reasoning_content=reply({"beta": 0.1})),
    # A template that opened <think> in the prompt: thoughts, then only the closing tag.
    "bare_think_close": 'Maybe {"learning_rate": 3e-4}? Or {"beta": 0.1, too high…</think>\n'
                        + reply({"beta": 0.0}),
    "think_block": "<think>{\"beta\": 0.1} looks risky</think>" + reply({"beta": 0.0}),
    "fences": "Here you go:\n```json\n" + reply({"beta": 0.0}) + "\n```\nGood luck!",
    "trailing_text_and_object": reply({"beta": 0.0}) + '\nAlso consider {"beta": 0.1}. {',
}


@pytest.mark.parametrize("quirk", QUIRKS)
def test_each_server_quirk_is_read_in_one_request(space, tmp_path, quirk):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(QUIRKS[quirk])
        llm = proposer(server, tmp_path)
        out = llm.propose(ctx, space, k=1)
        n = len(server.chat_requests())
    assert n == 1 and llm.usage["invalid_replies"] == 0
    assert [(p.hparams["beta"], p.source) for p in out] == [(0.0, LLM)]


def test_one_off_grid_value_drops_only_that_proposal(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(reply({"learning_rate": 3e-5}, {"learning_rate": 5e-5},
                          {"learning_rate": "1e-5"}, {"lr": 1e-4}))  # a quoted number is fine
        llm = proposer(server, tmp_path)
        out = llm.propose(ctx, space, k=3)
        n = len(server.chat_requests())
    assert n == 1 and [p.hparams["learning_rate"] for p in out] == [3e-5, 1e-5]
    dropped = transcript(tmp_path)[0]["dropped"]
    assert dropped[0].startswith("proposals[1].hparams.learning_rate: Input should be 1e-05")
    assert "(got 5e-05)" in dropped[0]
    assert dropped[1] == "proposals[3].hparams.lr: not a hyperparameter of this run"
    assert llm.usage["dropped_proposals"] == 2 and llm.usage["invalid_replies"] == 0


def test_a_reply_without_a_usable_proposal_is_reasked_in_the_models_terms(space, tmp_path):
    ctx = make_context(space)
    tried = [{"hparams": ctx.hparams | {"beta": 0.0}, "dev_score": 0.3, "pathologies": []}]
    ctx = make_context(space, tried=tried)
    with OpenAIServer() as server:
        server.push(
            "Sure! Lower the learning rate. {",                            # no JSON object
            json.dumps({"diagnosis": "d", "proposals": []}),               # breaks the contract
            reply({"learning_rate": 5e-5}, {"beta": 0.0}),                  # off grid, a repeat
        )
        llm = proposer(server, tmp_path, max_retries=2)
        out = llm.propose(ctx, space, k=2)
        bodies = server.chat_requests()
    assert len(bodies) == 3
    second, third = bodies[1]["messages"], bodies[2]["messages"]
    assert second[-2] == {"role": "assistant", "content": "Sure! Lower the learning rate. {"}
    assert "the reply holds no complete JSON object" in second[-1]["content"]
    assert "proposals: List should have at least 1 item" in third[-1]["content"]
    for body in bodies:
        assert "snap" not in json.dumps(body["messages"])  # no internal hints
    # Then the skills answer for this expansion, marked as a fallback.
    assert [p.hparams for p in out] == skills_answer(ctx, space, 2)
    assert {p.source for p in out} == {FALLBACK} and llm.usage["fallbacks"] == 1
    events = transcript(tmp_path)
    assert [e["event"] for e in events] == ["chat", "chat", "chat", "expansion"]
    assert "repeats a setting already tried" in events[2]["error"]
    assert events[3]["source"] == FALLBACK and "invalid reply" in events[3]["reason"]


# ---- HTTP failures ---------------------------------------------------------------------------

def test_429_with_retry_after_and_5xx_back_off_and_retry(space, tmp_path, monkeypatch):
    ctx = make_context(space)
    slept: list[float] = []
    monkeypatch.setattr("controllers.llm_proposer.time.sleep", slept.append)
    with OpenAIServer() as server:
        server.push(Fail(500), Fail(429, "rate limited", {"Retry-After": "1.5"}), Fail(503),
                    reply({"beta": 0.01}))
        llm = proposer(server, tmp_path, backoff=0.5, network_retries=4)
        out = llm.propose(ctx, space, k=1)
        n_requests = len(server.chat_requests())
    assert [p.hparams for p in out] == [ctx.hparams | {"beta": 0.01}]
    assert n_requests == 4
    assert slept == [0.5, 1.5, 2.0]  # exponential backoff; the 429's Retry-After is longer
    assert llm.usage["network_retries"] == 3 and llm.usage["calls"] == 1
    assert [e["event"] for e in transcript(tmp_path)][:3] == ["network_error"] * 3


def test_network_failure_after_retries_falls_back_to_skills(space, tmp_path, monkeypatch):
    ctx = make_context(space)
    monkeypatch.setattr("controllers.llm_proposer.time.sleep", lambda s: None)
    with OpenAIServer() as server:
        server.push(*[Fail(502)] * 3)
        out = proposer(server, tmp_path, network_retries=2).propose(ctx, space, k=2)
    assert [p.hparams for p in out] == skills_answer(ctx, space, 2)
    assert transcript(tmp_path)[-1]["source"] == FALLBACK
    assert "InternalServerError" in transcript(tmp_path)[-1]["reason"]


def test_a_server_error_echoing_the_key_is_not_written(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(Fail(400, f"Incorrect API key provided: {FAKE_KEY}"))  # not retried
        out = proposer(server, tmp_path).propose(ctx, space, k=1)
    assert out[0].source == FALLBACK
    assert "BadRequestError" in transcript(tmp_path)[-1]["reason"]
    assert_key_nowhere(tmp_path)


def test_tokens_and_calls_are_counted_from_usage(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push("not json", reply({"beta": 0.0}))
        llm = proposer(server, tmp_path)
        llm.propose(ctx, space, k=1)
        bodies = server.chat_requests()
    # The server's usage is ~chars/4 of each request and reply: the proposer sums both calls.
    prompts = [approx_tokens("".join(message_text(m) for m in b["messages"])) for b in bodies]
    completions = approx_tokens("not json") + approx_tokens(reply({"beta": 0.0}))
    assert llm.cost() == {"llm_calls": 2, "llm_tokens": sum(prompts) + completions,
                          "llm_prompt_tokens": sum(prompts), "llm_completion_tokens": completions}


# ---- the endpoint check ------------------------------------------------------------------------

def test_a_wrong_model_fails_the_check_naming_endpoint_and_model(tmp_path):
    with OpenAIServer(model="Qwen/Qwen3-8B") as server:
        llm = LLMProposer(base_url=server.base_url, api_key=FAKE_KEY, model="qwen3-8b",
                          run_dir=tmp_path)
        with pytest.raises(LLMEndpointError) as e:
            llm.check()
        probe = chat_posts(server)[0]
    assert server.base_url in str(e.value) and "'qwen3-8b'" in str(e.value)
    assert "NotFoundError" in str(e.value)
    assert probe["max_completion_tokens"] == 1  # the check is a one-token chat


def test_unreachable_endpoint_is_a_clear_error_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    llm = LLMProposer(base_url=url, api_key=FAKE_KEY, model="m", run_dir=tmp_path, backoff=0.001)
    with pytest.raises(LLMEndpointError, match=f"LLM endpoint {url} is unreachable"):
        llm.check(timeout=2)


def test_model_is_taken_from_a_single_model_endpoint(tmp_path):
    with OpenAIServer(model="Qwen/Qwen3-8B") as server:
        llm = LLMProposer(base_url=server.base_url, api_key=FAKE_KEY, run_dir=tmp_path)
        llm.check()
        assert chat_posts(server)[0]["model"] == "Qwen/Qwen3-8B"
    assert llm.model == "Qwen/Qwen3-8B"


def test_settings_come_from_environment_variables_and_the_key_stays_hidden(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMZERO_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLMZERO_API_KEY", FAKE_KEY)
    monkeypatch.setenv("LLMZERO_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_MODEL", "not-this-one")
    llm = LLMProposer(run_dir=tmp_path)
    assert (llm.base_url, llm.model) == ("http://127.0.0.1:9/v1", "env-model")
    assert FAKE_KEY not in repr(llm) and FAKE_KEY not in str(vars(llm).get("usage"))


# ---- endpoint failures named for what they are -------------------------------------------------

HTML = Raw("<html><body><h1>Welcome to nginx!</h1></body></html>")


@pytest.mark.parametrize("model", ["test-model", None])
@pytest.mark.parametrize("body, words", [
    (HTML, "content type 'text/html; charset=utf-8', not {what} in JSON: '<html><body><h1>Wel"),
    (Raw("{not json", "application/json"), "content type 'application/json', not {what} in JSON"),
])
def test_a_body_that_is_not_json_names_the_url_and_the_content_type(tmp_path, model, body, words):
    with OpenAIServer(broken=body) as server:
        llm = proposer(server, tmp_path, model=model)
        with pytest.raises(EndpointReplyError) as e:
            llm.check()
    path, what = ("/chat/completions", "a chat completion") if model else ("/models",
                                                                           "a model list")
    assert f"{server.base_url}{path} answered HTTP 200 with content type " in str(e.value)
    assert words.format(what=what) in str(e.value)


def test_json_that_is_not_a_chat_completion_is_named(tmp_path):
    with OpenAIServer(broken=Raw('{"hello": "world"}', "application/json")) as server:
        with pytest.raises(EndpointReplyError) as e:
            proposer(server, tmp_path).check()
    assert f"{server.base_url}/chat/completions answered with content type 'application/json', " \
           "but not a chat completion (no 'choices' with a 'message'): '{\"hello\"" in str(e.value)


def test_a_proxy_page_during_the_run_falls_back_and_says_why(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(HTML)
        out = proposer(server, tmp_path).propose(ctx, space, k=1)
    assert out[0].source == FALLBACK
    reason = transcript(tmp_path)[-1]["reason"]
    assert "EndpointReplyError" in reason and "text/html" in reason


@pytest.mark.parametrize("model", ["test-model", None])
def test_a_rejected_key_is_named_whether_or_not_a_model_was_given(tmp_path, model):
    with OpenAIServer(api_key="sk-the-right-key-0123456789") as server:
        with pytest.raises(LLMEndpointError) as e:
            proposer(server, tmp_path, model=model).check()
    msg = str(e.value)
    assert f"LLM endpoint {server.base_url} rejected the API key (HTTP 401" in msg
    assert "LLMZERO_API_KEY" in msg and "serves 0 models" not in msg
    assert FAKE_KEY not in msg  # the server echoed the key; the message does not


@pytest.mark.parametrize("model", ["test-model", None])
def test_a_server_error_says_the_server_failed_and_nothing_about_the_model(tmp_path, model):
    with OpenAIServer(broken=Fail(503, "upstream connect error")) as server:
        llm = proposer(server, tmp_path, model=model, network_retries=2)
        with pytest.raises(LLMEndpointError) as e:
            llm.check()
        tries = len(server.requests)
    msg = str(e.value)
    assert f"LLM endpoint {server.base_url} failed with a server error (HTTP 503" in msg
    assert "upstream connect error" in msg and "on 3 tries" in msg and tries == 3
    assert "model" not in msg.lower()  # no advice about the model name


def test_a_hanging_server_fails_within_one_timeout_and_one_retry(tmp_path):
    with OpenAIServer(broken=Hang()) as server:
        llm = proposer(server, tmp_path, check_timeout=0.2, network_retries=4)
        t0 = time.perf_counter()
        with pytest.raises(LLMEndpointError, match=rf"{server.base_url} did not answer within "
                                                   r"0\.2 s \(2 tries\)"):
            llm.check()
        assert time.perf_counter() - t0 < 3 and len(server.requests) == 2


def test_timeouts_and_retries_come_from_the_environment_and_default_to_under_a_minute(
        tmp_path, monkeypatch):
    llm = LLMProposer(base_url="http://127.0.0.1:9/v1", model="m")
    assert (1 + TIMEOUT_RETRIES) * llm.check_timeout + llm.backoff <= 60  # the check's worst case
    assert (llm.timeout, llm.network_retries) == (120.0, 4)
    monkeypatch.setenv("LLMZERO_CHECK_TIMEOUT", "0.2")
    monkeypatch.setenv("LLMZERO_NETWORK_RETRIES", "0")
    monkeypatch.setenv("LLMZERO_TIMEOUT", "7.5")
    with OpenAIServer(broken=Hang()) as server:
        llm = proposer(server, tmp_path)
        assert (llm.check_timeout, llm.network_retries, llm.timeout) == (0.2, 0, 7.5)
        with pytest.raises(LLMEndpointError, match=r"within 0\.2 s \(1 tries\)"):
            llm.check()
        assert len(server.requests) == 1
    monkeypatch.setenv("LLMZERO_CHECK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LLMZERO_CHECK_TIMEOUT='soon' is not a number"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ValueError, match=r"timeout must be a number >= 0\.001, got -1 \(arg"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m", timeout=-1,
                    check_timeout=1)
    with pytest.raises(ValueError, match=r"network_retries must be an integer >= 0, got 2\.5"):
        LLMProposer(base_url="http://127.0.0.1:9/v1", model="m", network_retries=2.5,
                    check_timeout=1)


def test_a_request_that_hangs_during_the_run_is_tried_twice_then_falls_back(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(Hang(), Hang())
        llm = proposer(server, tmp_path, timeout=0.2, network_retries=4)
        out = llm.propose(ctx, space, k=1)
        assert len(server.chat_requests()) == 2
    assert out[0].source == FALLBACK and "APITimeoutError" in transcript(tmp_path)[-1]["reason"]


def test_make_routes_search_and_llm_settings_once(monkeypatch):
    agent = controllers.make("llmzero", proposer="llm", base_url="http://127.0.0.1:9/v1",
                             model="m", k=2, max_completion_tokens=64, vision=True)
    assert isinstance(agent, LLMZero) and agent.k == 2
    llm = agent.proposer
    assert isinstance(llm, LLMProposer) and (llm.base_url, llm.model) == (
        "http://127.0.0.1:9/v1", "m")
    assert llm.max_completion_tokens == 64 and llm.vision
    assert isinstance(llm.fallback, SkillProposer)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['max_tokenz'\]"):
        controllers.make("llmzero", proposer="llm", max_tokenz=64)
    with pytest.raises(ValueError, match="'replay', 'skills'"):
        controllers.make("llmzero", proposer="gpt")


def test_vision_sends_the_plot_as_a_data_url_and_saves_it_beside_the_transcript(space, tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    ctx = make_context(space, plot=lambda: png)
    with OpenAIServer() as server:
        server.push(reply({"beta": 0.0}))
        proposer(server, tmp_path, vision=True).propose(ctx, space, k=1)
        content = server.chat_requests()[0]["messages"][1]["content"]
    assert content[0]["type"] == "text" and content[1]["type"] == "image_url"
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    logged = transcript(tmp_path)[0]["messages"][1]["content"][1]["image_url"]["url"]
    assert (tmp_path / logged).read_bytes() == png


def test_the_detector_table_is_what_the_docs_list():
    section = ENV_DOC.read_text().split("## Pathology detectors")[1].split("\n#")[0]
    items = [" ".join(item.split()) for item in section.split("\n* ")[1:]]
    assert items == [d.describe() for d in P.DETECTORS]


# ---- the tree search ---------------------------------------------------------------------------

def node(tree: Tree, parent: Node, dev: float, **fields) -> Node:
    return tree.add(parent, {"learning_rate": dev}, state=f"s{len(tree.nodes)}", dev_score=dev,
                    **fields)


def test_early_stopping_prunes_a_branch_behind_the_best_curve():
    # Depth 1: A (0.6) and B (0.3); B trails the best at its depth by more than the margin.
    root = Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.5)
    tree = Tree(root, max_depth=3, c_uct=10.0, margin=0.1)
    root.expansions = 1
    a, b = node(tree, root, 0.6), node(tree, root, 0.3)
    assert tree.behind(b) and not tree.behind(a)
    assert tree.next_leaf(remaining=100) == (a, 0)
    a.expansions = 1
    a1 = node(tree, a, 0.7)
    node(tree, a, 0.65)
    # A large exploration constant makes plain UCT pick the less-visited B next; early stopping
    # refuses, grows under A instead, and counts the stage B would have cost.
    assert tree.select(root, prune=False) is b
    leaf, saved = tree.next_leaf(remaining=100)
    assert leaf is not None and leaf.parent is a and saved == 1
    assert tree.pruned() == [b]
    tree.release_states()
    # Pruning is final, and A's one proposer call is spent: their states are freed.
    assert b.state is None and a.state is None and a1.state is not None
    # A branch within the margin is not pruned.
    tree.margin = 0.5
    assert not tree.behind(b) and tree.pruned() == []


def test_the_pruning_margin_is_in_standard_errors_of_the_dev_score():
    agent = LLMZero()
    assert agent.pruning_margin(128) == pytest.approx(2 * P.dev_standard_error(128))
    assert agent.pruning_margin(32) == pytest.approx(2 * 0.5 / 32 ** 0.5)
    assert agent.pruning_margin(None) == float("inf")       # unknown noise: nothing is pruned
    assert LLMZero(margin=0.05).pruning_margin(128) == 0.05
    assert LLMZero(margin_se=1.0).pruning_margin(64) == pytest.approx(0.0625)


def test_progressive_widening_rule():
    root = Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.0)
    tree = Tree(root, max_depth=8, max_children=4, widen_c=1.0, widen_alpha=0.4)
    widths = {}
    for visits in range(1, 41):
        root.visits = visits
        widths[visits] = tree.width(root)
    # floor(visits ** 0.4), at least 1, at most max_children.
    assert widths == {v: max(1, min(4, int(v ** 0.4))) for v in widths}
    assert [v for v in widths if widths[v] > widths.get(v - 1, 1)] == [6, 16, 32]
    # A node at its width descends to its children; a fresh child grows first.
    root.visits = 1
    a = node(tree, root, 0.1)
    assert root.visits == 2 and tree.width(root) == 1
    assert tree.select(root) is a
    for dev in (0.2, 0.3, 0.4):          # a chain under A: root's visits reach 5, width still 1
        node(tree, tree.nodes[-1], dev)
    assert root.visits == 5 and tree.select(root) is tree.nodes[-1]
    node(tree, tree.nodes[-1], 0.5)      # 6 visits: the root may have a second child
    assert tree.width(root) == 2 and tree.select(root) is root
    # Past its width only when every child's subtree is closed, and never past max_children.
    small = Tree(Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.0), max_depth=1,
                 max_children=2, max_expansions=2)
    first = node(small, small.root, 0.1)         # terminal: the episode has one stage
    assert first.terminal and small.width(small.root) == 1 and small.select(small.root) is (
        small.root)
    node(small, small.root, 0.2)
    assert small.select(small.root) is None      # two children: the cap


def run_on_random_scores(budget: int, stages: int, rng: np.random.Generator, dev_size: int = 128,
                         ) -> Tree:
    """The tree policy of a skills run, with dev scores drawn at random (no training)."""
    agent = LLMZero()
    k = agent.width(budget, stages)
    se = P.dev_standard_error(dev_size)
    tree = Tree(Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.3), stages, agent.c_uct,
                agent.pruning_margin(dev_size), 1, max_children=k, widen_c=agent.widen_c,
                widen_alpha=agent.widen_alpha)
    for spent in range(budget):
        leaf, _ = tree.next_leaf(budget - spent)
        if not leaf.pending:                     # one proposer call: k settings
            leaf.expansions, leaf.call = 1, len(tree.expansions)
            tree.expansions.append({"node": leaf.id, "children": []})
            leaf.pending = [object()] * k
        leaf.pending.pop(0)
        dev = round(float(np.clip(rng.normal(0.3, se), 0, 1)) * dev_size) / dev_size
        tree.add(leaf, {}, f"s{len(tree.nodes)}", dev)
        tree.release_states()
    return tree


def test_the_tree_alone_reaches_the_episodes_end_at_the_standard_budget():
    # 8-stage episodes, a budget of 4 episodes, dev 128: with random dev scores the tree policy
    # (widening, UCT, pruning) reaches the end before the budget guard has to finish a path in
    # 93% of 2000 runs; with the guard, every run holds a whole schedule to choose.
    rng = np.random.default_rng(0)
    trees = [run_on_random_scores(32, 8, rng) for _ in range(200)]
    assert all(t.reached_end() and len(t.nodes) == 33 for t in trees)
    alone = np.mean([t.finished_at is None for t in trees])
    assert alone >= 0.8
    assert np.mean([len(t.root.children) for t in trees]) > 2   # and it branches


def test_the_budget_guard_finishes_the_deepest_path_when_the_budget_is_short():
    root = Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.0)
    tree = Tree(root, max_depth=4, margin=1.0, max_children=3)
    root.expansions = 1
    a, b = node(tree, root, 0.5), node(tree, root, 0.1)
    a1 = node(tree, a, 0.2)
    # 3 stages left and the deepest open node (A1, depth 2) needs 2: the search goes on.
    assert tree.next_leaf(remaining=3)[0] is not None and tree.finishing is None
    leaf, saved = tree.next_leaf(remaining=2)
    assert leaf is a1 and tree.finishing is a1 and tree.finished_at == len(tree.nodes)
    a2 = node(tree, a1, 0.0)
    assert tree.next_leaf(remaining=1)[0] is a2
    end = node(tree, a2, 0.0)
    assert end.terminal and tree.reached_end() and tree.finishing is None
    assert tree.next_leaf(remaining=5)[0] is not None    # then the search resumes
    assert b.state is not None


def test_uct_prefers_the_better_subtree_when_exploration_is_off():
    root = Node(id=0, depth=0, hparams={}, state=None, dev_score=0.0)
    tree = Tree(root, max_depth=3, c_uct=0.0, margin=1.0)
    root.expansions = 1
    low, high = node(tree, root, 0.1), node(tree, root, 0.2)
    assert tree.select(root) is high
    high.expansions = 1
    node(tree, high, 0.0)  # the subtree's value is its best node, not its newest
    assert high.best == 0.2 and root.visits == 4 and high.visits == 2
    assert tree.select(root).parent is high
    assert low.visits == 1


def test_a_node_whose_subtree_is_closed_is_asked_again_up_to_its_cap():
    for cap, again in ((1, None), (2, "root")):
        root = Node(id=0, depth=0, hparams={}, state="s0", dev_score=0.0)
        tree = Tree(root, max_depth=1, margin=1.0, max_expansions=cap)
        root.expansions = 1
        node(tree, root, 0.1), node(tree, root, 0.2)  # both terminal: the subtree is closed
        tree.release_states()
        assert tree.select(root) is (root if again else None)
        assert (root.state is not None) == bool(again)  # kept only while it may be expanded
        root.expansions = cap
        assert tree.select(root) is None


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A ~40k-parameter random GPT-2 + the char tokenizer, in save_pretrained format."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer()
    tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_env(model_dir: str, stages: int = 3):
    # One step per stage, 2 prompts x 2-4 generations, 4 dev examples: ~0.1 s a stage.
    return gym.make("LLMZero-GSM8K-v0", model=model_dir, stages=stages, steps_per_stage=1,
                    dev_size=4, test_size=4, eval_max_new_tokens=8,
                    fixed_hparams={"prompts_per_step": 2},
                    hparam_grid={"num_generations": [2, 4], "max_completion_length": [8, 16]})


def check_tree(result, stages: int) -> list[dict]:
    nodes = result.tree["nodes"]
    assert len(nodes) - 1 == result.cost["stages"]   # one node per trained stage
    for n in nodes[1:]:
        parent = nodes[n["parent"]]
        assert parent["expanded"] and n["depth"] == parent["depth"] + 1
    assert nodes[0]["visits"] == len(nodes)
    # The chosen state: the best on dev among the nodes at the episode's end (a whole schedule).
    ends = [n for n in nodes if n["depth"] == stages]
    assert ends and result.dev_score == max(n["dev_score"] for n in ends)
    assert len(result.schedule) == stages
    return nodes


def test_skills_tree_search_spends_exactly_its_budget_and_is_deterministic(tiny_model_dir):
    results = []
    for _ in range(2):
        env = make_env(tiny_model_dir)
        result = controllers.make("llmzero", proposer="skills", k=2).run(env, budget=4, seed=0)
        assert env.unwrapped.budget.stages == 4 and result.cost["stages"] == 4
        results.append(result)
    nodes = check_tree(results[0], 3)
    assert all(n["source"] == "skills" for n in nodes[1:])
    assert {e["source"] for e in results[0].tree["expansions"]} == {"skills"}
    assert {k: results[0].cost[k] for k in ("llm_calls", "llm_tokens", "llm_expansions",
                                            "llm_fallbacks")} == dict.fromkeys(
        ("llm_calls", "llm_tokens", "llm_expansions", "llm_fallbacks"), 0)
    assert results[0].tree == results[1].tree
    assert results[0].schedule == results[1].schedule


def test_skills_tree_search_chooses_a_whole_schedule_on_its_own(tiny_model_dir):
    # Four-stage episodes, a budget of two episodes (K = 2), dev 4: the tree reaches the end
    # without the budget guard, branches, and the chosen schedule is a whole episode.
    env = make_env(tiny_model_dir, stages=4)
    agent = controllers.make("llmzero", proposer="skills")
    result = agent.run(env, budget=8, seed=0)
    nodes = check_tree(result, 4)
    record = result.tree
    assert record["settings"]["k"] == 2 and record["finished_at"] is None
    assert record["settings"]["margin"] == pytest.approx(2 * P.dev_standard_error(4))
    assert max(len([c for c in nodes if c["parent"] == n["id"]]) for n in nodes) == 2
    assert env.unwrapped.budget.stages == result.cost["stages"] == 8


def test_tree_search_stops_when_the_tree_is_exhausted(tiny_model_dir):
    # Two-stage episodes, K=2, nothing pruned, the skills expand a node once: the whole tree is
    # 2 + 2*2 = 6 stages < budget 10.
    env = make_env(tiny_model_dir, stages=2)
    result = LLMZero(k=2, margin=1.0).run(env, budget=10, seed=0)
    assert env.unwrapped.budget.stages == 6 < 10
    nodes = check_tree(result, 2)
    assert sum(n["terminal"] for n in nodes) == 4 and result.tree["pruned"] == []


def respond_with_distinct_pairs(calls: list) -> callable:
    lrs = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]

    def respond(body: dict) -> str:  # a different, valid pair of proposals for every request
        i = len(calls)
        calls.append(body)
        return reply({"learning_rate": lrs[i % 5], "beta": 0.0},
                     {"learning_rate": lrs[(i + 2) % 5], "temperature": 1.3},
                     diagnosis=f"expansion {i}")
    return respond


def test_llm_tree_search_records_sources_and_costs_and_replays_offline(
        tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMZERO_API_KEY", FAKE_KEY)
    calls: list = []
    env = make_env(tiny_model_dir, stages=2)
    run = tmp_path / "run"
    settings = {"k": 2, "margin": 1.0, "run_dir": str(run)}
    with OpenAIServer(default=respond_with_distinct_pairs(calls)) as server:
        server.push("no JSON here")  # the first reply is malformed and re-asked
        agent = controllers.make("llmzero", proposer="llm", base_url=server.base_url,
                                 model="test-model", vision=True, **settings)
        result = agent.run(env, budget=8, seed=0)
        bodies = server.chat_requests()
        probes = len(chat_posts(server)) - len(bodies)
    assert env.unwrapped.budget.stages == 8 and probes == 1
    nodes = check_tree(result, 2)
    assert all(n["source"] == LLM for n in nodes[1:])
    assert nodes[1]["hparams"]["learning_rate"] == 1e-5 and nodes[1]["hparams"]["beta"] == 0.0
    # Four proposer calls of two settings each, trained one at a time as the widening allows; a
    # depth-1 node whose children ended the episode is asked again, and its second prompt lists
    # what was tried from it.
    expansions = result.tree["expansions"]
    assert len(expansions) == 4 and {e["source"] for e in expansions} == {LLM}
    again = [e["node"] for e in expansions]
    assert len(set(again)) == 3
    prompts = [b["messages"][1]["content"][0]["text"] for b in bodies]
    assert sum("Already tried from this checkpoint" in p for p in prompts) == 1
    assert "Dev samples of this checkpoint" in prompts[0] and "base model: dev" in prompts[0]
    assert bodies[-1]["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png")
    # The cost: chats answered (the check's included) and tokens from usage; no fallback.
    usage = result.tree["llm_usage"]
    assert result.cost["llm_calls"] == len(bodies) + 1 == 6
    assert result.cost["llm_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert (result.cost["llm_expansions"], result.cost["llm_fallbacks"]) == (4, 0)
    assert (run / "tree.json").exists() and list(run.glob("curves_*.png"))
    assert [e["source"] for e in transcript(run) if e["event"] == "expansion"] == [LLM] * 4
    assert_key_nowhere(tmp_path)
    for text in (repr(agent), repr(result.tree), repr(result.cost), repr(result.schedule)):
        assert FAKE_KEY not in text

    # The replay: no endpoint, the same tree and scores.
    env = make_env(tiny_model_dir, stages=2)
    replay = controllers.make("llmzero", proposer="replay", transcript=str(run),
                              **settings | {"run_dir": str(tmp_path / "replay")})
    again = replay.run(env, budget=8, seed=0)
    keys = ("id", "parent", "hparams", "dev_score", "source")
    assert [[n[k] for k in keys] for n in again.tree["nodes"]] == [[n[k] for k in keys]
                                                                   for n in nodes]
    assert (again.dev_score, again.schedule) == (result.dev_score, result.schedule)
    assert again.cost["llm_calls"] == 0 and again.cost["llm_expansions"] == 4


def test_a_garbage_server_stops_the_run_at_the_fallback_cap(tiny_model_dir, tmp_path):
    env = make_env(tiny_model_dir)
    with OpenAIServer(default="I am sorry, I cannot help with that.") as server:
        agent = controllers.make("llmzero", proposer="llm", base_url=server.base_url,
                                 model="test-model", api_key=FAKE_KEY, k=1, max_retries=0,
                                 run_dir=str(tmp_path))
        with pytest.raises(LLMEndpointError, match=r"skills fallback in 4 of 4 .*share 1\.00"):
            agent.run(env, budget=10, seed=0)
    # Three expansions of one stage each were trained; the fourth was refused before training.
    assert env.unwrapped.budget.stages == 3
    events = [e for e in transcript(tmp_path) if e["event"] == "expansion"]
    assert [e["source"] for e in events] == [FALLBACK] * 4


@pytest.mark.parametrize("failure", ["unreachable", "wrong model"])
def test_an_unusable_endpoint_fails_before_any_stage(tiny_model_dir, tmp_path, failure):
    env = make_env(tiny_model_dir)
    with OpenAIServer() as server:
        url, model = server.base_url, "gpt-typo"
        if failure == "unreachable":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                url, model = f"http://127.0.0.1:{s.getsockname()[1]}/v1", "test-model"
        agent = controllers.make("llmzero", proposer="llm", base_url=url, api_key=FAKE_KEY,
                                 model=model, run_dir=str(tmp_path), backoff=0.001)
        with pytest.raises(LLMEndpointError, match=re.escape(url)) as e:
            agent.run(env, budget=3, seed=0)
    assert model in str(e.value) or failure == "unreachable"
    assert env.unwrapped.budget.stages == 0
