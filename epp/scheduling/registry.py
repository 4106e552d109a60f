"""Plugin registry: config ``type`` names -> plugin classes with typed parameters.

A plugin class declares ``type_name``, a ``Params`` msgspec Struct (camelCase keys,
unknown keys rejected) and ``from_config(name, params, deps)``. Adding a plugin is one
file plus one line in :func:`default_registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec


class PluginParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """Base for plugin parameters: camelCase in YAML, unknown keys are errors."""


class NoParams(PluginParams):
    """For plugins that take no parameters."""


@dataclass(frozen=True, slots=True)
class PluginDeps:
    """Process-level facts plugins may need (never request state)."""

    seed: int | None = None
    # The conformance header may steer picks only when the operator enables it.
    allow_test_header: bool = False
    # Scraped metrics older than this are not trusted by load scorers.
    metrics_stale_after_s: float = 0.5
    # Counts a P/D decision by type (the metrics layer supplies it).
    pd_decisions: Callable[[str], None] | None = None


class PluginClass(Protocol):
    """What the registry needs from a plugin class."""

    type_name: str
    Params: type[PluginParams]

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any: ...


class PluginConfigError(ValueError):
    """A plugin's type or parameters are invalid."""


class PluginRegistry:
    """Maps plugin type names to plugin classes."""

    def __init__(self) -> None:
        self._types: dict[str, PluginClass] = {}

    def register(self, cls: Any) -> None:
        """Add a plugin class under its ``type_name``."""
        if cls.type_name in self._types:
            raise ValueError(f"plugin type {cls.type_name!r} registered twice")
        self._types[cls.type_name] = cls

    def known(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted(self._types)

    def create(self, type_name: str, name: str, raw_params: Mapping[str, Any] | None,
               deps: PluginDeps) -> Any:
        """Instantiate a plugin; raises :class:`PluginConfigError` naming what is wrong."""
        cls = self._types.get(type_name)
        if cls is None:
            raise PluginConfigError(
                f"unknown plugin type {type_name!r} (known: {', '.join(self.known())})")
        try:
            params = msgspec.convert(dict(raw_params or {}), type=cls.Params)
        except msgspec.ValidationError as exc:
            raise PluginConfigError(f"parameters: {exc}") from None
        try:
            return cls.from_config(name, params, deps)
        except ValueError as exc:
            raise PluginConfigError(f"parameters: {exc}") from None
