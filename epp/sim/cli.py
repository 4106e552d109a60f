"""Command line entry point ``epp-sim``: serve one simulated vLLM pod until signalled."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from epp.sim.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KV_CAPACITY_TOKENS,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_NUM_SEQS,
    SimConfig,
)
from epp.sim.server import run


def build_parser() -> argparse.ArgumentParser:
    """The ``epp-sim`` argument parser."""
    parser = argparse.ArgumentParser(prog="epp-sim", description="Simulate one vLLM pod.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="bind port, 0 = any (default 8000)")
    parser.add_argument(
        "--advertise", default=None, help="ip:port reported in x-sim-endpoint (default host:port)"
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        default=None,
        help="served model name; repeat for several (default qwen3)",
    )
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token (ms)")
    parser.add_argument("--itl-ms", type=float, default=0.0, help="inter-token latency (ms)")
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="output tokens when a request sets none"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
        help=f"batch slots; later requests wait in a queue (default {DEFAULT_MAX_NUM_SEQS})",
    )
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=DEFAULT_KV_CAPACITY_TOKENS,
        help=f"KV cache size in tokens (default {DEFAULT_KV_CAPACITY_TOKENS})",
    )
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
        help=f"KV cache block size in tokens (default {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--lora", action="append", dest="loras", metavar="NAME", default=None,
        help="serve a LoRA adapter under this model name; repeat for several",
    )
    parser.add_argument(
        "--max-loras", type=int, default=DEFAULT_MAX_LORAS,
        help=f"distinct adapters in one batch (default {DEFAULT_MAX_LORAS})",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn parsed arguments into a validated ``SimConfig`` (raises ``ValueError``)."""
    return SimConfig(
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        served_model_names=args.models or ("qwen3",),
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        default_max_tokens=args.max_tokens,
        max_num_seqs=args.max_num_seqs,
        kv_capacity_tokens=args.kv_capacity_tokens,
        block_size=args.block_size,
        lora_names=args.loras or (),
        max_loras=args.max_loras,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``epp-sim``; returns 0 after a clean SIGTERM/SIGINT shutdown."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and usage text
    asyncio.run(_serve(config))
    return 0


async def _serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(config, stop=stop, on_listening=_announce)


def _announce(host: str, port: int) -> None:
    # Tests and launch scripts wait for this exact line before sending traffic.
    print(f"epp-sim listening on {host}:{port}", file=sys.stdout, flush=True)
