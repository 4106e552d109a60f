"""How KV-event subscribers find publishers, recover what they missed, and restart."""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore import DEFAULT_KV_EVENTS_PORT
from epp.supervise import DEFAULT_RESTART_BACKOFF_MAX_S, DEFAULT_RESTART_BACKOFF_S

DEFAULT_PUB_PORT = DEFAULT_KV_EVENTS_PORT
DEFAULT_REPLAY_PORT_OFFSET = 1  # vLLM examples put the replay ROUTER on 5558
# Per reply frame. A live ROUTER answers within milliseconds (it is polled between
# publishes); vLLM's default config has no replay endpoint at all, so do not wait long.
DEFAULT_REPLAY_TIMEOUT_S = 2.0
# After a replay timed out, do not ask that engine again for this long: otherwise every
# gap would stall the subscriber for the full timeout.
DEFAULT_REPLAY_BACKOFF_S = 30.0
# A sink reporting missing parents triggers a full replay (vLLM keeps the last 10,000
# batches) at most this often: a full replay costs tens of ms of decode and apply, and
# missing parents that replay cannot cure (index evictions, a wrapped engine buffer)
# would otherwise loop.
DEFAULT_RESYNC_INTERVAL_S = 30.0
# The SUB queue holds live messages while a replay runs; vLLM's PUB uses the same HWM.
DEFAULT_RCVHWM = 100_000


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    """How KV-event subscribers find publishers and recover what they missed."""

    default_port: int = DEFAULT_PUB_PORT
    replay_port_offset: int | None = DEFAULT_REPLAY_PORT_OFFSET  # None: no replay
    topic_filter: bool = True  # False: subscribe to everything (vLLM's default topic is "")
    bind: str | None = None  # central mode: bind one SUB here, e.g. "tcp://*:5557"
    replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S
    replay_backoff: float = DEFAULT_REPLAY_BACKOFF_S
    resync_interval: float = DEFAULT_RESYNC_INTERVAL_S
    rcvhwm: int = DEFAULT_RCVHWM
    restart_backoff: float = DEFAULT_RESTART_BACKOFF_S  # first wait after a crash
    restart_backoff_max: float = DEFAULT_RESTART_BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if not 0 < self.default_port < 65536:
            raise ValueError(f"default_port {self.default_port} must be 1-65535")
        if self.replay_port_offset is not None and not (
                0 < self.default_port + self.replay_port_offset < 65536):
            raise ValueError(f"replay_port_offset {self.replay_port_offset} leaves the "
                             "port range")
        for name in ("replay_timeout", "replay_backoff", "resync_interval",
                     "restart_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.replay_timeout == 0:
            raise ValueError("replay_timeout must be > 0")
        if self.restart_backoff_max < self.restart_backoff:
            raise ValueError("restart_backoff_max must be >= restart_backoff")
        if self.rcvhwm < 0:
            raise ValueError("rcvhwm must be >= 0")
