"""Scheduling is a pure function of the request and the endpoints' state: importing the
scheduler and every built-in plugin must not pull in I/O (ZMQ sockets, HTTP clients,
tokenizers, gRPC). Checked in a fresh interpreter, where nothing else imported them."""

from __future__ import annotations

import subprocess
import sys

IO_MODULES = ("zmq", "aiohttp", "tokenizers", "tiktoken", "jinja2", "grpc", "h2",
              "kubernetes_asyncio", "nats")


def test_importing_the_scheduler_pulls_in_no_io() -> None:
    code = (
        "import sys\n"
        "import epp.scheduling.plugins, epp.scheduling.scheduler, epp.scheduling.registry\n"
        f"print(','.join(m for m in {IO_MODULES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
