"""Session affinity: llm-d's ``session-affinity-filter`` (a hard pin) and
``session-affinity-scorer`` (a soft preference), with llm-d's ``session_id`` strategy.

A client names its conversation in a header; the first request of a session goes
wherever scheduling sends it, and later ones go back there, to the KV cache of the
conversation so far. Sources, in order (llm-d's parameter ``sessionIdConfig.sources``):
by default the ``x-session-id`` header, then the session headers coding agents send,
which llm-d resolves into its ``agent-identity`` request attribute:
``x-claude-code-session-id`` (Claude Code), ``x-session-affinity`` (OpenCode),
``session-id`` and ``session_id`` (Codex, current and older builds).

Differences from llm-d, all because of what a plugin can do here:

- The default strategy is ``session_id``; llm-d's default, ``encoded_endpoint_header``,
  hands the client a token in a *response* header, which plugins cannot write here, so
  it is refused by name. For the same reason there is no ``agent-identity`` plugin: a
  source ``attribute: agent-identity`` reads its headers directly, and the default
  sources include them (llm-d's default reads ``x-session-id`` only).
- The binding table is bounded (``sessionIdConfig.maxSessions``, least recently used
  evicted first; llm-d's grows until its sweep) and keyed by a 128-bit digest of the
  session id, so its size in bytes does not depend on what clients send. Expiry
  (``evictionTtlSeconds`` since last use) is also checked on every read, not only by the
  sweep (``evictionSweepSeconds``), which runs from the pre-request hook.
- Stickiness yields to saturation like ``prefix-cache-affinity-filter``: when the bound
  endpoint's estimated time to first token exceeds the best other candidate's by more
  than ``maxTTFTPenaltyMs`` (0: never yield), the session expresses no preference and
  moves to wherever the request is routed (the conversation's newest KV goes with it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from epp.datastore import Endpoint
from epp.scheduling.plugins.affinity import DEFAULT_MAX_TTFT_PENALTY_MS
from epp.scheduling.plugins.inflight import TTFTEstimator
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult

STRATEGY_SESSION_ID = "session_id"
STRATEGY_ENCODED_ENDPOINT_HEADER = "encoded_endpoint_header"
# llm-d's default session id source.
SESSION_ID_HEADER = "x-session-id"
# llm-d's agent-identity attribute: the first of these headers that is set.
AGENT_IDENTITY_ATTRIBUTE = "agent-identity"
AGENT_SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity", "session-id",
                         "session_id")
# llm-d's eviction schedule: bindings unused for 5 minutes, swept every 10 s.
DEFAULT_EVICTION_TTL_S = 300.0
DEFAULT_EVICTION_SWEEP_S = 10.0
# Sessions remembered per plugin. An entry (16-byte digest key, binding record,
# OrderedDict link; the endpoint's name and address strings are shared) is ~235 B
# measured, so 100,000 sessions active within the TTL (e.g. 1,000 agents x 100
# conversations) hold ~24 MB.
DEFAULT_MAX_SESSIONS = 100_000


class SessionIdSource(msgspec.Struct, forbid_unknown_fields=True, rename="camel",
                      frozen=True):
    """One place to read the session id from: exactly one of ``header`` or
    ``attribute`` (``producer`` names the attribute's plugin, llm-d's field)."""

    header: str = ""
    attribute: str = ""
    producer: str = ""


class SessionIdConfig(msgspec.Struct, forbid_unknown_fields=True, rename="camel",
                      frozen=True):
    """llm-d's ``sessionIdConfig`` plus ``maxSessions`` (the table bound)."""

    sources: list[SessionIdSource] = []
    eviction_ttl_seconds: float = DEFAULT_EVICTION_TTL_S
    eviction_sweep_seconds: float = DEFAULT_EVICTION_SWEEP_S
    max_sessions: int = DEFAULT_MAX_SESSIONS


class EncodedEndpointHeaderConfig(msgspec.Struct, forbid_unknown_fields=True,
                                  rename="camel", frozen=True):
    """llm-d's ``encodedEndpointHeaderConfig`` (read only to refuse its strategy)."""

    header: str = ""


class SessionAffinityParams(PluginParams):
    """llm-d's parameters, plus the saturation gate of ``prefix-cache-affinity-filter``."""

    strategy: str = STRATEGY_SESSION_ID
    profile_name: str = ""
    encoded_endpoint_header_config: EncodedEndpointHeaderConfig | None = None
    session_id_config: SessionIdConfig = SessionIdConfig()
    max_ttft_penalty_ms: float = msgspec.field(default=DEFAULT_MAX_TTFT_PENALTY_MS,
                                               name="maxTTFTPenaltyMs")
    peak_prefill_throughput: float | None = None


