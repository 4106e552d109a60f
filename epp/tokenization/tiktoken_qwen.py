"""The built-in Qwen3.6 vocabulary encoded with tiktoken: the same ids as the HF
tokenizer (the vocabulary is tiktoken's native format), about 6x faster per prompt.

The HF tokenizer normalizes text to NFC before splitting; tiktoken does not, so this
wrapper normalizes first. Chat rendering and special-token splitting come from the HF
side (:class:`LocalTokenizer`), so both paths see the same rendered text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import tiktoken

from epp.tokenization.local import LocalTokenizer
from epp.tokenization.qwen import load_qwen_ranks, qwen_pattern, qwen_special_tokens


class TiktokenQwenTokenizer:
    """``encode``/``encode_batch`` with tiktoken; ``render_chat`` from the HF side."""

    def __init__(self, hf: LocalTokenizer) -> None:
        self._hf = hf
        self.special_token_pattern: re.Pattern[str] = hf.special_token_pattern
        self._enc = tiktoken.Encoding(
            name="qwen3_6", pat_str=qwen_pattern(), mergeable_ranks=load_qwen_ranks(),
            special_tokens=qwen_special_tokens())

    def encode(self, text: str) -> list[int]:
        """Token ids; special-token strings in the text map to their ids."""
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once."""
        return [self.encode(t) for t in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The model's chat template, rendered."""
        return self._hf.render_chat(messages, tools, add_generation_prompt)
