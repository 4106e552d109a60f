"""The three workload shapes and their generators (see the package docstring)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from benchmarks.workloads.text import Message, PromptText
from epp.sim.engine import output_tokens


@dataclass(frozen=True)
class BenchRequest:
    """One request of a schedule; ``arrival_s`` is fleet time from the start of the run."""

    index: int
    arrival_s: float
    messages: tuple[Message, ...]
    max_tokens: int
    token_ids: tuple[int, ...]  # the prompt as the pods run it (chat template applied)
    tag: str  # the group or conversation it belongs to

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


class WorkloadSpec(Protocol):
    """A workload shape: a name, a summary, and a seeded schedule for a request rate."""

    @property
    def name(self) -> str: ...

    def describe(self) -> str: ...

    def generate(self, text: PromptText, rate: float, duration_s: float,
                 seed: int) -> list[BenchRequest]: ...


def _poisson(rng: random.Random, rate: float, duration_s: float) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second over ``duration_s``."""
    out: list[float] = []
    at = rng.expovariate(rate)
    while at < duration_s:
        out.append(at)
        at += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class SharedPrefix:
    """Groups x users: a long system prompt per group, a short question per request."""

    groups: int = 16
    users_per_group: int = 5
    system_tokens: int = 6000
    question_tokens: int = 1200
    output_tokens: tuple[int, int] = (32, 64)
    name: str = "shared-prefix"

    def describe(self) -> str:
        return (f"{self.groups} groups x {self.users_per_group} users, "
                f"{self.system_tokens:,}-token system prompt per group, "
                f"{self.question_tokens:,}-token questions, "
                f"{self.output_tokens[0]}-{self.output_tokens[1]} output tokens")

    def generate(self, text: PromptText, rate: float, duration_s: float,
                 seed: int) -> list[BenchRequest]:
        rng = random.Random(seed)
        # Prompts come from their own seed, so every rate of a sweep shares them.
        prompts = random.Random(seed * 7919 + 1)
        systems = [f"You are the assistant of tenant {g}. Their handbook follows."
                   + text.words_text(prompts, self.system_tokens - 14)
                   for g in range(self.groups)]
        out: list[BenchRequest] = []
        for at in _poisson(rng, rate, duration_s):
            group = rng.randrange(self.groups)
            user = rng.randrange(self.users_per_group)
            question = (f"User {group}-{user} asks:"
                        + text.words_text(rng, self.question_tokens - 8))
            messages = ({"role": "system", "content": systems[group]},
                        {"role": "user", "content": question})
            out.append(BenchRequest(len(out), at, messages, rng.randint(*self.output_tokens),
                                    text.render(messages).token_ids, f"group-{group}"))
        return out


@dataclass(frozen=True)
class MultiTurn:
    """Chat conversations that grow: each turn resends the history plus a new question.

    Conversations start as a Poisson process (``rate / turns`` per second, so ``rate`` is
    the request rate once conversations overlap); each next turn arrives a think time
    after the previous one, on the same schedule for every router whether or not the
    previous answer has finished. Turns after ``duration_s`` are cut (the window closes).
    """

    turns: int = 6
    system_tokens: int = 1000
    user_tokens: tuple[int, int] = (150, 450)
    output_tokens: tuple[int, int] = (32, 64)
    think_s: tuple[float, float] = (2.0, 4.0)  # minimum + exponential mean, fleet seconds
    name: str = "multi-turn"

    def describe(self) -> str:
        return (f"conversations of {self.turns} turns, {self.system_tokens:,}-token system "
                f"prompt each, {self.user_tokens[0]}-{self.user_tokens[1]}-token user "
                f"turns, {self.output_tokens[0]}-{self.output_tokens[1]} output tokens, "
                f"think time {self.think_s[0]:g} s + exp(mean {self.think_s[1]:g} s)")

    def generate(self, text: PromptText, rate: float, duration_s: float,
                 seed: int) -> list[BenchRequest]:
        rng = random.Random(seed)
        pending: list[tuple[float, str, tuple[Message, ...], int]] = []
        for conversation, start in enumerate(_poisson(rng, rate / self.turns, duration_s)):
            history: list[Message] = [{
                "role": "system",
                "content": f"Conversation {conversation}. Context:"
                           + text.words_text(rng, self.system_tokens - 6)}]
            at = start
            for turn in range(self.turns):
                history.append({"role": "user", "content": text.words_text(
                    rng, rng.randint(*self.user_tokens))})
                max_tokens = rng.randint(*self.output_tokens)
                if at >= duration_s:
                    break
                pending.append((at, f"conversation-{conversation}", tuple(history), max_tokens))
                # The sim's answer is deterministic: the next turn carries it verbatim.
                history.append({"role": "assistant",
                                "content": "".join(output_tokens(max_tokens))})
                at += self.think_s[0] + rng.expovariate(1 / self.think_s[1])
        pending.sort(key=lambda item: item[0])
        return [BenchRequest(i, at, messages, max_tokens, text.render(messages).token_ids, tag)
                for i, (at, tag, messages, max_tokens) in enumerate(pending)]


@dataclass(frozen=True)
class NoSharing:
    """Unique prompts: nothing to reuse, so only load balancing matters."""

    prompt_tokens: tuple[int, int] = (1500, 4500)
    output_tokens: tuple[int, int] = (32, 64)
    name: str = "no-sharing"

    def describe(self) -> str:
        return (f"unique prompts of {self.prompt_tokens[0]:,}-{self.prompt_tokens[1]:,} "
                f"tokens, {self.output_tokens[0]}-{self.output_tokens[1]} output tokens")

    def generate(self, text: PromptText, rate: float, duration_s: float,
                 seed: int) -> list[BenchRequest]:
        rng = random.Random(seed)
        out: list[BenchRequest] = []
        for at in _poisson(rng, rate, duration_s):
            content = f"Request {len(out)}-{rng.randrange(10**9)}:" + text.words_text(
                rng, rng.randint(*self.prompt_tokens))
            messages = ({"role": "user", "content": content},)
            out.append(BenchRequest(len(out), at, messages, rng.randint(*self.output_tokens),
                                    text.render(messages).token_ids, f"request-{len(out)}"))
        return out


def kv_demand_tokens(requests: list[BenchRequest], block_size: int = 16) -> int:
    """Tokens of KV worth keeping: full prompt blocks (chained, as the engine keys them)
    that two or more requests of the schedule share. For groups that is every system
    prompt; for conversations every turn but the last. A fleet whose caches hold less
    than this must recompute some of it, whatever the router does."""
    seen: dict[int, int] = {}
    for request in requests:
        ids = request.token_ids
        key = 0
        for start in range(0, len(ids) - block_size + 1, block_size):
            key = hash((key, ids[start:start + block_size]))
            seen[key] = seen.get(key, 0) + 1
    return sum(1 for count in seen.values() if count > 1) * block_size
