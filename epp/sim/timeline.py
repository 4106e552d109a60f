"""The simulated pod's accelerator time: when prefill computes, and what that costs the
decode steps that share the pod with it.

The model (vLLM with chunked prefill, simplified):

- Prefill is compute-bound: ``tokens / prefill_tokens_per_s`` seconds of accelerator time.
  Requests prefill one after another (FIFO), in chunks of at most ``chunk_tokens``
  (vLLM's ``max_num_batched_tokens``), one chunk per engine step.
- Every engine step also advances each running decode by one token, which alone takes
  ``step_s`` (the inter-token latency). A step that carries a chunk therefore lasts
  ``step_s + chunk / rate``. On the timeline, chunks are intervals separated by a
  ``step_s`` slot, and a decode token needs ``step_s`` of time outside chunks. A prefill
  queued while no other request on the pod will decode (a prefill pod's one-token
  requests) runs its chunks back to back instead.

So while a pod prefills anything, its running decodes produce a token every
``itl + chunk / rate`` instead of every ``itl``: the interference that prefill/decode
disaggregation keeps off decode pods. The step time itself is the engine's to set
(``step_s``): it grows with the batch and the KV the batch holds (``epp.sim.engine``).
Not modelled: KV transfers, which use the network rather than this timeline.
"""

from __future__ import annotations

import bisect
import math

# Chunks that ended this long before a new prefill is queued are forgotten. Only a decode
# whose previous token is older than that (an event loop seconds behind) could need them.
HISTORY_S = 10.0
# Forget old chunks in batches: ``del list[:k]`` is O(n), so not on every prefill.
PRUNE_BATCH = 64


class ComputeTimeline:
    """Scheduled prefill chunks of one pod, as ``(start, end)`` times on the loop's clock."""

    def __init__(self, *, prefill_tokens_per_s: float, chunk_tokens: int, step_s: float) -> None:
        if prefill_tokens_per_s < 0 or chunk_tokens < 1 or step_s < 0:
            raise ValueError("need prefill_tokens_per_s >= 0, chunk_tokens >= 1, step_s >= 0")
        self._s_per_token = 1.0 / prefill_tokens_per_s if prefill_tokens_per_s else 0.0
        self._chunk_tokens = chunk_tokens
        self._step_s = step_s
        # Chunks never overlap and are appended in time order, so both lists are sorted.
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._free_at = -math.inf  # end of the last scheduled chunk

    @property
    def step_s(self) -> float:
        """The duration of one decode step now (the engine updates it as its batch changes)."""
        return self._step_s

    @step_s.setter
    def step_s(self, value: float) -> None:
        self._step_s = max(0.0, value)

    @property
    def busy_until(self) -> float:
        """When the last scheduled prefill chunk ends (-inf: never busy)."""
        return self._free_at

    def prefill(self, ready: float, tokens: int, *, interleave: bool = True) -> float:
        """Queue ``tokens`` of prefill that may start at ``ready``, behind earlier prefill
        work; returns when its last chunk ends (``ready`` when there is nothing to compute).

        ``interleave``: leave a decode step between chunks (false: no request decodes)."""
        return self.prefill_span(ready, tokens, interleave=interleave)[1]

    def prefill_span(self, ready: float, tokens: int, *,
                     interleave: bool = True) -> tuple[float, float]:
        """Like ``prefill``, returning when its first chunk starts and its last one ends."""
        if tokens <= 0 or not self._s_per_token:
            return ready, ready
        self._forget_before(ready - HISTORY_S)
        slot = self._step_s if interleave else 0.0
        start = first = max(ready, self._free_at + slot)
        end = start
        while tokens > 0:
            chunk = min(tokens, self._chunk_tokens)
            end = start + chunk * self._s_per_token
            self._starts.append(start)
            self._ends.append(end)
            tokens -= chunk
            start = end + slot
        self._free_at = end
        return first, end

    def decode_step_end(self, start: float) -> float:
        """When a decode step begun at ``start`` yields its token: after ``step_s`` of time
        outside prefill chunks."""
        ends = self._ends
        if not ends or ends[-1] <= start:  # the common case: no prefill ahead
            return start + self._step_s
        starts = self._starts
        t, need = start, self._step_s
        for i in range(bisect.bisect_right(ends, t), len(ends)):
            if starts[i] >= t + need:
                break  # the step fits before this chunk
            need -= max(0.0, starts[i] - t)
            t = ends[i]
        return t + need

    def _forget_before(self, cutoff: float) -> None:
        count = bisect.bisect_right(self._ends, cutoff)
        if count >= PRUNE_BATCH:
            del self._starts[:count]
            del self._ends[:count]
