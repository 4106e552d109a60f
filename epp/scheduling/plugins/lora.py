"""LoRA affinity: prefer pods that already run the requested adapter."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.plugins.scorers import FreshnessAware
from epp.scheduling.types import SchedulingContext

# GIE's values: loaded beats room-to-load beats queued-to-load beats no room.
SCORE_ACTIVE = 1.0
SCORE_ROOM = 0.8
SCORE_WAITING = 0.6


class LoraAffinityScorer(FreshnessAware):
    """1.0 adapter active, 0.8 room to load it, 0.6 already waiting for it, else 0."""

    type_name = "lora-affinity-scorer"

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        model = ctx.model
        out = []
        for e in endpoints:
            m = e.state.metrics
            if not self.fresh(ctx, e):
                out.append(0.0)
            elif model in m.running_loras:
                out.append(SCORE_ACTIVE)
            elif model in m.waiting_loras:
                out.append(SCORE_WAITING)
            elif len(m.running_loras) < m.max_lora:
                out.append(SCORE_ROOM)
            else:
                out.append(0.0)
        return out
