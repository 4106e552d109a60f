"""The shared-prefix workload again, generated and driven by ``inference-perf`` (the GIE
community's load tool, from the peers' venv) instead of our load generator.

inference-perf runs offline here: its ``shared_prefix`` generator needs only a tokenizer,
and it loads the Qwen tokenizer directory that ``epp.tokenization`` generates (no hub
download; ``HF_HUB_OFFLINE=1`` makes sure). Its prompts are its own (random token ids of
the same lengths) and its requests go to ``/v1/completions``, in prompt order (group by
group), with Poisson arrivals. It knows nothing of the time scale: it is given the wall
rate and duration, and its latencies are multiplied back to fleet time here. The hit
rate comes from the pods' usage, which it records per request.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.compare.fleet import MODEL
from benchmarks.compare.routers import PEERS_VENV
from benchmarks.workloads import SharedPrefix
from epp.tokenization import ensure_qwen_tokenizer

TIMEOUT_S = 600.0


@dataclass
class InferencePerfCell:
    """What inference-perf measured for one router (fleet time)."""

    router: str
    rate: float
    requests: int
    failed: int
    ttft_s: tuple[float, float, float]  # p50, p90, p99
    e2e_s: tuple[float, float]
    output_tokens_per_s: float
    hit_rate: float
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def available() -> str | None:
    """Why inference-perf cannot run here (None: it can)."""
    if not (PEERS_VENV / "bin" / "inference-perf").exists():
        return "inference-perf not installed (make bench installs it into .venv-peers)"
    return None


def config(spec: SharedPrefix, url: str, wall_rate: float, wall_duration: float,
           out: Path, seed: int) -> dict[str, Any]:
    """An inference-perf config for ``spec`` against ``url``."""
    return {
        "api": {"type": "completion", "streaming": True},
        "data": {"type": "shared_prefix", "shared_prefix": {
            "num_groups": spec.groups, "num_prompts_per_group": spec.users_per_group,
            "system_prompt_len": spec.system_tokens, "question_len": spec.question_tokens,
            "output_len": sum(spec.output_tokens) // 2, "seed": seed}},
        "load": {"type": "poisson", "num_workers": 1,
                 "stages": [{"rate": wall_rate, "duration": max(1, round(wall_duration))}]},
        "server": {"type": "vllm", "model_name": MODEL, "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(ensure_qwen_tokenizer())},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False,
                                         "per_request": True}},
        "storage": {"local_storage": {"path": str(out)}},
    }


def run(router: str, url: str, spec: SharedPrefix, rate: float, duration_s: float,
        time_scale: float, work_dir: Path, seed: int) -> InferencePerfCell:
    """Run inference-perf once against ``url`` and read its reports."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / "reports"
    path = work_dir / "inference-perf.yaml"
    path.write_text(yaml.safe_dump(config(spec, url, rate * time_scale,
                                          duration_s / time_scale, out, seed)),
                    encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(PEERS_VENV / "bin" / "inference-perf"), "-c", str(path),
                           "--log-level", "WARNING"], cwd=work_dir, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    (work_dir / "inference-perf.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0 or not (out / "summary_lifecycle_metrics.json").exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return _failed(router, rate, f"exit {done.returncode}: {' | '.join(tail)}")
    return _read(router, rate, out, time_scale)


def _read(router: str, rate: float, out: Path, time_scale: float) -> InferencePerfCell:
    summary = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    ok, failures = summary["successes"], summary["failures"]
    latency = ok.get("latency", {})
    ttft = latency.get("time_to_first_token", {})
    e2e = latency.get("request_latency", {})
    cached = prompt = completion = 0
    starts: list[float] = []
    ends: list[float] = []
    per_request = out / "per_request_lifecycle_metrics.json"
    if per_request.exists():
        for entry in json.loads(per_request.read_text()):
            usage = _server_usage(entry.get("info"))
            if usage:
                prompt += usage.get("prompt_tokens", 0)
                completion += usage.get("completion_tokens", 0)
                cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                starts.append(float(entry["start_time"]))
                ends.append(float(entry["end_time"]))
    # Its own output-token count re-tokenizes the streamed text; the pods' usage is exact.
    span = (max(ends) - min(starts)) * time_scale if starts else 0.0

    def scaled(stats: dict[str, Any], key: str) -> float:
        value = stats.get(key)
        return float(value) * time_scale if value is not None else float("nan")

    return InferencePerfCell(
        router=router, rate=rate, requests=int(ok.get("count", 0)) + int(failures.get("count", 0)),
        failed=int(failures.get("count", 0)),
        ttft_s=(scaled(ttft, "median"), scaled(ttft, "p90"), scaled(ttft, "p99")),
        e2e_s=(scaled(e2e, "median"), scaled(e2e, "p90")),
        output_tokens_per_s=completion / span if span > 0 else 0.0,
        hit_rate=cached / prompt if prompt else 0.0,
    )


def _server_usage(info: object) -> dict[str, Any] | None:
    """The pod's usage from a per-request record's ``info`` (a dict, or its repr)."""
    if isinstance(info, str):
        try:
            info = ast.literal_eval(info)
        except (ValueError, SyntaxError):
            return None
    if not isinstance(info, dict):
        return None
    usage = (info.get("response_metrics") or {}).get("server_usage")
    return usage if isinstance(usage, dict) else None


def _failed(router: str, rate: float, error: str) -> InferencePerfCell:
    nan = float("nan")
    return InferencePerfCell(router, rate, 0, 0, (nan, nan, nan), (nan, nan), 0.0, 0.0, error)
