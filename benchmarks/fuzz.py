"""Long fuzz run of the request path: the properties of ``tests/unit/test_fuzz.py`` at
10,000+ examples each (client-made ext_proc sequences in protocol order with any body;
messages in any order), and the frame-level property of ``tests/unit/test_h2_faults.py``
(random interleavings of stream faults on one HTTP/2 connection beside a bystander).
Prints the outcome counts; any invariant violation stops the run with the failing
example (hypothesis shrinks it).

    .venv/bin/python benchmarks/fuzz.py [--examples 10000] [--frames 500] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import Harness, any_order_sequences, envoy_sequences  # noqa: E402


def run_property(name: str, strategy: object, examples: int, client_order: bool,
                 rng_seed: int) -> tuple[Harness, float, int]:
    harness = Harness()
    loop = asyncio.new_event_loop()
    count = 0

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(sequence: list) -> None:  # type: ignore[type-arg]
        nonlocal count
        count += 1
        loop.run_until_complete(asyncio.wait_for(
            harness.run(sequence, client_order=client_order), 10))

    t0 = time.perf_counter()
    try:
        check()
    finally:
        loop.close()
    return harness, time.perf_counter() - t0, count


def run_frames(examples: int, rng_seed: int) -> tuple[float, int]:
    import pytest  # the frame property lives in the test module; run it at scale

    from tests.unit import test_h2_faults as t
    inner = t.test_any_interleaving_of_stream_faults_spares_the_bystander
    target = inner.hypothesis.inner_test  # type: ignore[attr-defined]
    count = 0

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=t.OPS)
    def check(ops: object) -> None:
        nonlocal count
        count += 1
        asyncio.run(target(ops=ops))

    del pytest
    t0 = time.perf_counter()
    check()
    return time.perf_counter() - t0, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for name, strategy, client in (("client sequences, protocol order", envoy_sequences(), True),
                                   ("any order (broken proxy)", any_order_sequences(), False)):
        harness, secs, count = run_property(name, strategy, args.examples, client, args.seed)
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(harness.outcomes.items()))
        rows.append((name, count, secs, outcomes))
    secs, count = run_frames(args.frames, args.seed)
    rows.append(("h2 frame interleavings (+ bystander)", count, secs,
                 "bystander completed every time"))
    print("| property | sequences | seconds | violations | outcomes |")
    print("|---|--:|--:|--:|---|")
    for name, count, secs, outcomes in rows:
        print(f"| {name} | {count:,} | {secs:.0f} | 0 | {outcomes} |")


if __name__ == "__main__":
    main()
