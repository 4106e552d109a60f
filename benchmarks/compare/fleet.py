"""The simulated fleet every router is measured on: N epp-sim pods from one profile, each
publishing KV events (PUB on ``kv_port``, replay on ``kv_port + 1``)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from epp.devtools.procs import Process, free_port, free_port_pair, python_module
from epp.sim.profiles import FleetProfile

MODEL = "qwen3"
# The pods' own settings beyond the profile: real Qwen token ids, a modest default output.
SIM_ARGS = ("--tokenizer", "qwen", "--model", MODEL, "--max-tokens", "16")
IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Pod:
    """One pod's addresses."""

    name: str
    port: int
    kv_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def kv_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_port}"

    @property
    def kv_replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_port + 1}"


@dataclass
class Fleet:
    """Starts, resets and stops the pods."""

    work_dir: Path
    profile: FleetProfile
    size: int
    time_scale: float
    pods: list[Pod] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return int(self.profile.settings.get("block_size", 16))

    @property
    def capacity_tokens(self) -> int:
        """KV cache tokens of one pod."""
        return int(self.profile.settings["kv_capacity_tokens"])

    def start(self) -> Fleet:
        self.pods = [Pod(f"pod-{i}", free_port(), free_port_pair()) for i in range(self.size)]
        for pod in self.pods:
            self.processes.append(Process(pod.name, python_module(
                "epp.sim", "--host", "127.0.0.1", "--port", str(pod.port),
                "--kv-events-port", str(pod.kv_port),
                "--kv-events-replay-port", str(pod.kv_port + 1),
                "--profile", self.profile.source, "--time-scale", f"{self.time_scale:g}",
                *SIM_ARGS), self.work_dir))
        try:
            for proc in self.processes:
                proc.wait_for_log("listening", timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def reset(self) -> None:
        """Wait until no pod runs anything, then drop every pod's prefix cache (each pod
        publishes AllBlocksCleared, so event-fed routers forget it too)."""
        self.wait_idle()
        for pod in self.pods:
            req = urllib.request.Request(pod.url + "/reset_prefix_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()

    def wait_idle(self, timeout: float = IDLE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_load(p) == 0 for p in self.pods):
                return
            time.sleep(0.2)
        raise TimeoutError(f"pods still busy after {timeout:g} s")

    def alive(self) -> bool:
        return all(p.alive() for p in self.processes)

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()
        self.processes = []


def _load(pod: Pod) -> float:
    """Running + waiting requests of a pod, from its /metrics page."""
    with urllib.request.urlopen(pod.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Oracle:
    """Routes to the pod holding the longest cached prefix of the prompt, ties by load,
    from every pod's true cache (``POST /debug/prefix_lookup``) at the moment of routing.
    An upper bound on hit rate; its lookup time is not counted in its latencies."""

    def __init__(self, pods: list[Pod], block_size: int) -> None:
        self.pods = pods
        self.block_size = block_size

    async def pick(self, session: aiohttp.ClientSession, token_ids: tuple[int, ...]) -> Pod:
        body = msgspec.json.encode({"model": MODEL, "token_ids": token_ids})
        answers = await asyncio.gather(*(self._lookup(session, pod, body) for pod in self.pods))

        def rank(item: tuple[Pod, dict[str, Any]]) -> tuple[int, float]:
            answer = item[1]
            return (-answer["cached_tokens"] // self.block_size,
                    answer["running"] + answer["waiting"])

        return min(zip(self.pods, answers, strict=True), key=rank)[0]

    @staticmethod
    async def _lookup(session: aiohttp.ClientSession, pod: Pod, body: bytes) -> dict[str, Any]:
        async with session.post(pod.url + "/debug/prefix_lookup", data=body,
                                headers={"content-type": "application/json"}) as resp:
            answer: dict[str, Any] = msgspec.json.decode(await resp.read())
            return answer
