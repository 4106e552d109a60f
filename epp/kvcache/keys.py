"""Block keys: our own chained hash over each full block's token ids.

``key[i] = xxh3_64(uint32 tokens of block i, seed=key[i-1])`` with ``key[-1]`` the root,
a hash of the base model name and LoRA adapter. The same function keys the blocks of a
request (from its tokens) and the blocks an engine reports (from ``BlockStored
.token_ids``), so matching needs no agreement with vLLM's own hash (``PYTHONHASHSEED``,
sha256 vs xxhash, CBOR vs pickle). The price: a stored block can only be keyed when its
parent's key is known; an event whose parent was never seen is resolved by asking the
engine to replay (see the subscriber).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_UINT32_MASK = 0xFFFF_FFFF


def root_key(model: str, lora_name: str | None) -> int:
    """The seed of a block chain: different models or adapters never share blocks."""
    return _xxh3(f"{model}\x00{lora_name or ''}".encode())


def chain_keys(tokens: Sequence[int], block_size: int, parent: int,
               max_blocks: int | None = None) -> list[int]:
    """Keys of the full blocks of ``tokens``, chained from ``parent``. A trailing
    partial block has no key (vLLM caches only full blocks).

    Token ids are hashed as uint32 (every vocabulary is far smaller). An int outside that
    range (a malformed event or render answer) is folded modulo 2**32 rather than raising:
    the same fold applies on the request and the event side, so keys stay comparable.
    Raises ``ValueError`` for a ``block_size`` below 1 or a token that is not an int.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    if n == 1:  # the common decode-time event: one new block
        return [_xxh3(_pack(tokens[:block_size]), parent)]
    packed = _pack(tokens[: n * block_size])
    step = 4 * block_size
    keys = []
    key = parent
    view = memoryview(packed)
    for off in range(0, n * step, step):
        key = _xxh3(view[off : off + step], key)
        keys.append(key)
    return keys


def _pack(tokens: Sequence[int]) -> bytes:
    """Token ids as native uint32 bytes; out-of-range ints folded modulo 2**32."""
    try:
        return array("I", tokens).tobytes()
    except OverflowError:  # only malformed input pays for the fold
        pass
    except TypeError:
        raise ValueError("token ids must be integers") from None
    if not all(isinstance(t, int) for t in tokens):
        raise ValueError("token ids must be integers")
    return array("I", [t & _UINT32_MASK for t in tokens]).tobytes()
