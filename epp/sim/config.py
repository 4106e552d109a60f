"""Configuration of one simulated vLLM pod."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Immutable settings of one simulated vLLM pod.

    ``advertise`` is the ``ip:port`` reported in the ``x-sim-endpoint`` response
    header; it defaults to ``f"{host}:{port}"``. ``served_model_names`` accepts any
    sequence of names and is stored as a tuple so the config stays hashable.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    advertise: str | None = None
    served_model_names: Sequence[str] = field(default_factory=lambda: ("qwen3",))
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    default_max_tokens: int = 16
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

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
        object.__setattr__(self, "served_model_names", _check_models(self.served_model_names))
        for name in ("ttft_ms", "itl_ms"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_int(self.default_max_tokens) or self.default_max_tokens < 1:
            raise ValueError(
                f"default_max_tokens must be an integer >= 1, got {self.default_max_tokens!r}"
            )
        if not _is_int(self.max_body_bytes) or self.max_body_bytes < 1:
            raise ValueError(
                f"max_body_bytes must be an integer >= 1, got {self.max_body_bytes!r}"
            )

    @property
    def default_model(self) -> str:
        """The model a request without ``model`` is served by (vLLM uses the first name)."""
        return self.served_model_names[0]


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


def _check_models(names: object) -> tuple[str, ...]:
    # A bare string is a Sequence too; treating it as a list of letters is never intended.
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"served_model_names must be a list of strings, got {names!r}")
    result = tuple(names)
    if not result:
        raise ValueError("served_model_names must not be empty")
    for name in result:
        if not isinstance(name, str) or not name:
            raise ValueError(f"served model names must be non-empty strings, got {name!r}")
    if len(set(result)) != len(result):
        raise ValueError(f"served_model_names contains duplicates: {list(result)!r}")
    return result
