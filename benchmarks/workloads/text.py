"""Prompt text with real token counts: words drawn from the Qwen3.5/3.6 vocabulary itself,
and exact prompt lengths from the same tokenizer and chat template the sim pods run.

Every word is one vocabulary token with its leading space (`` market``, `` delta``), so a
run of N words is about N tokens; the exact count of a whole chat prompt comes from
rendering the chat template and encoding it, as the engine does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from epp.tokenization import LocalTokenizer, ensure_qwen_tokenizer
from epp.tokenization.qwen import load_qwen_ranks
from epp.tokenization.tiktoken_qwen import TiktokenQwenTokenizer

# Words of 4-10 lowercase letters: ordinary-looking text, and each one token.
WORD_LENGTHS = range(4, 11)
# A fixed sample keeps prompts the same across vocabulary package upgrades that only add
# tokens at the end.
WORD_POOL_SIZE = 4000


Message = dict[str, str]


@dataclass(frozen=True)
class RenderedChat:
    """A chat request as the engine runs it: its token ids (the oracle looks them up)."""

    token_ids: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class PromptText:
    """Word pool + the pods' tokenizer: makes text of a given length and counts chats."""

    def __init__(self) -> None:
        self.tokenizer = TiktokenQwenTokenizer(LocalTokenizer.from_dir(ensure_qwen_tokenizer()))
        words = sorted(
            token.decode() for token in load_qwen_ranks()
            if token[:1] == b" " and token[1:].isalpha() and token[1:].islower()
            and token[1:].isascii() and len(token) - 1 in WORD_LENGTHS
        )
        self.words: tuple[str, ...] = tuple(random.Random(0).sample(words, WORD_POOL_SIZE))

    def words_text(self, rng: random.Random, tokens: int) -> str:
        """About ``tokens`` tokens of text (exact when every word stays one token)."""
        return "".join(rng.choice(self.words) for _ in range(max(1, tokens))).lstrip()

    def render(self, messages: Sequence[Message]) -> RenderedChat:
        """The prompt the pods will run for ``messages`` (chat template + generation prompt)."""
        text = self.tokenizer.render_chat(list(messages), None, True)
        return RenderedChat(tuple(self.tokenizer.encode(text)))


def chat_body(model: str, messages: Sequence[Message], max_tokens: int) -> dict[str, Any]:
    """The OpenAI request body every router gets: streamed, usage in the last chunk."""
    return {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