def session_headers(sources: Sequence[SessionIdSource]) -> tuple[str, ...]:
    """The request headers to try, in order, for these sources (llm-d's defaults when
    none are given, plus the agent headers); raises ValueError naming a bad source."""
    if not sources:
        return (SESSION_ID_HEADER, *AGENT_SESSION_HEADERS)
    headers: list[str] = []
    for i, s in enumerate(sources):
        where = f"sessionIdConfig.sources[{i}]"
        if bool(s.header.strip()) == bool(s.attribute.strip()):
            raise ValueError(f"{where}: exactly one of header or attribute must be set")
        if s.header.strip():
            headers.append(s.header.strip().lower())
        elif s.attribute.strip() == AGENT_IDENTITY_ATTRIBUTE and s.producer in (
                "", AGENT_IDENTITY_ATTRIBUTE):
            headers.extend(AGENT_SESSION_HEADERS)
        else:
            raise ValueError(
                f"{where}.attribute: {s.attribute!r}"
                f"{f' of producer {s.producer!r}' if s.producer else ''} is not available "
                f"here; only {AGENT_IDENTITY_ATTRIBUTE!r} (read from the headers "
                f"{', '.join(AGENT_SESSION_HEADERS)}) or a header source")
    return tuple(dict.fromkeys(headers))


