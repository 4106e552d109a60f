"""Configuration of one simulated vLLM pod."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.sim.kv_events import KVEventsConfig

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# vLLM's default batch is 256 sequences on GPUs; the sim scales it down so queues form at
# the tens of concurrent requests that tests and a laptop-sized load can produce.
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_BLOCK_SIZE = 16  # vLLM's default KV block size (tokens per block) on GPUs
# A GPU holds roughly 1-2K KV tokens per batch slot (Llama-3-8B on an 80 GB H100: 128 KiB
# per token, ~400K tokens for 256 slots). 1,024 tokens x 8 slots = 8,192 tokens, i.e. 512
# blocks of 16: a full batch of 1K-token requests fills the cache, so KV usage spans its
# whole range at the sim's scale.
KV_TOKENS_PER_SEQ = 1024
DEFAULT_KV_CAPACITY_TOKENS = DEFAULT_MAX_NUM_SEQS * KV_TOKENS_PER_SEQ
# vLLM defaults --max-loras to 1; 4 lets one sim pod hold several adapters in a batch, the
# situation LoRA-affinity routing is about.
DEFAULT_MAX_LORAS = 4
# The CLI's tokenizer: real Qwen3.5/3.6 token ids (``SimConfig()`` itself has none and
# estimates prompt lengths, which keeps library use free of tokenizer files).
DEFAULT_TOKENIZER = "qwen"
TOKENIZERS = ("qwen", "bytes", "hf")  # "hf" loads ``tokenizer_dir``
# The CLI's prefill rate. An 8B model needs ~2 x 8e9 = 16 GFLOP per prompt token; an H100
# gives ~990 TFLOP/s dense BF16 and prefill reaches ~35% of it, ~350 TFLOP/s, i.e. ~22K
# tokens/s; rounded down to 20K. ``SimConfig()`` itself prefills instantly (0).
DEFAULT_PREFILL_TOKENS_PER_S = 20_000.0
# Prefill/decode disaggregation. A pod's role: "prefill" and "decode" pods as llm-d labels
# them (``llm-d.ai/role``), "both" for an aggregated pod. Decode and both pods act like
# llm-d's routing sidecar when a request names a prefill pod in x-prefiller-host-port.
ROLES = ("prefill", "decode", "both")
DEFAULT_ROLE = "both"
# The CLI's KV transfer time. Llama-3-8B keeps 32 layers x 8 KV heads x 128 dims x 2 (K and
# V) x 2 bytes = 128 KiB of KV per token; a ~25 GB/s RDMA link (a 200 Gb/s NIC) moves that
# in ~5.2 us. ``SimConfig()`` itself transfers instantly (0).
DEFAULT_KV_TRANSFER_US_PER_TOKEN = 5.0
# Prefill tokens one engine step computes: vLLM's max_num_batched_tokens for the OpenAI
# server with chunked prefill (2048; vLLM raises it to 8192 on H100-class GPUs). Decode
# steps of running requests interleave with these chunks (see ``epp.sim.timeline``).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# --time-scale: the sim runs its fleet this many times faster than real time (every
# duration divided by it, every rate multiplied), so a long run fits a small machine.
# 1 = real time.
DEFAULT_TIME_SCALE = 1.0
# Context window (prompt + output tokens). vLLM takes max_model_len from the model's config:
# 131,072 for Llama-3.1-8B, the model the GPU profiles describe; it rejects longer requests.
DEFAULT_MAX_MODEL_LEN = 131_072
# How long a decode pod waits for its prefill pod before it prefills locally. Generous: a
# 128K-token prompt takes ~6 s to prefill at the default rate, plus queueing.
DEFAULT_REMOTE_PREFILL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Immutable settings of one simulated vLLM pod.

    ``advertise`` is the ``ip:port`` reported in the ``x-sim-endpoint`` response
    header; it defaults to ``f"{host}:{port}"``. ``served_model_names`` accepts any
    sequence of names and is stored as a tuple so the config stays hashable.
    ``lora_names`` are LoRA adapters served on top of the base model (requests name them
    in ``model``), at most ``max_loras`` of them in one batch.

    ``tokenizer`` (one of ``TOKENIZERS``, None: prompt lengths estimated, text prompts not
    cached) turns prompts into token ids; the prefix cache of ``num_gpu_blocks`` blocks
    (plus ``cpu_offload_blocks`` on a CPU tier) keys them, and prefill of the uncached
    tokens takes ``1 / prefill_tokens_per_s`` each (0: no time). ``kv_events`` publishes
    the cache's changes over ZMQ as vLLM does. Prefill runs in chunks of
    ``max_num_batched_tokens`` that delay concurrent decode steps (``epp.sim.timeline``).

    A decode step takes ``itl_ms`` plus ``itl_ms_per_seq`` per running sequence plus
    ``itl_us_per_kv_token`` per token of KV they hold (decode is memory-bound: a step reads
    the weights once and every sequence's KV). ``time_scale`` runs every duration that
    many times faster on the wall clock; the settings stay in fleet (real GPU) time.
    ``epp.sim.profiles`` holds these settings per GPU type.

    ``max_model_len`` is the context window: like vLLM, a request whose prompt plus
    ``max_tokens`` exceeds it is refused with a 400.

    ``role`` (one of ``ROLES``) is the pod's place in a disaggregated pool. A decode or
    both pod given ``x-prefiller-host-port`` has that pod prefill first (waiting at most
    ``remote_prefill_timeout_s``, else prefilling locally) and receives the KV cache at
    ``kv_transfer_us_per_token``. ``remote_prefill_error_status`` (testing aid, 0: off)
    makes this pod answer every prefill-for-remote-decode request with that status.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    advertise: str | None = None
    served_model_names: Sequence[str] = field(default_factory=lambda: ("qwen3",))
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    itl_ms_per_seq: float = 0.0
    itl_us_per_kv_token: float = 0.0
    time_scale: float = DEFAULT_TIME_SCALE
    default_max_tokens: int = 16
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    lora_names: Sequence[str] = ()
    max_loras: int = DEFAULT_MAX_LORAS
    tokenizer: str | None = None
    tokenizer_dir: str | None = None
    prefill_tokens_per_s: float = 0.0
    enable_prefix_caching: bool = True
    cpu_offload_blocks: int = 0
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    role: str = DEFAULT_ROLE
    kv_transfer_us_per_token: float = 0.0
    remote_prefill_timeout_s: float = DEFAULT_REMOTE_PREFILL_TIMEOUT_S
    remote_prefill_error_status: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.advertise is None:
            # object.__setattr__ because the dataclass is frozen.
            object.__setattr__(self, "advertise", f"{self.host}:{self.port}")
        else:
            _check_address(self.advertise)
        served = _check_models(self.served_model_names, "served_model_names")
        object.__setattr__(self, "served_model_names", served)
        for name in ("ttft_ms", "itl_ms", "itl_ms_per_seq", "itl_us_per_kv_token"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        scale = self.time_scale
        if not _is_number(scale) or not math.isfinite(scale) or not 0.01 <= scale <= 1000:
            raise ValueError(f"time_scale must be a number in [0.01, 1000], got {scale!r}")
        if not _is_int(self.default_max_tokens) or self.default_max_tokens < 1:
            raise ValueError(
                f"default_max_tokens must be an integer >= 1, got {self.default_max_tokens!r}"
            )
        for name in ("max_body_bytes", "max_num_seqs", "block_size", "max_loras",
                     "max_model_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.kv_capacity_tokens) or self.kv_capacity_tokens < self.block_size:
            raise ValueError(
                f"kv_capacity_tokens must be an integer >= block_size ({self.block_size}), "
                f"got {self.kv_capacity_tokens!r}"
            )
        loras = () if not self.lora_names else _check_models(self.lora_names, "lora_names")
        clash = set(loras) & set(self.served_model_names)
        if clash:
            raise ValueError(f"lora_names repeat served model names: {sorted(clash)!r}")
        object.__setattr__(self, "lora_names", loras)
        self._check_cache_settings()
        self._check_disaggregation_settings()

    def _check_disaggregation_settings(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not _is_int(self.max_num_batched_tokens) or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1, "
                             f"got {self.max_num_batched_tokens!r}")
        transfer = self.kv_transfer_us_per_token
        if not _is_number(transfer) or not math.isfinite(transfer) or transfer < 0:
            raise ValueError(
                f"kv_transfer_us_per_token must be a finite number >= 0, got {transfer!r}")
        timeout = self.remote_prefill_timeout_s
        if not _is_number(timeout) or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(
                f"remote_prefill_timeout_s must be a finite number > 0, got {timeout!r}")
        status = self.remote_prefill_error_status
        if not _is_int(status) or not (status == 0 or 400 <= status <= 599):
            raise ValueError(
                f"remote_prefill_error_status must be 0 or in [400, 599], got {status!r}")

    def _check_cache_settings(self) -> None:
        if self.tokenizer is not None and self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if (self.tokenizer == "hf") != (self.tokenizer_dir is not None):
            raise ValueError("tokenizer_dir is required with tokenizer 'hf', and only with it")
        rate = self.prefill_tokens_per_s
        if not _is_number(rate) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"prefill_tokens_per_s must be a finite number >= 0, got {rate!r}")
        if not _is_int(self.cpu_offload_blocks) or self.cpu_offload_blocks < 0:
            raise ValueError(
                f"cpu_offload_blocks must be an integer >= 0, got {self.cpu_offload_blocks!r}"
            )
        if self.kv_events.enabled and not self.enable_prefix_caching:
            raise ValueError("kv_events need enable_prefix_caching")  # as in vLLM

    @property
    def default_model(self) -> str:
        """The model a request without ``model`` is served by (vLLM uses the first name)."""
        return self.served_model_names[0]

    @property
    def num_gpu_blocks(self) -> int:
        """KV cache size in blocks, as vLLM reports it in ``cache_config_info``."""
        return self.kv_capacity_tokens // self.block_size

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request may put in ``model``: served names, then adapters."""
        return (*self.served_model_names, *self.lora_names)

    @property
    def lora_ids(self) -> dict[str, int]:
        """vLLM's integer id of each adapter (1, 2, ... in the order served)."""
        return {name: index for index, name in enumerate(self.lora_names, start=1)}


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True is never a sensible port or size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_address(address: object) -> None:
    """Accept ``host:port`` or ``[v6]:port``; anything else is a configuration mistake."""
    if not isinstance(address, str):
        raise ValueError(f"advertise must be a string 'ip:port', got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"advertise must look like 'ip:port', got {address!r}")


def _check_models(names: object, what: str) -> tuple[str, ...]:
    # A bare string is a Sequence too; treating it as a list of letters is never intended.
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {names!r}")
    result = tuple(names)
    if not result:
        raise ValueError(f"{what} must not be empty")
    for name in result:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must be non-empty strings, got {name!r}")
    if len(set(result)) != len(result):
        raise ValueError(f"{what} contains duplicates: {list(result)!r}")
    return result
