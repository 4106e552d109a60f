"""What the prefix producers need from a prompt tokenizer, apart from any implementation
(``epp.kvcache.tokens`` holds the local and render ones, with their HTTP and tokenizer
dependencies), so the producers and the scheduler's plugins import no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint


class TokenizationError(Exception):
    """The prompt could not be tokenized; the request is routed without prefix data."""


class PromptTokenizer(Protocol):
    """Turns a request into the token ids the engine will see."""

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]: ...
