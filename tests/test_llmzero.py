"""LLMZero: the LLM proposer against a local OpenAI-compatible server, and the tree search."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import gymnasium as gym
import pytest
from openai_server import Fail, OpenAIServer, approx_tokens, message_text

import controllers
import metaenv  # noqa: F401  (registers the env ids)
from controllers.llm_proposer import (
    REPLY_SCHEMA,
    Context,
    LLMEndpointError,
    LLMProposer,
    build_prompt,
    check_schema,
)
from controllers.llmzero import LLMZero, Node, SkillProposer, Tree
from controllers.skills import StateSummary
from inner.models import tiny_gpt2
from inner.tokenizer import build_char_tokenizer
from metaenv.hparams import build_hparam_space

FAKE_KEY = "sk-test-LLMZERO-do-not-write-7f3a9c2e"


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
    fields = dict(task="LLMZero-GSM8K-v0", stage=1, max_stages=3, path=[stage], hparams=hp,
                  pathologies=["entropy_collapse"], siblings=[sibling], base_dev_score=0.2,
                  node_id=1, state_summary=summary)
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


def assert_key_nowhere(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, "the run wrote nothing to check"
    for path in files:
        assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def test_schema_checker_names_the_problem():
    check_schema({"diagnosis": "d", "proposals": [{"hparams": {}, "rationale": "r"}]},
                 REPLY_SCHEMA)
    with pytest.raises(ValueError, match="reply.proposals needs at least 1"):
        check_schema({"diagnosis": "d", "proposals": []}, REPLY_SCHEMA)
    with pytest.raises(ValueError, match=r"reply.proposals\[0\] is missing .*'rationale'"):
        check_schema({"diagnosis": "d", "proposals": [{"hparams": {}}]}, REPLY_SCHEMA)
    with pytest.raises(ValueError, match="reply.diagnosis must be a JSON string"):
        check_schema({"diagnosis": 3, "proposals": []}, REPLY_SCHEMA)


def test_good_reply_is_decoded_and_the_prompt_has_the_context(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        # A <think> block and a code fence, as Qwen3 through vLLM may send.
        longest = max(space.grids["max_completion_length"])
        server.push("<think>hmm</think>```json\n" + reply(
            {"learning_rate": 3e-5, "beta": 0.1, "temperature": 1.3},
            {"max_completion_length": longest, "num_generations": 16},
        ) + "\n```")
        llm = proposer(server, tmp_path)
        llm.check()
        out = llm.propose(ctx, space, k=2)
        body = server.chat_requests()[0]
        auth = server.requests[-1]["headers"]["authorization"]
    assert out == [ctx.hparams | {"learning_rate": 3e-5, "beta": 0.1, "temperature": 1.3},
                   ctx.hparams | {"max_completion_length": longest, "num_generations": 16}]
    assert llm.last_source == "llm"
    assert auth == f"Bearer {FAKE_KEY}"  # sent to the endpoint, and only there
    prompt = body["messages"][1]["content"]
    assert body["model"] == "test-model"
    assert "learning_rate: [1e-05, 3e-05, 0.0001, 0.0003, 0.001]" in prompt      # the grid
    assert "stage 1:" in prompt and "-> dev 0.250" in prompt                      # the path
    assert "entropy 0.9->0.02" in prompt                                          # metrics
    assert "entropy_collapse" in prompt                                           # pathologies
    assert '{"learning_rate": 0.001} -> dev 0.050 [kl_blowup]' in prompt          # a sibling
    assert '"diagnosis"' in body["messages"][0]["content"]                        # the schema
    events = transcript(tmp_path)
    assert [e["event"] for e in events] == ["chat", "accepted"]
    assert events[0]["messages"][1]["content"] == prompt
    assert events[1]["diagnosis"] == "entropy collapsed"


def test_tokens_are_counted_from_usage(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push("not json", reply({"beta": 0.0}))
        llm = proposer(server, tmp_path)
        llm.propose(ctx, space, k=1)
        bodies = server.chat_requests()
    # The server's usage is ~chars/4 of each request and reply: the proposer sums both calls.
    prompts = [approx_tokens("".join(message_text(m) for m in b["messages"])) for b in bodies]
    assert llm.usage["prompt_tokens"] == sum(prompts)
    assert llm.usage["completion_tokens"] == approx_tokens("not json") + approx_tokens(
        reply({"beta": 0.0}))
    assert llm.usage["requests"] == 2


def test_malformed_replies_are_retried_with_the_error_then_skills_take_over(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(
            "Sure! Here are my proposals: lower the learning rate.",       # not JSON
            json.dumps({"diagnosis": "d", "proposals": []}),               # schema-invalid
            reply({"learning_rate": 5e-5}),                                 # off the grid
        )
        llm = proposer(server, tmp_path, max_retries=2)
        out = llm.propose(ctx, space, k=2)
        bodies = server.chat_requests()
    assert len(bodies) == 3
    # Each retry carries the previous reply and the validation error.
    second, third = bodies[1]["messages"], bodies[2]["messages"]
    assert second[-2] == {"role": "assistant",
                          "content": "Sure! Here are my proposals: lower the learning rate."}
    assert "not valid JSON" in second[-1]["content"]
    assert "reply.proposals needs at least 1" in third[-1]["content"]
    # The fallback is the skills library's answer for the same checkpoint.
    assert out == SkillProposer().propose(ctx, space, 2)
    assert llm.last_source == "skills" and llm.usage["fallbacks"] == 1
    events = transcript(tmp_path)
    assert [e["event"] for e in events] == ["chat", "chat", "chat", "fallback"]
    assert "learning_rate=5e-05 is not on the grid" in events[2]["error"]
    assert "invalid reply" in events[3]["reason"]


def test_an_invalid_reply_then_a_good_one_is_accepted(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(reply({"lr": 1e-4}), reply({"learning_rate": "1e-5"}))  # a quoted number
        llm = proposer(server, tmp_path)
        out = llm.propose(ctx, space, k=3)
        follow_up = server.chat_requests()[1]["messages"][-1]["content"]
    assert "unknown hyperparameter(s) ['lr']" in follow_up
    assert out == [ctx.hparams | {"learning_rate": 1e-5}]
    assert llm.usage["invalid_replies"] == 1 and llm.usage["fallbacks"] == 0


def test_server_errors_back_off_and_retry(space, tmp_path, monkeypatch):
    ctx = make_context(space)
    slept: list[float] = []
    monkeypatch.setattr("controllers.llm_proposer.time.sleep", slept.append)
    with OpenAIServer() as server:
        server.push(Fail(500), Fail(429, "rate limited", {"Retry-After": "1.5"}), Fail(503),
                    reply({"beta": 0.01}))
        llm = proposer(server, tmp_path, backoff=0.5, network_retries=4)
        out = llm.propose(ctx, space, k=1)
        n_requests = len(server.chat_requests())
    assert out == [ctx.hparams | {"beta": 0.01}]
    assert n_requests == 4
    assert slept == [0.5, 1.5, 2.0]  # exponential backoff; the 429's Retry-After is longer
    assert llm.usage["network_retries"] == 3 and llm.usage["requests"] == 1
    assert [e["event"] for e in transcript(tmp_path)][:3] == ["network_error"] * 3


def test_network_failure_after_retries_falls_back_to_skills(space, tmp_path, monkeypatch):
    ctx = make_context(space)
    monkeypatch.setattr("controllers.llm_proposer.time.sleep", lambda s: None)
    with OpenAIServer() as server:
        server.push(*[Fail(500)] * 3)
        llm = proposer(server, tmp_path, network_retries=2)
        out = llm.propose(ctx, space, k=2)
    assert out == SkillProposer().propose(ctx, space, 2)
    assert transcript(tmp_path)[-1]["event"] == "fallback"
    assert "InternalServerError" in transcript(tmp_path)[-1]["reason"]


def test_a_server_error_echoing_the_key_is_not_written(space, tmp_path):
    ctx = make_context(space)
    with OpenAIServer() as server:
        server.push(Fail(400, f"Incorrect API key provided: {FAKE_KEY}"))  # not retried
        llm = proposer(server, tmp_path)
        out = llm.propose(ctx, space, k=1)
    assert out == SkillProposer().propose(ctx, space, 1)
    assert "BadRequestError" in transcript(tmp_path)[-1]["reason"]
    assert_key_nowhere(tmp_path)


def test_unreachable_endpoint_is_a_clear_error_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    llm = LLMProposer(base_url=url, api_key=FAKE_KEY, model="m", run_dir=tmp_path)
    with pytest.raises(LLMEndpointError, match=f"LLM endpoint {url} is unreachable"):
        llm.check(timeout=2)


def test_model_is_taken_from_a_single_model_endpoint(tmp_path):
    with OpenAIServer(model="Qwen/Qwen3-8B") as server:
        llm = LLMProposer(base_url=server.base_url, api_key=FAKE_KEY, run_dir=tmp_path)
        assert llm.check() == ["Qwen/Qwen3-8B"]
    assert llm.model == "Qwen/Qwen3-8B"


def test_settings_come_from_environment_variables_and_the_key_stays_hidden(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMZERO_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLMZERO_API_KEY", FAKE_KEY)
    monkeypatch.setenv("LLMZERO_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_MODEL", "not-this-one")
    llm = LLMProposer(run_dir=tmp_path)
    assert (llm.base_url, llm.model) == ("http://127.0.0.1:9/v1", "env-model")
    assert FAKE_KEY not in repr(llm) and FAKE_KEY not in str(vars(llm).get("usage"))


def test_vision_sends_the_plot_as_a_data_url_and_saves_it_beside_the_transcript(space, tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    ctx = make_context(space, plot_png=png)
    with OpenAIServer() as server:
        server.push(reply({"beta": 0.0}))
        llm = proposer(server, tmp_path, vision=True)
        llm.propose(ctx, space, k=1)
        content = server.chat_requests()[0]["messages"][1]["content"]
    assert content[0]["type"] == "text" and content[1]["type"] == "image_url"
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    logged = transcript(tmp_path)[0]["messages"][1]["content"][1]["image_url"]["url"]
    assert (tmp_path / logged).read_bytes() == png


def test_prompt_lists_every_grid_and_asks_for_k(space):
    prompt = build_prompt(make_context(space), space, 4)
    for name in space.names:
        assert f"  {name}: " in prompt
    assert "propose 4 distinct settings" in prompt


# ---- the tree search ---------------------------------------------------------------------------

def node(tree: Tree, parent: Node, dev: float) -> Node:
    return tree.add(parent, {"learning_rate": dev}, state=None, dev_score=dev)


def test_early_stopping_prunes_a_branch_behind_the_best_curve():
    # Depth 1: A (0.6) and B (0.3); B trails the best at its depth by more than the margin.
    root = Node(id=0, depth=0, hparams={}, state=None, dev_score=0.5)
    tree = Tree(root, max_depth=3, c_uct=10.0, margin=0.1)
    root.expanded = True
    a, b = node(tree, root, 0.6), node(tree, root, 0.3)
    assert tree.behind(b) and not tree.behind(a)
    assert tree.next_leaf(cost=2) == (a, 0)
    a.expanded = True
    node(tree, a, 0.7)
    node(tree, a, 0.65)
    # A large exploration constant makes plain UCT pick the less-visited B next; early stopping
    # refuses, expands under A instead, and counts the K stages B would have cost.
    assert tree.select(root, prune=False) is b
    leaf, saved = tree.next_leaf(cost=2)
    assert leaf is not None and leaf.parent is a and saved == 2
    assert tree.pruned() == [b]
    # A branch within the margin is not pruned.
    tree.margin = 0.5
    assert not tree.behind(b) and tree.pruned() == []


def test_uct_prefers_the_better_subtree_when_exploration_is_off():
    root = Node(id=0, depth=0, hparams={}, state=None, dev_score=0.0)
    tree = Tree(root, max_depth=3, c_uct=0.0, margin=1.0)
    root.expanded = True
    low, high = node(tree, root, 0.1), node(tree, root, 0.2)
    assert tree.select(root) is high
    high.expanded = True
    node(tree, high, 0.0)  # the subtree's value is its best node, not its newest
    assert high.best == 0.2 and root.visits == 4 and high.visits == 2
    assert tree.select(root).parent is high
    assert low.visits == 1


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


def check_tree(result) -> list[dict]:
    nodes = result.tree["nodes"]
    assert len(nodes) - 1 == result.cost["stages"]   # one node per trained stage
    for n in nodes[1:]:
        parent = nodes[n["parent"]]
        assert parent["expanded"] and n["depth"] == parent["depth"] + 1
    assert nodes[0]["visits"] == len(nodes)
    best = max(n["dev_score"] for n in nodes)
    assert result.dev_score == best
    return nodes


def test_skills_tree_search_spends_exactly_its_budget_and_is_deterministic(tiny_model_dir):
    results = []
    for _ in range(2):
        env = make_env(tiny_model_dir)
        result = controllers.make("llmzero", proposer="skills", k=2).run(env, budget=4, seed=0)
        assert env.unwrapped.budget.stages == 4 and result.cost["stages"] == 4
        results.append(result)
    nodes = check_tree(results[0])
    assert [n["depth"] for n in nodes] == [0, 1, 1, 2, 2]  # root's K, then the best child's K
    assert all(n["source"] == "skills" for n in nodes[1:])
    assert results[0].cost["llm_tokens"] == 0
    assert results[0].tree == results[1].tree
    assert results[0].schedule == results[1].schedule


def test_tree_search_stops_when_the_tree_is_exhausted(tiny_model_dir):
    # Two-stage episodes, K=2, nothing pruned: the whole tree is 2 + 2*2 = 6 stages < budget 10.
    env = make_env(tiny_model_dir, stages=2)
    result = LLMZero(k=2, margin=1.0).run(env, budget=10, seed=0)
    assert env.unwrapped.budget.stages == 6 < 10
    nodes = check_tree(result)
    assert sum(n["terminal"] for n in nodes) == 4 and result.tree["pruned"] == []


def test_llm_tree_search_through_the_local_server(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMZERO_API_KEY", FAKE_KEY)
    lrs = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    calls = []

    def respond(body: dict) -> str:  # a different, valid pair of proposals for every request
        i = len(calls)
        calls.append(body)
        return reply({"learning_rate": lrs[i % 5], "beta": 0.0},
                     {"learning_rate": lrs[(i + 2) % 5], "temperature": 1.3},
                     diagnosis=f"expansion {i}")

    env = make_env(tiny_model_dir)
    with OpenAIServer(default=respond) as server:
        server.push("no JSON here")  # the first reply is malformed and retried
        agent = controllers.make("llmzero", proposer="llm", k=2, base_url=server.base_url,
                                 model="test-model", run_dir=str(tmp_path / "run"), vision=True)
        result = agent.run(env, budget=5, seed=0)
        bodies = server.chat_requests()
    assert env.unwrapped.budget.stages == 5
    nodes = check_tree(result)
    assert all(n["source"] == "llm" for n in nodes[1:])
    assert nodes[1]["hparams"]["learning_rate"] == 1e-5 and nodes[1]["hparams"]["beta"] == 0.0
    # Three expansions (root, then two leaves) took four requests: one retry.
    usage = result.tree["llm_usage"]
    assert (usage["expansions"], usage["requests"], usage["invalid_replies"]) == (3, 4, 1)
    assert result.cost["llm_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # Deeper prompts carry the path, the siblings and the plot.
    last = bodies[-1]["messages"][1]["content"]
    assert "stage 1:" in last[0]["text"] and "siblings" in last[0]["text"]
    assert last[1]["image_url"]["url"].startswith("data:image/png;base64,")
    run = tmp_path / "run"
    assert len(transcript(run)) >= 4 and (run / "tree.json").exists()
    assert list(run.glob("curves_*.png"))
    # The key reached the server, and nothing the run wrote or returned holds it.
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    assert_key_nowhere(tmp_path)
    for text in (repr(agent), repr(result.tree), repr(result.cost), repr(result.schedule)):
        assert FAKE_KEY not in text


def test_an_unreachable_endpoint_fails_before_any_stage(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    env = make_env(tiny_model_dir)
    agent = LLMZero(proposer="llm", base_url=url, api_key=FAKE_KEY, model="m",
                    run_dir=str(tmp_path))
    with pytest.raises(LLMEndpointError, match=url):
        agent.run(env, budget=3, seed=0)
    assert env.unwrapped.budget.stages == 0
