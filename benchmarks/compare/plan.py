"""What a run measures: the fleet, the workloads and their request rates.

The fleet is 4 pods of ``l4-llama8b`` (Llama-3.1-8B on an L4): its KV cache holds ~33K
tokens per pod, so a workload whose reusable KV exceeds 70% of the fleet's cache has few
enough groups for a short run to reach a steady state (the H100 profile holds 12x more
and needs 12x more distinct prefixes and requests to be stressed the same way). The time
scale compresses the GPUs' time 10x: the pods' prefill, decode and queueing run 10x
faster on the wall clock, the load generator sends 10x more requests per wall second, and
every latency is reported back in fleet time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.workloads import MultiTurn, NoSharing, SharedPrefix, WorkloadSpec

PROFILE = "l4-llama8b"
PODS = 4
TIME_SCALE = 10.0
SEED = 1


@dataclass(frozen=True)
class WorkloadRun:
    """One workload at its request rates (fleet requests per second); ``main`` is the rate
    of the headline table."""

    spec: WorkloadSpec
    rates: tuple[float, ...]
    main: float
    duration_s: float | None = None  # fleet seconds of arrivals (None: the plan's)


@dataclass(frozen=True)
class Plan:
    """A whole run."""

    name: str
    duration_s: float  # fleet seconds of arrivals per cell
    workloads: tuple[WorkloadRun, ...]
    profile: str = PROFILE
    pods: int = PODS
    time_scale: float = TIME_SCALE
    seed: int = SEED
    # Routers that also get the shared-prefix workload (headline rate) from inference-perf.
    inference_perf_routers: tuple[str, ...] = field(default=())
    variants: bool = False  # also run the extra profiles (routers.variant_names)


SHARED = SharedPrefix()
MULTI = MultiTurn()
CONTROL = NoSharing()

# Rates. The shared-prefix run: a request costs a pod 1,200 tokens of prefill on a hit
# and 7,200 on a miss (0.5 vs 2.9 s at 2,500 tokens/s). 2.5 req/s keeps a fleet that
# hits ~30% busy and overloads one that mostly misses (round-robin spreads every group
# over all four pods, whose caches hold ~5 system prompts each: ~27% hits, ~1.8 req/s
# at most). 90 s of arrivals make the 16 groups' first (cold) requests ~7% of the
# total. The control: ~3,000-token prompts at 2 req/s keep the pods ~60% busy.
SHORT = Plan(
    name="short",
    duration_s=60.0,
    workloads=(
        WorkloadRun(SHARED, (1.25, 2.5), 2.5, duration_s=90.0),
        WorkloadRun(MULTI, (3.0,), 3.0),
        WorkloadRun(CONTROL, (2.0,), 2.0, duration_s=90.0),
    ),
    inference_perf_routers=("epp default", "envoy round-robin"),
)
FULL = Plan(
    name="full",
    duration_s=120.0,
    workloads=(
        WorkloadRun(SHARED, (0.75, 1.5, 2.0, 2.5, 3.0, 4.0), 2.5, duration_s=180.0),
        WorkloadRun(MULTI, (2.0, 3.0, 4.0), 3.0),
        WorkloadRun(CONTROL, (1.0, 2.0, 3.0), 2.0),
    ),
    inference_perf_routers=("epp default", "epp approximate", "envoy round-robin",
                            "vllm-router cache_aware", "sglang-router cache_aware"),
    variants=True,
)
PLANS = {p.name: p for p in (SHORT, FULL)}
