"""Filters: remove candidates that must not serve a request."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.registry import NoParams, PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext

log = logging.getLogger(__name__)

TEST_SELECTION_HEADER = "test-epp-endpoint-selection"


class LabelSelectorParams(PluginParams):
    """``matchLabels``: every label must be present with this value."""

    match_labels: dict[str, str] = {}


class LabelSelectorFilter:
    """Keeps endpoints whose labels include all of ``matchLabels``."""

    type_name = "label-selector-filter"
    Params = LabelSelectorParams

    def __init__(self, name: str, match_labels: dict[str, str]) -> None:
        if not match_labels:
            raise ValueError("matchLabels must name at least one label")
        self.name = name
        self._items = tuple(match_labels.items())

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, dict(params.match_labels))

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        items = self._items
        return [e for e in endpoints if all(e.labels.get(k) == v for k, v in items)]


class HeaderBasedTestingFilter:
    """Conformance-test hook: keeps only the endpoints named (``ip`` or ``ip:port``,
    comma-separated) in ``test-epp-endpoint-selection``. It does nothing unless the EPP
    runs with ``--enable-test-endpoint-selection``, so clients cannot steer production
    traffic with it."""

    type_name = "header-based-testing-filter"
    Params = NoParams

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        if not enabled:
            log.warning("%s: the %s header is ignored (flag "
                        "--enable-test-endpoint-selection not set)", name, TEST_SELECTION_HEADER)

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, deps.allow_test_header)

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        value = ctx.headers.get(TEST_SELECTION_HEADER) if self.enabled else None
        if not value:
            return list(endpoints)
        wanted = [v.strip() for v in value.split(",") if v.strip()]
        out: dict[str, Endpoint] = {}  # by name: header order, each endpoint once
        for w in wanted:  # the first named endpoint is the primary
            for e in endpoints:
                if (e.address == w or e.ip == w) and e.name not in out:
                    out[e.name] = e
        return list(out.values())
