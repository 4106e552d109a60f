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
    DEFAULT_KV_TRANSFER_US_PER_TOKEN,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_PREFILL_TOKENS_PER_S,
    DEFAULT_REMOTE_PREFILL_TIMEOUT_S,
    DEFAULT_ROLE,
    DEFAULT_TIME_SCALE,
    DEFAULT_TOKENIZER,
    ROLES,
    SimConfig,
)
from epp.sim.kv_events import ENCODINGS, HASH_FORMS, KVEventsConfig
from epp.sim.profiles import FleetProfile, available_profiles, load_profile
from epp.sim.server import run

# Built-in values of the settings a --profile may set; explicit flags beat the profile,
# the profile beats these.
BUILTIN_DEFAULTS: dict[str, float | int] = {
    "ttft_ms": 0.0,
    "itl_ms": 0.0,
    "itl_ms_per_seq": 0.0,
    "itl_us_per_kv_token": 0.0,
    "max_num_seqs": DEFAULT_MAX_NUM_SEQS,
    "kv_capacity_tokens": DEFAULT_KV_CAPACITY_TOKENS,
    "block_size": DEFAULT_BLOCK_SIZE,
    "prefill_tokens_per_s": DEFAULT_PREFILL_TOKENS_PER_S,
    "max_num_batched_tokens": DEFAULT_MAX_NUM_BATCHED_TOKENS,
    "kv_transfer_us_per_token": DEFAULT_KV_TRANSFER_US_PER_TOKEN,
    "cpu_offload_blocks": 0,
}


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
    parser.add_argument(
        "--profile", default=None, metavar="NAME|PATH",
        help="fleet profile: every timing and capacity setting of one GPU type "
             f"({', '.join(available_profiles())}, or a YAML file); flags override it",
    )
    parser.add_argument(
        "--time-scale", type=float, default=DEFAULT_TIME_SCALE, metavar="S",
        help="run the fleet S times faster than real time: every duration / S, every rate "
             f"x S (default {DEFAULT_TIME_SCALE:g})",
    )
    parser.add_argument("--ttft-ms", type=float, default=None,
                        help="fixed engine time before the first token (ms, default 0)")
    parser.add_argument("--itl-ms", type=float, default=None,
                        help="decode step time, fixed part (ms, default 0)")
    parser.add_argument(
        "--itl-ms-per-seq", type=float, default=None,
        help="decode step time added per running sequence (ms, default 0)",
    )
    parser.add_argument(
        "--itl-us-per-kv-token", type=float, default=None,
        help="decode step time added per token of KV the batch holds (us, default 0)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="output tokens when a request sets none"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN,
        help="context window in tokens (prompt + output); longer requests get a 400 as from "
             f"vLLM (default {DEFAULT_MAX_MODEL_LEN})",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=None,
        help=f"batch slots; later requests wait in a queue (default {DEFAULT_MAX_NUM_SEQS})",
    )
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=None,
        help=f"KV cache size in tokens (default {DEFAULT_KV_CAPACITY_TOKENS})",
    )
    parser.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, metavar="N",
        help="KV cache size in blocks (vLLM's flag); instead of --kv-capacity-tokens",
    )
    parser.add_argument(
        "--block-size", type=int, default=None,
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
    _add_cache_flags(parser)
    _add_disaggregation_flags(parser)
    return parser


def _add_disaggregation_flags(parser: argparse.ArgumentParser) -> None:
    """Prefill/decode disaggregation: the pod's role and the llm-d sidecar's behaviour."""
    parser.add_argument(
        "--role", choices=ROLES, default=DEFAULT_ROLE,
        help="P/D role; decode and both pods prefill on the pod named in "
             f"x-prefiller-host-port first (default {DEFAULT_ROLE})",
    )
    parser.add_argument(
        "--kv-transfer-us-per-token", type=float, default=None,
        help="time to receive one prompt token's KV from a prefill pod, in microseconds "
             f"(default {DEFAULT_KV_TRANSFER_US_PER_TOKEN:g}: 128 KiB/token over ~25 GB/s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="prefill chunk per engine step; each chunk delays running decodes "
             f"(default {DEFAULT_MAX_NUM_BATCHED_TOKENS})",
    )
    parser.add_argument(
        "--remote-prefill-timeout-s", type=float, default=DEFAULT_REMOTE_PREFILL_TIMEOUT_S,
        help="give up on the prefill pod and prefill locally after this long "
             f"(default {DEFAULT_REMOTE_PREFILL_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--remote-prefill-error-status", type=int, default=0, metavar="STATUS",
        help="testing aid: answer every prefill request from a decode pod with this HTTP "
             "status (default 0: off)",
    )


def _add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """Tokenizer, prefix cache and KV events flags (vLLM's names where vLLM has one)."""
    parser.add_argument(
        "--tokenizer", choices=("qwen", "bytes"), default=None,
        help=f"prompt tokenizer: the Qwen3.5/3.6 vocabulary or one token per UTF-8 byte "
             f"(default {DEFAULT_TOKENIZER}, or the --tokenizer-dir one)",
    )
    parser.add_argument(
        "--tokenizer-dir", default=None, metavar="PATH",
        help="load any HF tokenizer directory (tokenizer.json + chat template) instead",
    )
    parser.add_argument(
        "--prefill-tokens-per-s", type=float, default=None,
        help="prefill speed for uncached prompt tokens; 0 = instant "
             f"(default {DEFAULT_PREFILL_TOKENS_PER_S:g})",
    )
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="keep a prefix cache of full prompt blocks (default on)",
    )
    parser.add_argument(
        "--cpu-offload-blocks", type=int, default=None, metavar="N",
        help="blocks on a CPU tier that receives GPU evictions (default 0: none)",
    )
    parser.add_argument(
        "--kv-events-port", type=int, default=0,
        help="publish KV events on a ZMQ PUB socket on this port (default 0: off)",
    )
    parser.add_argument(
        "--kv-events-replay-port", type=int, default=0,
        help="serve KV event replay on a ZMQ ROUTER socket on this port (default 0: off)",
    )
    parser.add_argument(
        "--kv-events-encoding", choices=ENCODINGS, default="array",
        help="events as positional arrays (vLLM < 0.26) or tagged maps (default array)",
    )
    parser.add_argument(
        "--kv-events-hash", choices=HASH_FORMS, default="uint64",
        help="block hashes as uint64 ints or 32-byte digests (default uint64)",
    )
    parser.add_argument(
        "--kv-events-drop-seq", type=int, default=None, metavar="N",
        help="testing aid: do not publish batch N live (replay still has it)",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn parsed arguments into a validated ``SimConfig`` (raises ``ValueError``)."""
    if args.tokenizer is not None and args.tokenizer_dir is not None:
        raise ValueError("give --tokenizer or --tokenizer-dir, not both")
    tokenizer = "hf" if args.tokenizer_dir is not None else args.tokenizer or DEFAULT_TOKENIZER
    settings = resolve_settings(args, load_profile(args.profile) if args.profile else None)
    return SimConfig(
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        served_model_names=args.models or ("qwen3",),
        default_max_tokens=args.max_tokens,
        max_model_len=args.max_model_len,
        lora_names=args.loras or (),
        max_loras=args.max_loras,
        tokenizer=tokenizer,
        tokenizer_dir=args.tokenizer_dir,
        enable_prefix_caching=args.enable_prefix_caching,
        time_scale=args.time_scale,
        **settings,  # type: ignore[arg-type]
        kv_events=KVEventsConfig(
            port=args.kv_events_port,
            replay_port=args.kv_events_replay_port,
            encoding=args.kv_events_encoding,
            hash_form=args.kv_events_hash,
            drop_seq=args.kv_events_drop_seq,
        ),
        role=args.role,
        remote_prefill_timeout_s=args.remote_prefill_timeout_s,
        remote_prefill_error_status=args.remote_prefill_error_status,
    )


def resolve_settings(args: argparse.Namespace,
                     profile: FleetProfile | None) -> dict[str, float | int]:
    """The fleet settings: each from its flag if given, else the profile, else built in."""
    settings: dict[str, float | int] = {}
    for name, default in BUILTIN_DEFAULTS.items():
        value = getattr(args, name)
        if value is None and profile is not None:
            value = profile.settings.get(name)
        settings[name] = default if value is None else value
    if args.num_gpu_blocks_override is not None:
        if args.kv_capacity_tokens is not None:
            raise ValueError("give --kv-capacity-tokens or --num-gpu-blocks-override, not both")
        settings["kv_capacity_tokens"] = args.num_gpu_blocks_override * int(settings["block_size"])
    return settings


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