def session_key(session_id: str) -> bytes:
    """What the table stores for a session id: its size is fixed whatever clients send."""
    return hashlib.blake2b(session_id.encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


@dataclass(slots=True)
class SessionBinding:
    """The endpoint a session is pinned to, and when the pin was last used."""

    name: str
    address: str
    last_seen: float

    def names(self, e: Endpoint) -> bool:
        return e.name == self.name and e.address == self.address


class SessionTable:
    """Session digest -> binding, least recently used first; at most ``max_entries``,
    and a binding unused for more than ``ttl_s`` is gone (on read, and by the sweep)."""

    def __init__(self, ttl_s: float, sweep_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.sweep_s = sweep_s
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, SessionBinding] = OrderedDict()
        self._last_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> SessionBinding | None:
        """The live binding of ``key``, or None."""
        b = self._entries.get(key)
        if b is None or now - b.last_seen > self.ttl_s:
            return None
        return b

    def bind(self, key: bytes, e: Endpoint, now: float) -> None:
        """Pin ``key`` to ``e`` (or refresh the pin), as most recently used."""
        self._entries[key] = SessionBinding(e.name, e.address, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def sweep(self, now: float) -> None:
        """Drop expired bindings, at most once per ``sweep_s``. Entries are in order of
        last use, so the expired ones are at the front."""
        if now - self._last_sweep < self.sweep_s:
            return
        self._last_sweep = now
        entries = self._entries
        while entries:
            key, b = next(iter(entries.items()))
            if now - b.last_seen <= self.ttl_s:
                break
            del entries[key]

    def forget(self, endpoints: Iterable[Endpoint]) -> None:
        """Drop bindings to endpoints not in ``endpoints`` (the pool now)."""
        present = {(e.name, e.address) for e in endpoints}
        for key in [k for k, b in self._entries.items()
                    if (b.name, b.address) not in present]:
            del self._entries[key]


# What the filter or scorer saw of a bound session, for the pre-request hook.
PRESENT, ABSENT, YIELDED = "present", "absent", "yielded"


class _SessionAffinity:
    """The shared part: resolve the session, choose its endpoint, record the pick."""

    type_name = ""
    Params = SessionAffinityParams

    def __init__(self, name: str, *, headers: Sequence[str] = (),
                 profile_name: str = "", ttl_s: float = DEFAULT_EVICTION_TTL_S,
                 sweep_s: float = DEFAULT_EVICTION_SWEEP_S,
                 max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_ttft_penalty_ms: float = DEFAULT_MAX_TTFT_PENALTY_MS,
                 peak_prefill_throughput: float | None = None) -> None:
        if not ttl_s > 0:
            raise ValueError(f"sessionIdConfig.evictionTtlSeconds must be > 0, got {ttl_s}")
        if not sweep_s > 0:
            raise ValueError("sessionIdConfig.evictionSweepSeconds must be > 0, got "
                             f"{sweep_s}")
        if max_sessions < 1:
            raise ValueError("sessionIdConfig.maxSessions must be at least 1, got "
                             f"{max_sessions}")
        if max_ttft_penalty_ms < 0:
            raise ValueError(f"maxTTFTPenaltyMs must be >= 0, got {max_ttft_penalty_ms}")
        if peak_prefill_throughput is not None and not peak_prefill_throughput > 0:
            raise ValueError("peakPrefillThroughput must be > 0 (leave it out to use each "
                             "endpoint's learned prefill rate)")
        self.name = name
        self.headers = tuple(headers) or session_headers(())
        self.profile_name = profile_name
        self.table = SessionTable(ttl_s, sweep_s, max_sessions)
        self.max_ttft_penalty_ms = max_ttft_penalty_ms
        self.ttft = TTFTEstimator(peak_prefill_throughput)
        self._note_key = f"{self.type_name}/{name}"

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: SessionAffinityParams = params
        if p.strategy == STRATEGY_ENCODED_ENDPOINT_HEADER:
            raise ValueError(
                f"strategy: {STRATEGY_ENCODED_ENDPOINT_HEADER} is not implemented here (it "
                "returns the pod to the client in a response header, which plugins cannot "
                f"write here); use {STRATEGY_SESSION_ID}")
        if p.strategy != STRATEGY_SESSION_ID:
            raise ValueError(f"strategy must be {STRATEGY_ENCODED_ENDPOINT_HEADER!r} or "
                             f"{STRATEGY_SESSION_ID!r}, got {p.strategy!r}")
        c = p.session_id_config
        # As llm-d: an unset (zero) eviction setting takes its default.
        return cls(name, headers=session_headers(c.sources), profile_name=p.profile_name,
                   ttl_s=c.eviction_ttl_seconds or DEFAULT_EVICTION_TTL_S,
                   sweep_s=c.eviction_sweep_seconds or DEFAULT_EVICTION_SWEEP_S,
                   max_sessions=c.max_sessions, max_ttft_penalty_ms=p.max_ttft_penalty_ms,
                   peak_prefill_throughput=p.peak_prefill_throughput)

    def session_id(self, headers: Mapping[str, str]) -> str | None:
        """The request's session id: the first source that is set, or None."""
        for h in self.headers:
            value = headers.get(h)
            if value and value.strip():
                return value.strip()
        return None

    def choose(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> Endpoint | None:
        """The endpoint this request's session is pinned to, if it is a candidate, is
        reachable and is not saturated (see the module docstring); else None."""
        sid = self.session_id(ctx.headers)
        if sid is None or not endpoints:
            return None
        binding = self.table.get(session_key(sid), ctx.now)
        if binding is None:
            return None
        at = next((i for i, e in enumerate(endpoints) if binding.names(e)), None)
        if at is None or endpoints[at].state.unreachable is not None:
            ctx.cycle[self._note_key] = ABSENT
            return None
        if self.max_ttft_penalty_ms > 0 and len(endpoints) > 1:
            ttft = self.ttft.ttft_ms(ctx, endpoints)
            best_other = min(v for i, v in enumerate(ttft) if i != at)
            if ttft[at] - best_other > self.max_ttft_penalty_ms:
                ctx.cycle[self._note_key] = YIELDED
                return None
        ctx.cycle[self._note_key] = PRESENT
        return endpoints[at]

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None:
        """Bind a new session to the endpoint picked for it, refresh a session that went
        to its endpoint, and move one whose endpoint was gone or saturated. A session
        whose endpoint was a candidate but lost to other scorers keeps its pin."""
        sid = self.session_id(ctx.headers)
        if sid is None:
            return
        picked = result.profiles.get(self.profile_name or result.primary)
        if picked is None or not picked.endpoints:
            return
        target = picked.endpoints[0]
        now = ctx.now
        table = self.table
        table.sweep(now)
        key = session_key(sid)
        binding = table.get(key, now)
        if (binding is None or binding.names(target)
                or ctx.cycle.get(self._note_key) in (ABSENT, YIELDED)):
            table.bind(key, target, now)

    def on_pool_change(self, endpoints: Iterable[Endpoint]) -> None:
        """Forget sessions pinned to endpoints that left the pool (a pool listener)."""
        self.table.forget(endpoints)


class SessionAffinityFilter(_SessionAffinity):
    """Keeps only the session's endpoint when it has one (see :meth:`choose`); every
    candidate otherwise. Never returns an empty set."""

    type_name = "session-affinity-filter"

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        target = self.choose(ctx, endpoints)
        return [target] if target is not None else list(endpoints)


class SessionAffinityScorer(_SessionAffinity):
    """1.0 for the session's endpoint (see :meth:`choose`), 0.0 for the others; 0.0
    everywhere when the session has none."""

    type_name = "session-affinity-scorer"

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        target = self.choose(ctx, endpoints)
        return [1.0 if e is target else 0.0 for e in endpoints]
