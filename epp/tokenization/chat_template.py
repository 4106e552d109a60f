"""Render a model's jinja2 chat template the way transformers' ``apply_chat_template`` does.

The prompt we tokenize must be the prompt vLLM renders, so the environment matches
transformers': a sandboxed environment (immutable: templates cannot mutate the messages)
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that keeps non-ASCII characters and does not HTML-escape, the globals
``raise_exception`` and ``strftime_now``, and the variables ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` plus any extra keyword arguments
(``enable_thinking``, ``documents``...). ``{% generation %}`` blocks (used by some templates
to mark assistant text for training masks) render their body unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(Exception):
    """A chat template that does not compile, or a conversation it refuses to render.

    Raised for template syntax errors, ``raise_exception(...)`` calls in the template, and
    errors while rendering (undefined values used wrongly, unserialisable tool arguments).
    """


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes '<', '>', '&' and "'", which models never saw.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: renders the body as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 types it as an instance attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)  # the 'generation' name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class ChatTemplate:
    """A chat template compiled once; :meth:`render` turns a conversation into prompt text.

    Thread-safe: rendering holds no state between calls. Note that templates calling
    ``strftime_now`` render differently from day to day, as they do in vLLM.
    """

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages`` (OpenAI chat messages) and ``tools``.

        Extra keyword arguments become template variables and may override
        ``bos_token``/``eos_token``, as in transformers.
        """
        variables: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(variables)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError) as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
