"""Python CPU per request on the EPP's request path, without sockets: the six ext_proc
phases of one exchange (parsed from bytes, answered, answers serialized) through the
protocol state machine, the director and the built-in default profile over 4 endpoints.
What the transport (h2 or grpc.aio) and the kernel cost comes on top
(`benchmarks/overhead.py` measures the whole path).

    .venv/bin/python benchmarks/request_path.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.devtools import fake_envoy as fe
from epp.extproc.stream import ProtocolStream
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director

BODY = json.dumps({"model": "qwen3", "prompt": "x" * 1000, "max_tokens": 1}).encode()
RESPONSE = json.dumps({"id": "x", "choices": [{"text": "a"}],
                       "usage": {"prompt_tokens": 250, "completion_tokens": 1}}).encode()


def build_director() -> Director:
    """A Director with the built-in profile over 4 endpoints with fresh metrics."""
    metrics = EppMetrics()
    cfg = load_picker_config(timer=metrics.observe_plugin)
    pool = EndpointPool()
    endpoints = [Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(4)]
    for e in endpoints:
        e.state.update_metrics(ServerMetrics(scraped_at=time.monotonic() + 3600))
    pool.replace_all(endpoints)
    return Director(pool, cfg.scheduler, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                    metrics, producers=cfg.producers, pre_request=cfg.pre_request,
                    response_complete=cfg.response_complete)


async def per_request_us(requests: int) -> float:
    director = build_director()
    wire = [m.SerializeToString() for m in (
        fe.request_headers(), fe.request_body(BODY, False), fe.request_body(b"", True),
        fe.response_headers(), fe.response_body(RESPONSE, False), fe.response_body(b"", True))]
    t0 = time.perf_counter()
    for _ in range(requests):
        stream = ProtocolStream(director)
        for raw in wire:
            for answer in await stream.handle(pb.ProcessingRequest.FromString(raw)):
                if not isinstance(answer, bytes):  # echoes come serialized already
                    answer.SerializeToString()
        stream.close()
    return (time.perf_counter() - t0) / requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=5000)
    args = p.parse_args()
    asyncio.run(per_request_us(500))  # warm-up
    print(f"| Python CPU per request (µs) | {asyncio.run(per_request_us(args.requests)):.0f} |")


if __name__ == "__main__":
    main()
