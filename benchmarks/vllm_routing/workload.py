"""The workloads, as pure functions of a shape, a seed and a word list: the same requests,
in the same order, for every router.

- **single-turn**: each request is one tenant's system prompt + a fresh question; the
  tenant of each request is drawn uniformly.
- **multi-turn**: every tenant has a few users; each user holds one conversation of
  several turns, and turn k's prompt is the system prompt + every earlier turn (question
  and a scripted answer) + the new question. A few conversations are active at a time;
  each round every active one takes a turn, in a shuffled order, so one conversation's
  turns are spread out and interleave with others' (and a client-side round-robin does
  not pin conversations by accident).
  A turn is sent only once the previous turn of its conversation has finished.

The answers in the history are scripted, not the model's: its random weights produce
noise that the tokenizer does not always re-encode to the same tokens, and scripted
answers keep the prompts identical for every router. vLLM caches each turn's prompt
blocks, so the next turn still finds everything up to the previous question cached.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SINGLE_TURN = "single-turn"
MULTI_TURN = "multi-turn"
WORKLOADS = (SINGLE_TURN, MULTI_TURN)
# Byte-level BPE marks a leading space with this character.
BPE_SPACE = "\u0120"
WORD_LENGTHS = range(3, 11)

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Shape:
    """How big the workloads are."""

    tenants: int = 6
    system_words: int = 1000  # ~1 token per word with vocabulary words
    question_words: tuple[int, int] = (12, 32)
    single_turn_requests: int = 240
    users_per_tenant: int = 4
    turns: int = 5
    answer_words: tuple[int, int] = (20, 40)
    active_conversations: int = 6
    max_tokens: int = 8
    seed: int = 7

    def describe(self) -> dict[str, str]:
        """The shape in words, for the report."""
        q, a = self.question_words, self.answer_words
        return {
            SINGLE_TURN: (f"{self.single_turn_requests} requests, tenant drawn uniformly from "
                          f"{self.tenants}; system prompt {self.system_words} words + a fresh "
                          f"question of {q[0]}-{q[1]} words; {self.max_tokens} output tokens"),
            MULTI_TURN: (f"{self.tenants} tenants x {self.users_per_tenant} users = "
                         f"{self.tenants * self.users_per_tenant} conversations x "
                         f"{self.turns} turns = {self.multi_turn_requests} requests, "
                         f"{self.active_conversations} conversations active at a time; each "
                         f"turn adds a {q[0]}-{q[1]}-word question and a scripted "
                         f"{a[0]}-{a[1]}-word answer; {self.max_tokens} output tokens"),
        }

    @property
    def multi_turn_requests(self) -> int:
        return self.tenants * self.users_per_tenant * self.turns


@dataclass(frozen=True)
class BenchRequest:
    """One chat request of a workload."""

    index: int  # position in the schedule
    tenant: int
    messages: tuple[Message, ...]
    after: int | None = None  # index of the request that must finish first
    conversation: int | None = None

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Workload:
    name: str
    tenants: int
    requests: tuple[BenchRequest, ...]


def vocabulary_words(tokenizer_json: Path, count: int = 3000, seed: int = 0) -> list[str]:
    """Words that are one token each (with their leading space) in a byte-level BPE
    ``tokenizer.json``: text made of them is about one token per word."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    words = sorted(token[1:] for token in vocab
                   if token.startswith(BPE_SPACE) and token[1:].isascii()
                   and token[1:].isalpha() and token[1:].islower()
                   and len(token) - 1 in WORD_LENGTHS)
    if len(words) < 100:
        raise ValueError(f"{tokenizer_json}: only {len(words)} single-token words")
    return random.Random(seed).sample(words, min(count, len(words)))


def _text(rng: random.Random, words: Sequence[str], n: int) -> str:
    out = " ".join(rng.choice(words) for _ in range(max(1, n)))
    return out[0].upper() + out[1:] + "."


