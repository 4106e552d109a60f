"""Benchmark workloads: seeded, deterministic request schedules for the router comparison.

Three shapes, each a list of :class:`BenchRequest` (arrival time in fleet seconds, chat
messages, output length, the exact prompt token ids):

- ``shared-prefix`` (:class:`SharedPrefix`): groups x users, one long system prompt per
  group and short questions, Poisson arrivals, shaped like llm-d's "KV-cache wins" run
  (150 groups x 5 users, 6,000-token system prompts, 1,200-token questions, KV demand
  above 70% of the fleet's cache) scaled to a small fleet.
- ``multi-turn`` (:class:`MultiTurn`): chat conversations whose history grows turn by turn
  (the previous turns' answers are the sim's deterministic output, so each turn's prompt
  extends the last one's exactly as a client would send it).
- ``no-sharing`` (:class:`NoSharing`): unique prompts, the control where prefix-aware
  routing has nothing to gain.

The same seed gives the same arrivals and prompts for every router.
"""

from __future__ import annotations

from benchmarks.workloads.shapes import (
    BenchRequest,
    MultiTurn,
    NoSharing,
    SharedPrefix,
    WorkloadSpec,
    kv_demand_tokens,
)
from benchmarks.workloads.text import PromptText, chat_body

__all__ = [
    "BenchRequest",
    "MultiTurn",
    "NoSharing",
    "PromptText",
    "SharedPrefix",
    "WorkloadSpec",
    "chat_body",
    "kv_demand_tokens",
]
