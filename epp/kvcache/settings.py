"""Settings of the precise prefix cache: plain values, importable by the scheduler's
plugins and the config loader without the services behind them (ZMQ sockets, HTTP
clients, tokenizers)."""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore import DEFAULT_KV_EVENTS_PORT

# vLLM's default block size (tokens per KV block).
DEFAULT_BLOCK_SIZE = 16
# Longest prefix considered: 256 blocks of 16 = 4k tokens by GIE's default; ours is
# larger because exact lookups are cheap (O(blocks)): 8,192 blocks = 128k tokens.
DEFAULT_MAX_PREFIX_BLOCKS = 8192


@dataclass(frozen=True, slots=True)
class KVCacheSettings:
    """How the precise prefix cache is fed and keyed."""

    model: str = ""
    block_size: int | None = None  # None: from the engines' vllm:cache_config_info, else 16
    max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS
    capacity_blocks: int | None = None  # None: from the fleet's num_gpu_blocks
    tokenizer_mode: str = "local"  # local | render
    tokenizer: str = "qwen3.6"  # a built-in name or a directory with tokenizer.json
    kv_events_port: int = DEFAULT_KV_EVENTS_PORT
    replay_port_offset: int | None = 1  # None: no replay socket
    kv_events_bind: str | None = None  # central mode: the EPP binds, engines connect
    topic_filter: bool = True
    # Routing decisions enter the index as pending blocks until the engine confirms them.
    pending_picks: bool = True
