"""The tiktoken path for the built-in Qwen vocabulary gives the HF tokenizer's ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.tokenization.local import LocalTokenizer
from epp.tokenization.qwen import ensure_qwen_tokenizer
from epp.tokenization.tiktoken_qwen import TiktokenQwenTokenizer

TEXTS = [
    "Hello world!",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "Cafe\u0301 with a combining accent, and caf\u00e9 precomposed",  # NFC matters
    "東京タワー 😀👍🏽 12345678 3.14159",
    "def f(x):\n\treturn x  # tabs\n\n\n    spaces   \r\n",
    Path(__file__).read_text(encoding="utf-8"),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[LocalTokenizer, TiktokenQwenTokenizer]:
    hf = LocalTokenizer.from_dir(ensure_qwen_tokenizer(tmp_path_factory.mktemp("qwen")))
    return hf, TiktokenQwenTokenizer(hf)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_same_ids_as_hf(tokenizers: tuple[LocalTokenizer, TiktokenQwenTokenizer],
                        text: str) -> None:
    hf, fast = tokenizers
    assert fast.encode(text) == hf.encode(text)


def test_chat_rendering_is_the_hf_template(
        tokenizers: tuple[LocalTokenizer, TiktokenQwenTokenizer]) -> None:
    hf, fast = tokenizers
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert fast.render_chat(messages) == hf.render_chat(messages)
    assert fast.encode_batch(["a b", "c"]) == [hf.encode("a b"), hf.encode("c")]
