"""A local OpenAI-compatible HTTP server for tests: scripted chat-completion replies over real HTTP.

The one test double of the project, at a true boundary: the real `openai` client talks to it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fail:
    """A scripted HTTP failure (500, 429, ...) instead of a reply."""

    status: int = 500
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "2"}


@dataclass
class Raw:
    """A scripted body sent as is: a proxy's HTML page, a JSON content type with another body."""

    body: str
    content_type: str = "text/html; charset=utf-8"
    status: int = 200


@dataclass
class Hang:
    """No answer for `seconds` (a server that hangs); the server's exit ends the wait."""

    seconds: float = 60.0


@dataclass
class Reply:
    """A scripted reply with the extras some servers send (vLLM's reasoning parser)."""

    content: str | None
    reasoning_content: str | None = None


# A scripted item is the assistant's content (str), a Reply, a Fail, a Raw, a Hang, or a
# callable(request_json) -> one of those.
Item = str | Reply | Fail | Raw | Hang | Callable[[dict], "str | Reply | Fail | Raw | Hang"]

# What OpenAI answers a reasoning model's max_tokens (the wording the client must understand).
MAX_TOKENS_REFUSED = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                      "Use 'max_completion_tokens' instead.")


def approx_tokens(text: str) -> int:
    """Tokenizer-free token count, ~4 characters per token, so usage numbers are deterministic."""
    return max(1, len(text) // 4)


def message_text(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@dataclass
class OpenAIServer:
    """Serves POST /v1/chat/completions from a queue of scripted items, and GET /v1/models.

    `default` answers when the queue is empty (else a 500). Every request is kept in `requests`.
    As real servers do: a chat with a model other than `model` is a 404; a request carrying a
    parameter in `refuse` is a 400 with that parameter's message; a one-token request (the
    endpoint check) gets one token without using the script. With `api_key` set, a request
    without that bearer key gets OpenAI's 401, which echoes the key it got. `broken` (a Fail,
    Raw or Hang) answers every request, the model list and the check included.
    """

    model: str = "test-model"
    default: Item | None = None
    refuse: dict[str, str] = field(default_factory=dict)  # body parameter -> the 400's message
    api_key: str | None = None
    broken: Fail | Raw | Hang | None = None
    script: deque = field(default_factory=deque)
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        # A short poll interval: shutdown() waits for it, and tests start many servers.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *items: Item) -> None:
        with self._lock:
            self.script.extend(items)

    def chat_requests(self) -> list[dict]:
        """Bodies of the chats that got past the checks: the scripted ones."""
        return [r["body"] for r in self.requests
                if r["path"].endswith("/chat/completions") and r.get("scripted")]

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _refusal(self, headers: dict[str, str]) -> Fail | Raw | Hang | None:
        """What a broken server or a wrong key gets instead of an answer, if anything."""
        if self.broken is not None:
            return self.broken
        given = headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and given != self.api_key:
            return Fail(401, f"Incorrect API key provided: {given}. You can find your API key "
                             "at https://platform.openai.com/account/api-keys.")
        return None

    def _answer(self, body: dict, record: dict) -> Reply | Fail | Raw | Hang:
        """The checks a real server makes, then the next scripted item."""
        if body.get("model") != self.model:
            return Fail(404, f"The model `{body.get('model')}` does not exist.")
        for name, message in self.refuse.items():
            if name in body:
                return Fail(400, message)
        if 1 in (body.get("max_completion_tokens"), body.get("max_tokens")):
            return Reply("O")
        with self._lock:
            record["scripted"] = True
            item = self.script.popleft() if self.script else self.default
        if item is None:
            return Fail(500, "script exhausted")
        item = item(body) if callable(item) else item
        return Reply(item) if isinstance(item, str) else item


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, body: dict | None) -> dict:
            with server._lock:
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"path": self.path, "headers": headers, "body": body})
                return server.requests[-1]

        def _send_other(self, item: Fail | Raw | Hang) -> None:
            """A failure, a raw body, or a hang (then nothing, if the server is closing)."""
            if isinstance(item, Hang):
                if server._closing.wait(item.seconds):
                    return
                item = Fail(504, "gave up waiting")
            if isinstance(item, Fail):
                error = {"error": {"message": item.message, "type": "scripted"}}
                self._send(item.status, error, item.headers)
                return
            data = item.body.encode()
            self.send_response(item.status)
            self.send_header("Content-Type", item.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            record = self._record(None)
            if (refusal := server._refusal(record["headers"])) is not None:
                self._send_other(refusal)
                return
            if self.path.rstrip("/").endswith("/models"):
                model = {"id": server.model, "object": "model", "created": 0, "owned_by": "test"}
                self._send(200, {"object": "list", "data": [model]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "nf"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            record = self._record(body)
            if (refusal := server._refusal(record["headers"])) is not None:
                self._send_other(refusal)
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "nf"}})
                return
            item = server._answer(body, record)
            if isinstance(item, Fail | Raw | Hang):
                self._send_other(item)
                return
            prompt = "".join(message_text(m) for m in body.get("messages", []))
            p_tok = approx_tokens(prompt)
            c_tok = approx_tokens((item.reasoning_content or "") + (item.content or ""))
            usage = {"prompt_tokens": p_tok, "completion_tokens": c_tok,
                     "total_tokens": p_tok + c_tok}
            message = {"role": "assistant", "content": item.content}
            if item.reasoning_content is not None:
                message["reasoning_content"] = item.reasoning_content
            self._send(200, {
                "id": f"chatcmpl-{len(server.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", server.model),
                "choices": [{
                    "index": 0,
                    "message": message,
                    "finish_reason": "stop",
                }],
                "usage": usage,
            })

    return Handler