def system_prompts(shape: Shape, words: Sequence[str]) -> list[str]:
    """One system prompt per tenant, the same in both workloads."""
    rng = random.Random(f"{shape.seed}-system")
    return [f"You are the assistant of tenant {t}. " + _text(rng, words, shape.system_words)
            for t in range(shape.tenants)]


def single_turn(shape: Shape, words: Sequence[str]) -> Workload:
    """System prompt + a fresh question per request."""
    systems = system_prompts(shape, words)
    rng = random.Random(f"{shape.seed}-single")
    requests = []
    for i in range(shape.single_turn_requests):
        tenant = rng.randrange(shape.tenants)
        question = _text(rng, words, rng.randint(*shape.question_words))
        requests.append(BenchRequest(i, tenant, (("system", systems[tenant]),
                                                 ("user", question))))
    return Workload(SINGLE_TURN, shape.tenants, tuple(requests))


def multi_turn(shape: Shape, words: Sequence[str]) -> Workload:
    """Conversations that resend their growing history, interleaved round-robin over
    ``active_conversations`` slots (a finished conversation's slot takes the next one)."""
    systems = system_prompts(shape, words)
    rng = random.Random(f"{shape.seed}-multi")
    conversations = [(t, u) for t in range(shape.tenants) for u in range(shape.users_per_tenant)]
    rng.shuffle(conversations)
    # Every turn's question and answer, drawn up front so the order does not change them.
    script = [[(_text(rng, words, rng.randint(*shape.question_words)),
                _text(rng, words, rng.randint(*shape.answer_words)))
               for _ in range(shape.turns)] for _ in conversations]
    waiting = list(range(len(conversations)))
    active: list[int] = []
    history: dict[int, list[Message]] = {}
    next_turn: dict[int, int] = {}
    last_index: dict[int, int] = {}
    requests: list[BenchRequest] = []
    while waiting or active:
        while waiting and len(active) < max(1, shape.active_conversations):
            c = waiting.pop(0)
            active.append(c)
            history[c] = [("system", systems[conversations[c][0]])]
            next_turn[c] = 0
        order = list(active)
        rng.shuffle(order)  # users do not take turns in lockstep
        for c in order:
            question, answer = script[c][next_turn[c]]
            messages = (*history[c], ("user", question))
            requests.append(BenchRequest(len(requests), conversations[c][0], messages,
                                         after=last_index.get(c), conversation=c))
            last_index[c] = len(requests) - 1
            history[c] = [*messages, ("assistant", answer)]
            next_turn[c] += 1
            if next_turn[c] == shape.turns:
                active.remove(c)
    return Workload(MULTI_TURN, shape.tenants, tuple(requests))


def build(name: str, shape: Shape, words: Sequence[str]) -> Workload:
    return {SINGLE_TURN: single_turn, MULTI_TURN: multi_turn}[name](shape, words)


def pin_tenants(tenants: int, servers: int) -> dict[int, int]:
    """The hand-pinned reference: tenants in the order of a stable hash of their name,
    dealt round-robin over the servers, so every server gets the same number of tenants
    (±1) and no prefix is held twice: the best a static assignment can do."""
    def key(t: int) -> bytes:
        return hashlib.sha256(f"tenant-{t}".encode()).digest()
    order = sorted(range(tenants), key=key)
    return {t: i % servers for i, t in enumerate(order)}


def ideal_cached_tokens(prompts: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Per prompt, the tokens an engine with an unbounded cache would report cached after
    every earlier prompt ran on it: the longest run of whole blocks some earlier prompt
    began with, never the last token (vLLM always computes at least one)."""
    block_ids: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent id, tokens) -> id
    out = []
    for tokens in prompts:
        usable = (len(tokens) - 1) // block_size if tokens else 0
        parent, hit, matching = -1, 0, True
        for b in range(len(tokens) // block_size):
            key = (parent, tuple(tokens[b * block_size:(b + 1) * block_size]))
            found = block_ids.get(key)
            if found is None:
                found = block_ids[key] = len(block_ids)
                matching = False  # every later block of this prompt is new too
            elif matching and b < usable:
                hit += 1
            parent = found
        out.append(hit * block_size)
    return out
