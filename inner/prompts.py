"""How a task's prompt becomes model input, and which part of a completion is scored.

A chat model (its tokenizer has a chat template, as Qwen3's does) is trained and evaluated through
that template: a system and a user message, then the assistant's turn, with Qwen3's
`enable_thinking` switch. A tokenizer without a template (the embedded char-level models) gets
the raw prompt. Either way, a completion is scored on the text after its last `</think>`: the
thoughts before it are not the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the problem, then give the final answer in the format "
    "the problem asks for."
)
THINK_END = "</think>"


def final_answer(completion: str) -> str:
    """The part of a completion that is scored: the text after its last `</think>`, if any."""
    return completion.rsplit(THINK_END, 1)[-1]


@dataclass
class PromptFormat:
    """Renders task prompts for one tokenizer: through its chat template when it has one.

    enable_thinking=False (the default) makes Qwen3 answer at once: its template then writes an
    empty think block into the prompt. Thinking runs to thousands of tokens, far past the
    paper-scale completion lengths (256-2048).
    """

    tokenizer: Any
    enable_thinking: bool = False
    system_prompt: str | None = SYSTEM_PROMPT

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str) -> str:
        """The text the model sees for one task prompt."""
        if not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=self.enable_thinking,
        )

    def encode(self, prompts: list[str], device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Left-padded (input_ids, attention_mask) of the rendered prompts, on `device`."""
        # A template writes every special token itself; TRL too tokenizes its output without
        # adding any (a tokenizer that prepends BOS would otherwise get two).
        enc = self.tokenizer(
            [self.render(p) for p in prompts],
            padding=True,
            return_tensors="pt",
            add_special_tokens=not self.chat,
        )
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)
