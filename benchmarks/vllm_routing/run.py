"""The run: build the tiny model, start the vLLM servers with small KV caches, then every
workload x concurrency x router, each cell from a cold start (prefix caches reset, the
EPP and Envoy started fresh)."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from tokenizers import Tokenizer

from benchmarks.compare.metrics import process_tree_cpu_s
from benchmarks.vllm_routing.client import run_requests
from benchmarks.vllm_routing.measure import (
    VLLM_RUNNING,
    VLLM_WAITING,
    Cell,
    ServerCounters,
    machine_busy_s,
    metric_sum,
    parse_metrics,
    summarize,
)
from benchmarks.vllm_routing.routers import UPSTREAM_HEADER, Router
from benchmarks.vllm_routing.workload import (
    Shape,
    Workload,
    ideal_cached_tokens,
    system_prompts,
    vocabulary_words,
)
from tests.vllm.servers import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MODEL_NAME,
    VLLMServer,
    build_tiny_model,
    start_vllm,
)

# Each server's cache holds two tenants' system prompts plus this many blocks for the
# questions, answers and histories in flight: with 3 servers the fleet holds ~6-7
# prompts, as many as there are tenants, so a router must not keep a prompt twice.
HEADROOM_BLOCKS = 16
# POST /reset_prefix_cache (vLLM's dev-mode API) drops every cached block and publishes
# AllBlocksCleared; it refuses while a request holds blocks, so it is retried.
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
RESET_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 120.0
# vLLM records a finished request's counters just after its last chunk.
SETTLE_S = 0.5


@dataclass
class Fleet:
    """The vLLM servers and what the report says about them."""

    servers: list[VLLMServer]
    model: Path
    num_gpu_blocks: int
    version: str

    def counters(self) -> list[ServerCounters]:
        return [ServerCounters.from_page(parse_metrics(_get(s.url + "/metrics")))
                for s in self.servers]

    def wait_idle(self) -> None:
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            pages = [parse_metrics(_get(s.url + "/metrics")) for s in self.servers]
            if all(metric_sum(p, VLLM_RUNNING) + metric_sum(p, VLLM_WAITING) == 0
                   for p in pages):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("vLLM servers still busy after the cell")
            time.sleep(0.2)

    def reset_prefix_caches(self) -> None:
        for server in self.servers:
            deadline = time.monotonic() + RESET_TIMEOUT_S
            while not msgspec.json.decode(_post(server.url + "/reset_prefix_cache", b""))[
                    "success"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm-{server.index}: prefix cache reset refused")
                time.sleep(0.2)

    def tokenize(self, chats: Sequence[list[dict[str, str]]], *,
                 generation_prompt: bool = True) -> list[list[int]]:
        """Token ids of each chat as the servers render and tokenize it."""
        url = self.servers[0].url + "/tokenize"
        return [msgspec.json.decode(_post(url, msgspec.json.encode({
            "model": MODEL_NAME, "messages": messages,
            "add_generation_prompt": generation_prompt})))["tokens"] for messages in chats]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
    return body.decode()


def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        reply: bytes = resp.read()
    return reply


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prefix_blocks(model: Path, shape: Shape, words: Sequence[str]) -> int:
    """Blocks of the longest tenant system prompt as the chat template renders it."""
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    longest = max(len(tokenizer.encode(f"<|im_start|>system\n{text}<|im_end|>\n").ids)
                  for text in system_prompts(shape, words))
    return math.ceil(longest / BLOCK_SIZE)


def default_num_gpu_blocks(prompt_blocks: int) -> int:
    """Two tenants' prompts + headroom, and at least one max-length request (vLLM
    refuses to start otherwise)."""
    return max(2 * prompt_blocks + HEADROOM_BLOCKS, math.ceil(MAX_MODEL_LEN / BLOCK_SIZE))


def start_fleet(python: str, work: Path, count: int, num_gpu_blocks: int | None,
                shape: Shape) -> tuple[Fleet, list[str]]:
    """Build the model, start ``count`` servers one after the other (in parallel they
    fight over the cores and all start slower); returns the fleet and the word list."""
    model = work / "tiny-llama"
    log(f"building the tiny model ({build_tiny_model(python, model):.1f} s)")
    words = vocabulary_words(model / "tokenizer.json")
    blocks = num_gpu_blocks or default_num_gpu_blocks(prefix_blocks(model, shape, words))
    servers: list[VLLMServer] = []
    try:
        for i in range(count):
            server = start_vllm(python, model, i, work, num_gpu_blocks=blocks,
                                extra_env=DEV_MODE_ENV)
            servers.append(server)
            log(f"vllm-{i} healthy on {server.address} after {server.wait_healthy():.0f} s "
                f"({blocks} blocks of KV cache)")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    version = msgspec.json.decode(_get(servers[0].url + "/version")).get("version", "?")
    return Fleet(servers, model, blocks, str(version)), words


@dataclass
class Results:
    """Everything the report needs."""

    fleet_blocks: int
    version: str
    servers: int
    shape: Shape
    system_tokens: list[int]  # per tenant, as the servers tokenize the system message
    prompt_tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # p50, max
    ceilings: dict[str, float] = field(default_factory=dict)  # unbounded-cache hit rate
    cells: list[Cell] = field(default_factory=list)
    wall_s: float = 0.0


def run_cells(fleet: Fleet, workloads: Sequence[Workload], concurrency: Sequence[int],
              routers: Sequence[Router], shape: Shape, words: Sequence[str],
              work: Path) -> Results:
    """Every workload x concurrency x router; the cells go into the results as they end."""
    started = time.monotonic()
    system_tokens = [len(t) for t in fleet.tokenize(
        [[{"role": "system", "content": text}] for text in system_prompts(shape, words)],
        generation_prompt=False)]
    results = Results(fleet.num_gpu_blocks, fleet.version, len(fleet.servers), shape,
                      system_tokens)
    for workload in workloads:
        prompts = fleet.tokenize([r.openai_messages() for r in workload.requests])
        ideal = ideal_cached_tokens(prompts, BLOCK_SIZE)
        lengths = sorted(len(p) for p in prompts)
        results.prompt_tokens[workload.name] = (lengths[len(lengths) // 2], lengths[-1])
        results.ceilings[workload.name] = sum(ideal) / sum(lengths)
        for c in concurrency:
            for router in routers:
                cell = run_cell(fleet, workload, ideal, c, router, shape,
                                work / f"{workload.name}-c{c}-{_slug(router.name)}")
                results.cells.append(cell)
                log(f"{workload.name} c={c} {router.name}: hit rate {cell.hit_rate:.3f} "
                    f"(vLLM {cell.vllm_hit_rate:.3f}), TTFT p50 {cell.ttft_ms[0]:.0f} ms, "
                    f"{cell.failed} failed, {cell.wall_s:.0f} s")
    results.wall_s = time.monotonic() - started
    return results


def run_cell(fleet: Fleet, workload: Workload, ideal: Sequence[int], concurrency: int,
             router: Router, shape: Shape, work: Path) -> Cell:
    fleet.wait_idle()
    fleet.reset_prefix_caches()
    router.start(fleet.servers, work)
    try:
        before = fleet.counters()
        started = time.monotonic()
        busy, ours = machine_busy_s(), process_tree_cpu_s([os.getpid()])
        by_address = {s.address: s.index for s in fleet.servers}
        samples = asyncio.run(run_requests(
            workload.requests, router.target, model=MODEL_NAME, max_tokens=shape.max_tokens,
            concurrency=concurrency, label=f"{workload.name} c={concurrency} {router.name}",
            upstream_header=UPSTREAM_HEADER, server_of=by_address.get))
        wall = time.monotonic() - started
        fleet.wait_idle()
        time.sleep(SETTLE_S)
        after = fleet.counters()
        index = router.index_check()
        # Everything this run started is a descendant of this process (the EPP and
        # Envoy are still running here); the rest of the machine's busy time is others'.
        window = time.monotonic() - started
        others = max(0.0, (machine_busy_s() - busy)
                     - (process_tree_cpu_s([os.getpid()]) - ours)) / window
    finally:
        router.stop()
    return summarize(samples, ideal, workload=workload.name, concurrency=concurrency,
                     router=router.name, before=before, after=after, index=index,
                     wall_s=wall, others_cores=others)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
