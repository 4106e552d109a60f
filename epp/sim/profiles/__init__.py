"""Fleet profiles: one YAML file per "GPU type" (accelerator + model) holding every timing
and capacity setting of a simulated pod, with the derivation of each number beside it.

``epp-sim --profile h100-llama8b`` (a name: a file in this package) or ``--profile
path/to/profile.yaml``; explicit flags override the profile's values. Keys are the sim's
setting names (``SimConfig`` fields) plus ``num_gpu_blocks`` (vLLM's name for the KV cache
size in blocks, an alternative to ``kv_capacity_tokens``), ``name`` and ``description``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.sim.config import DEFAULT_BLOCK_SIZE

PROFILES_DIR = Path(__file__).resolve().parent
# Settings a profile may hold: the fleet's timings and capacities, nothing about one
# pod's identity (ports, models, role).
FLOAT_KEYS = ("prefill_tokens_per_s", "itl_ms", "itl_ms_per_seq", "itl_us_per_kv_token",
              "ttft_ms", "kv_transfer_us_per_token")
INT_KEYS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_capacity_tokens",
            "num_gpu_blocks", "cpu_offload_blocks")
INFO_KEYS = ("name", "description")


class ProfileError(ValueError):
    """A profile that cannot be found or read, or holds an unknown or invalid setting."""


@dataclass(frozen=True)
class FleetProfile:
    """The settings of one profile, validated; ``settings`` maps SimConfig field names
    (``num_gpu_blocks`` already turned into ``kv_capacity_tokens``) to values."""

    name: str
    description: str
    source: str
    settings: dict[str, float | int] = field(default_factory=dict)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in this package."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """The file a ``--profile`` value names: a shipped profile's name, or a path."""
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        if candidate.is_file():
            return candidate
        raise ProfileError(f"profile {name_or_path!r} not found "
                           f"(shipped: {', '.join(available_profiles())}; or give a path)")
    path = Path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"profile file {name_or_path!r} not found")
    return path


def load_profile(name_or_path: str) -> FleetProfile:
    """Read and validate a profile (raises ``ProfileError`` naming the bad key)."""
    path = profile_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"profile {path.name}: {exc}") from None
    if not isinstance(doc, dict):
        raise ProfileError(f"profile {path.name}: expected a mapping of settings")
    return FleetProfile(
        name=str(doc.get("name", path.stem)),
        description=str(doc.get("description", "")),
        source=str(path),
        settings=_settings(doc, path.name),
    )


def _settings(doc: dict[str, Any], where: str) -> dict[str, float | int]:
    unknown = sorted(set(doc) - set(FLOAT_KEYS) - set(INT_KEYS) - set(INFO_KEYS))
    if unknown:
        raise ProfileError(f"profile {where}: unknown setting(s) {', '.join(unknown)} "
                           f"(known: {', '.join((*FLOAT_KEYS, *INT_KEYS))})")
    out: dict[str, float | int] = {}
    for key in FLOAT_KEYS:
        if key in doc:
            value = doc[key]
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0):
                raise ProfileError(f"profile {where}: {key} must be a number >= 0, got {value!r}")
            out[key] = float(value)
    for key in INT_KEYS:
        if key in doc:
            value = doc[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProfileError(f"profile {where}: {key} must be an integer >= 0, "
                                   f"got {value!r}")
            out[key] = value
    if "num_gpu_blocks" in out:
        if "kv_capacity_tokens" in out:
            raise ProfileError(f"profile {where}: give num_gpu_blocks or kv_capacity_tokens, "
                               "not both")
        blocks = out.pop("num_gpu_blocks")
        out["kv_capacity_tokens"] = int(blocks) * int(out.get("block_size", DEFAULT_BLOCK_SIZE))
    return out
