"""In-process tokenization with HF ``tokenizers`` and the model's chat template.

A :class:`LocalTokenizer` reads a Hugging Face tokenizer directory (``tokenizer.json``,
``tokenizer_config.json``, optionally ``chat_template.jinja``) and tokenizes the way vLLM
does for a rendered chat prompt: nothing is added around the text, and special-token
strings inside the text become their ids.

Loading reads and parses tens of megabytes (about half a second) and encoding a long
prompt takes milliseconds (10-16 ms for 8,000 tokens): both block, so async callers run them
in a thread (``await asyncio.to_thread(LocalTokenizer.from_dir, path)``); encoding releases
the GIL while it works. A ``LocalTokenizer`` is safe to share between threads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from epp.tokenization.chat_template import ChatTemplate, ChatTemplateError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer HF repos keep the template here


class TokenizerLoadError(Exception):
    """A tokenizer directory that is missing files or holds files we cannot read."""


class LocalTokenizer:
    """A model's tokenizer and chat template, loaded from a directory.

    ``special_token_pattern`` is a compiled regex matching any added (special) token string.
    Encoding splits text at these tokens before anything else, so the pieces of a text cut at
    the matches (the matches kept as pieces, see :meth:`split_at_special_tokens`) encode to
    the same ids as the whole text: callers can encode and cache repeated segments
    separately. (That holds for added tokens without ``lstrip``/``rstrip``/``single_word``
    flags, which absorb or depend on neighbouring whitespace; the Qwen tokenizers set none.)
    """

    def __init__(
        self, tokenizer: Tokenizer, chat_template: ChatTemplate | None, *, name: str = ""
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self.name = name
        # Every added token is cut out of the text before normalization and BPE; longest
        # first, so the regex alternation picks the longest token at a position, as HF does.
        added = sorted(
            {t.content for t in tokenizer.get_added_tokens_decoder().values()},
            key=lambda s: (-len(s), s),
        )
        self.special_token_pattern: re.Pattern[str] = re.compile(
            "|".join(re.escape(s) for s in added) if added else r"(?!)"
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> LocalTokenizer:
        """Load ``tokenizer.json`` and the chat template from a tokenizer directory.

        The template comes from ``chat_template.jinja`` when present, else from
        ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named
        templates, of which ``default`` is used). Blocking: call it off the event loop.
        """
        directory = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises bare Exception for I/O and parse errors
            raise TokenizerLoadError(f"cannot load {directory / TOKENIZER_FILE}: {exc}") from exc
        config = _read_config(directory / CONFIG_FILE)
        template_file = directory / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            source: str | None = template_file.read_text(encoding="utf-8")
        else:
            source = _template_from_config(config.get("chat_template"))
        template = None
        if source is not None:
            try:
                template = ChatTemplate(
                    source,
                    bos_token=_token_text(config.get("bos_token")),
                    eos_token=_token_text(config.get("eos_token")),
                )
            except ChatTemplateError as exc:
                raise TokenizerLoadError(f"{directory}: {exc}") from exc
        return cls(tokenizer, template, name=directory.name)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, special-token strings recognised."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in parallel inside the tokenizer."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def split_at_special_tokens(self, text: str) -> list[str]:
        """``text`` cut before and after every special token; empty pieces dropped."""
        pieces: list[str] = []
        start = 0
        for match in self.special_token_pattern.finditer(text):
            if match.start() > start:
                pieces.append(text[start : match.start()])
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The model's prompt text for a chat conversation (see :class:`ChatTemplate`)."""
        if self._chat_template is None:
            raise ChatTemplateError(f"tokenizer {self.name!r} has no chat template")
        return self._chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
        )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise TokenizerLoadError(f"{path} is not a JSON object")
    return config


def _template_from_config(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
    raise TokenizerLoadError(f"unsupported chat_template in tokenizer config: {type(value)}")


def _token_text(value: object) -> str | None:
    """A special token as configs spell it: a string, null, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerLoadError(f"unsupported special token entry in tokenizer config: {value!r}")
