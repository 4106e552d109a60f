"""epp-sim: an asyncio stand-in for one vLLM pod (OpenAI API, deterministic output).

Layers: ``config`` (settings), ``engine`` (request-processing model), ``parsing`` and
``formatting`` (OpenAI wire format), ``server`` (aiohttp routes) and ``cli``.
"""

from epp.sim.config import SimConfig
from epp.sim.engine import Completion, Engine, GenerationRequest
from epp.sim.server import build_app, run

__all__ = ["Completion", "Engine", "GenerationRequest", "SimConfig", "build_app", "run"]
