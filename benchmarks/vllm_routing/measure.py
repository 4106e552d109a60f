"""What a cell measured: the client's samples, the servers' and the EPP's counters, and
the arithmetic that turns them into the report's figures (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.compare.metrics import CLOCK_TICKS, percentile

# The names vLLM 0.32 exposes (counters carry prometheus-client's ``_total``).
VLLM_PREFIX_HITS = "vllm:prefix_cache_hits_total"  # tokens found cached
VLLM_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # tokens looked up
VLLM_FINISHED = "vllm:request_success_total"  # by finished_reason
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
# The EPP's index check: one histogram sample per response it compared with the index's
# prediction, and a counter of those off by a block or more (direction over/under).
EPP_CHECKED = "epp_kv_index_prediction_error_tokens_count"
EPP_MISPREDICTIONS = "epp_kv_index_mispredictions_total"
# Requests routed without the precise prefix match (by reason: deadline, error,
# unavailable): the prefix step (render call, hashing, lookup) ran out of its budget.
EPP_DEGRADED = "epp_prefix_match_degraded_total"

Series = list[tuple[dict[str, str], float]]


def parse_metrics(text: str) -> dict[str, Series]:
    """A Prometheus text page as sample name -> [(labels, value)]."""
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric_sum(page: Mapping[str, Series], name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(value for have, value in page.get(name, [])
               if all(have.get(k) == v for k, v in labels.items()))


@dataclass(frozen=True)
class ServerCounters:
    """One vLLM server's cumulative counters at one moment."""

    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    finished: float = 0.0

    @classmethod
    def from_page(cls, page: Mapping[str, Series]) -> ServerCounters:
        return cls(metric_sum(page, VLLM_PREFIX_HITS), metric_sum(page, VLLM_PREFIX_QUERIES),
                   metric_sum(page, VLLM_FINISHED))

    def __sub__(self, before: ServerCounters) -> ServerCounters:
        return ServerCounters(self.prefix_hits - before.prefix_hits,
                              self.prefix_queries - before.prefix_queries,
                              self.finished - before.finished)


@dataclass(frozen=True)
class IndexCheck:
    """The EPP's verdict on its own index over a cell (summed over replicas)."""

    checked: float = 0.0  # responses compared with the prediction
    over: float = 0.0  # the index predicted a block or more that was not cached
    under: float = 0.0  # the engine had a block or more the index did not know of
    degraded: float = 0.0  # requests routed without the precise prefix match

    @classmethod
    def from_pages(cls, pages: Iterable[Mapping[str, Series]]) -> IndexCheck:
        pages = list(pages)
        return cls(sum(metric_sum(p, EPP_CHECKED) for p in pages),
                   sum(metric_sum(p, EPP_MISPREDICTIONS, direction="over") for p in pages),
                   sum(metric_sum(p, EPP_MISPREDICTIONS, direction="under") for p in pages),
                   sum(metric_sum(p, EPP_DEGRADED) for p in pages))

    @property
    def mispredicted(self) -> float:
        return self.over + self.under


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat's first line:
    everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def ratio(part: float, whole: float) -> float:
    """``part / whole``, NaN when there is no whole (never a misleading 0)."""
    return part / whole if whole > 0 else math.nan


@dataclass
class Sample:
    """What the client saw of one request."""

    index: int
    tenant: int
    server: int | None = None  # the server that answered (None: not known)
    status: int = 0
    error: str | None = None
    ttft_s: float | None = None  # send -> first content byte of the stream
    e2e_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None and self.prompt_tokens > 0


@dataclass
class Cell:
    """One router on one workload at one concurrency."""

    workload: str
    concurrency: int
    router: str
    requests: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int  # what an unbounded cache would have held (the ceiling)
    ttft_ms: tuple[float, float]  # p50, p90
    servers_per_tenant: float  # mean over tenants of the servers their requests went to
    tenants_per_server: list[int]  # tenants whose requests went mostly to each server
    finished_per_server: list[float]
    vllm: ServerCounters
    index: IndexCheck | None  # None: no EPP in the path
    wall_s: float
    others_cores: float = math.nan  # CPU used by processes outside this run, in cores
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Σ cached / Σ prompt tokens from the responses' usage."""
        return ratio(self.cached_tokens, self.prompt_tokens)

    @property
    def vllm_hit_rate(self) -> float:
        """Σ hits / Σ queries from the servers' own prefix-cache counters."""
        return ratio(self.vllm.prefix_hits, self.vllm.prefix_queries)

    @property
    def ceiling(self) -> float:
        return ratio(self.ideal_cached_tokens, self.prompt_tokens)

    @property
    def of_ceiling(self) -> float:
        """The hit rate as a share of the unbounded-cache ceiling."""
        return ratio(self.hit_rate, self.ceiling)

    @property
    def shares(self) -> list[float]:
        total = sum(self.finished_per_server)
        return [ratio(f, total) for f in self.finished_per_server]

    @property
    def mispredicted_share(self) -> float:
        """Mispredictions as a share of the responses the EPP checked."""
        return math.nan if self.index is None else ratio(self.index.mispredicted,
                                                         self.index.checked)


def servers_per_tenant(samples: Iterable[Sample]) -> float:
    """How many servers each tenant's answered requests went to, on average (1.0: every
    tenant stayed on one server; NaN: the servers are not known)."""
    seen: dict[int, set[int]] = {}
    for s in samples:
        if s.ok and s.server is not None:
            seen.setdefault(s.tenant, set()).add(s.server)
    return sum(len(v) for v in seen.values()) / len(seen) if seen else math.nan


def tenants_per_server(samples: Iterable[Sample], servers: int) -> list[int]:
    """How many tenants each server was home to (the server that answered most of a
    tenant's requests; ties to the lower index)."""
    counts: dict[int, dict[int, int]] = {}
    for s in samples:
        if s.ok and s.server is not None:
            per = counts.setdefault(s.tenant, {})
            per[s.server] = per.get(s.server, 0) + 1
    homes = [0] * servers
    for per in counts.values():
        homes[min(per, key=lambda server: (-per[server], server))] += 1
    return homes


def summarize(samples: Sequence[Sample], ideal: Sequence[int], *, workload: str,
              concurrency: int, router: str, before: Sequence[ServerCounters],
              after: Sequence[ServerCounters], index: IndexCheck | None,
              wall_s: float, others_cores: float = math.nan) -> Cell:
    """The cell's figures; ``ideal`` is per request index (``ideal_cached_tokens``)."""
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s * 1e3 for s in ok if s.ttft_s is not None]
    delta = [a - b for a, b in zip(after, before, strict=True)]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error or "no usage"] = errors.get(s.error or "no usage", 0) + 1
    return Cell(
        workload=workload, concurrency=concurrency, router=router, requests=len(samples),
        failed=len(samples) - len(ok),
        prompt_tokens=sum(s.prompt_tokens for s in ok),
        cached_tokens=sum(s.cached_tokens for s in ok),
        ideal_cached_tokens=sum(ideal[s.index] for s in ok),
        ttft_ms=(percentile(ttft, 50), percentile(ttft, 90)),
        servers_per_tenant=servers_per_tenant(samples),
        tenants_per_server=tenants_per_server(samples, len(before)),
        finished_per_server=[d.finished for d in delta],
        vllm=ServerCounters(sum(d.prefix_hits for d in delta),
                            sum(d.prefix_queries for d in delta),
                            sum(d.finished for d in delta)),
        index=index, wall_s=wall_s, others_cores=others_cores, errors=errors)
