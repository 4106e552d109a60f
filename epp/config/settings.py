"""Process settings for one endpoint picker, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES

# Ports of the endpoint-picker protocol (GIE): ext_proc, gRPC health, Prometheus.
DEFAULT_GRPC_PORT = 9002
DEFAULT_HEALTH_PORT = 9003
DEFAULT_METRICS_PORT = 9090
# In-flight streams get this long to finish on SIGTERM; Kubernetes' default
# terminationGracePeriodSeconds is 30 s, so stay well inside it.
DEFAULT_SHUTDOWN_GRACE_S = 15.0


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class EppSettings:
    """Everything :func:`epp.runner.build_app` needs. Port 0 picks a free port."""

    endpoints_file: str | None = None
    bind_address: str = "0.0.0.0"
    grpc_port: int = DEFAULT_GRPC_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    pool_name: str = "default"
    fallback_endpoints: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    endpoints_reload_s: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.endpoints_file is None:
            raise ConfigError(
                "no endpoint discovery configured: pass --endpoints-file with a static pool"
            )
        for name in ("grpc_port", "health_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"{name}: {port} is not a TCP port")
        fixed = [p for p in (self.grpc_port, self.health_port, self.metrics_port) if p]
        if len(set(fixed)) != len(fixed):
            raise ConfigError("grpc_port, health_port and metrics_port must differ")
        if self.fallback_endpoints < 1:
            raise ConfigError("fallback_endpoints: must be at least 1")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes: must be at least 1024")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s: must not be negative")
