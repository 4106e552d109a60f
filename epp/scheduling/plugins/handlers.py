"""Profile handlers: which profiles run, and which result routes the request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.scheduling.registry import NoParams, PluginDeps
from epp.scheduling.types import ProfileResult, SchedulingContext


class SingleProfileHandler:
    """Exactly one profile, run once; its result is the answer."""

    type_name = "single-profile-handler"
    Params = NoParams

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name)

    def validate_profiles(self, profiles: Sequence[str]) -> str | None:
        if len(profiles) != 1:
            return (f"single-profile-handler needs exactly one scheduling profile, "
                    f"got {len(profiles)}: {list(profiles)}")
        return None

    def pick_profiles(self, ctx: SchedulingContext, profiles: Sequence[str],
                      results: Mapping[str, ProfileResult]) -> list[str]:
        return [] if results else [profiles[0]]

    def primary(self, ctx: SchedulingContext, results: Mapping[str, ProfileResult]) -> str:
        return next(iter(results))
