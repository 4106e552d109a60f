"""Prefill/decode disaggregation: role filters, the P/D profile handler with a
token-exact decider, and the pre-request hook that names the prefill pod.

Roles come from the endpoint label ``llm-d.ai/role``: ``prefill``, ``decode``, ``both``
(or ``prefill-decode``); an endpoint without the label serves both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from epp.datastore import Endpoint
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.scheduling.registry import NoParams, PluginDeps, PluginParams
from epp.scheduling.types import (
    HeaderChanges,
    ProfileResult,
    SchedulingContext,
    SchedulingResult,
)

log = logging.getLogger(__name__)

PREFILLER_HEADER = "x-prefiller-host-port"
PREFILL_ROLES = frozenset({"prefill", "both", "prefill-decode"})
DECODE_ROLES = frozenset({"decode", "both", "prefill-decode"})
# Below this many tokens to prefill, shipping the KV cache from a prefill pod costs more
# than computing it where the request decodes. Derivation: an H100 prefills an 8B model at
# ~20k tokens/s (256 tokens ~ 13 ms), about the fixed cost of the extra hop (a prefill
# request, a KV transfer handshake, one more queue). Above it, prefill compute dominates
# and moving it off the decode pod protects other requests' inter-token latency.
DEFAULT_NON_CACHED_TOKENS = 256
DECISION_DECODE_ONLY = "decode-only"
DECISION_DISAGGREGATED = "prefill-decode"


class _RoleFilter:
    type_name = ""
    Params = NoParams
    roles: frozenset[str] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name)

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        roles = self.roles
        return [e for e in endpoints if e.role in roles]


class PrefillFilter(_RoleFilter):
    """Keeps endpoints that can prefill (role prefill, both, or unlabelled)."""

    type_name = "prefill-filter"
    roles = PREFILL_ROLES


class DecodeFilter(_RoleFilter):
    """Keeps endpoints that can decode (role decode, both, or unlabelled)."""

    type_name = "decode-filter"
    roles = DECODE_ROLES


class PDParams(PluginParams):
    """``decider``: ``non-cached-tokens`` (default), ``always`` or ``never``;
    ``nonCachedTokens``: the threshold of the default decider."""

    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    decider: Literal["non-cached-tokens", "always", "never"] = "non-cached-tokens"
    non_cached_tokens: int = DEFAULT_NON_CACHED_TOKENS


class PDProfileHandler:
    """Runs the decode profile; disaggregates when the prompt tokens the chosen decode pod
    does not already hold reach ``nonCachedTokens``, counting exact tokens from the
    prefix-match producer (characters / 4 only when no producer ran)."""

    type_name = "pd-profile-handler"
    Params = PDParams

    def __init__(self, name: str, params: PDParams, deps: PluginDeps) -> None:
        if params.non_cached_tokens < 0:
            raise ValueError("nonCachedTokens must not be negative")
        if params.decode_profile == params.prefill_profile:
            raise ValueError("decodeProfile and prefillProfile must differ")
        self.name = name
        self.params = params
        self.decisions: dict[str, int] = {DECISION_DECODE_ONLY: 0, DECISION_DISAGGREGATED: 0}
        self._metric = deps.pd_decisions

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, params, deps)

    def validate_profiles(self, profiles: Sequence[str]) -> str | None:
        missing = [p for p in (self.params.decode_profile, self.params.prefill_profile)
                   if p not in profiles]
        if missing:
            return (f"pd-profile-handler needs profiles {self.params.decode_profile!r} and "
                    f"{self.params.prefill_profile!r}; missing {missing}")
        return None

    def pick_profiles(self, ctx: SchedulingContext, profiles: Sequence[str],
                      results: Mapping[str, ProfileResult]) -> list[str]:
        decode, prefill = self.params.decode_profile, self.params.prefill_profile
        if decode not in results:
            return [decode]
        if prefill in results or not results[decode].endpoints:
            return []
        disaggregate = self._decide(ctx, results[decode].endpoints[0])
        self._count(DECISION_DISAGGREGATED if disaggregate else DECISION_DECODE_ONLY)
        return [prefill] if disaggregate else []

    def _decide(self, ctx: SchedulingContext, decode_pod: Endpoint) -> bool:
        decider = self.params.decider
        if decider == "always":
            return True
        if decider == "never" or ctx.request is None:
            return False
        match: PrefixMatch | None = ctx.cycle.get(PREFIX_MATCH_KEY)
        if match is not None:
            uncached = match.uncached_tokens(decode_pod.name)
        else:
            uncached = ctx.request.estimated_tokens()
        return uncached >= self.params.non_cached_tokens

    def _count(self, decision: str) -> None:
        self.decisions[decision] += 1
        if self._metric is not None:
            self._metric(decision)

    def primary(self, ctx: SchedulingContext, results: Mapping[str, ProfileResult]) -> str:
        return self.params.decode_profile


class PrefillHeaderParams(PluginParams):
    """``prefillProfile``: whose pick goes into ``x-prefiller-host-port``."""

    prefill_profile: str = "prefill"


class PrefillHeaderHandler:
    """Pre-request: puts the prefill pick in ``x-prefiller-host-port`` for the decode pod's
    sidecar, and always drops a client-supplied value (clients must not choose)."""

    type_name = "prefill-header-handler"
    Params = PrefillHeaderParams

    def __init__(self, name: str, prefill_profile: str) -> None:
        self.name = name
        self.prefill_profile = prefill_profile

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, params.prefill_profile)

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None:
        prefill = result.profiles.get(self.prefill_profile)
        if prefill is not None and prefill.endpoints:
            headers.set[PREFILLER_HEADER] = prefill.endpoints[0].address
        else:
            headers.remove.append(PREFILLER_HEADER)
