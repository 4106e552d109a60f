"""Prompt token ids as the engine sees them: the tokenizer interface and its two sources.

- ``qwen``: the Qwen3.5/3.6 vocabulary, generated offline (``ensure_qwen_tokenizer``),
  encoded with tiktoken (the same ids as HF ``tokenizers``, ~6x faster) and rendered with
  its chat template.
- ``hf``: ``epp.tokenization.LocalTokenizer`` on any HF tokenizer directory.
- ``bytes``: every UTF-8 byte is one token id and chat renders as ChatML-like text. A real,
  deterministic tokenizer that needs no files, for fast tests.

Completions prompts are encoded as given (token id prompts pass through); chat messages
are rendered with ``render_chat(messages, tools, add_generation_prompt=True)`` first,
exactly what the render endpoints return.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from epp.sim.config import SimConfig
from epp.sim.engine import ChatMessage, GenerationRequest, render_chat_prompt
from epp.sim.parsing import ApiError, ParsedRequest
from epp.tokenization.chat_template import ChatTemplateError

TOKENIZER_QWEN = "qwen"
TOKENIZER_BYTES = "bytes"
TOKENIZER_HF = "hf"  # any HF tokenizer directory (``tokenizer_dir``)
# Longer texts are encoded in a worker thread: ~4,000 characters is ~1,000 tokens, about
# 1 ms of HF tokenizers time, the longest the event loop should stall.
OFFLOAD_ENCODE_CHARS = 4000


class Tokenizer(Protocol):
    """What the sim needs from a tokenizer (``epp.tokenization.LocalTokenizer`` fits)."""

    def encode(self, text: str) -> list[int]: ...

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255); chat rendered as ChatML-like text."""

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, tools first."""
        text = render_chat_prompt([_chat_message(m) for m in messages], tools)
        if not add_generation_prompt:
            text = text.removesuffix(_GENERATION_PROMPT)
        return text


_GENERATION_PROMPT = render_chat_prompt([])  # what add_generation_prompt appends


def _chat_message(message: dict[str, Any]) -> ChatMessage:
    content = message.get("content")
    if isinstance(content, list):  # text parts joined; images and audio carry no text
        text = "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text"
                         and isinstance(p.get("text"), str))
    else:
        text = content if isinstance(content, str) else ""
    if message.get("tool_calls"):
        text += msgspec.json.encode(message["tool_calls"]).decode()
    return ChatMessage(role=str(message.get("role", "")), text=text)


def load_tokenizer(config: SimConfig) -> Tokenizer | None:
    """The tokenizer ``config`` names (None: none, prompt lengths are estimated).

    Blocking: generating the Qwen tokenizer takes ~3 s the first time and loading one ~1 s,
    so async callers run this in a thread.
    """
    kind = config.tokenizer
    if kind is None:
        return None
    if kind == TOKENIZER_BYTES:
        return ByteTokenizer()
    # Imported here: only these two kinds need HF tokenizers (and tiktoken) loaded.
    from epp.tokenization import LocalTokenizer, ensure_qwen_tokenizer
    from epp.tokenization.tiktoken_qwen import TiktokenQwenTokenizer

    if kind == TOKENIZER_QWEN:
        return TiktokenQwenTokenizer(LocalTokenizer.from_dir(ensure_qwen_tokenizer()))
    assert config.tokenizer_dir is not None  # SimConfig checks hf has a directory
    return LocalTokenizer.from_dir(Path(config.tokenizer_dir))


@dataclasses.dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """One prompt as the engine will run it."""

    token_ids: tuple[int, ...]
    text: str | None  # the rendered text; None when the request gave token ids


async def render_prompts(tokenizer: Tokenizer, parsed: ParsedRequest) -> list[RenderedPrompt]:
    """Token ids (and text) of every prompt of ``parsed``, one per generation."""
    if parsed.chat is not None:
        tools = list(parsed.chat.tools) if parsed.chat.tools is not None else None
        try:
            text = tokenizer.render_chat(list(parsed.chat.messages), tools, True)
        except (ChatTemplateError, ValueError) as exc:  # like vLLM: the request's fault
            raise ApiError(400, str(exc), param="messages") from None
        return [RenderedPrompt(await _encode(tokenizer, text), text)]
    prompts: list[RenderedPrompt] = []
    for generation in parsed.generations:
        if generation.prompt_token_ids is not None:
            prompts.append(RenderedPrompt(generation.prompt_token_ids, None))
        else:
            assert generation.prompt_text is not None  # guaranteed by GenerationRequest
            text = generation.prompt_text
            prompts.append(RenderedPrompt(await _encode(tokenizer, text), text))
    return prompts


async def tokenize_request(tokenizer: Tokenizer | None, parsed: ParsedRequest) -> ParsedRequest:
    """``parsed`` with every generation's prompt as token ids (unchanged without tokenizer)."""
    if tokenizer is None:
        return parsed
    prompts = await render_prompts(tokenizer, parsed)
    generations = tuple(
        GenerationRequest(prompt_token_ids=p.token_ids, max_tokens=g.max_tokens)
        for p, g in zip(prompts, parsed.generations, strict=True)
    )
    return dataclasses.replace(parsed, generations=generations)


async def _encode(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    if len(text) > OFFLOAD_ENCODE_CHARS:
        return tuple(await asyncio.to_thread(tokenizer.encode, text))
    return tuple(tokenizer.encode(text))
