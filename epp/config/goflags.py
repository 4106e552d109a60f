"""Flag values in the syntax of the upstream (Go) endpoint picker.

The llm-d-router Helm chart renders the picker's flags the way Go's ``pflag`` reads them:
booleans as ``--flag=true|false`` (or bare), durations as ``30s`` / ``50ms`` / ``1m30s``,
message sizes as Kubernetes quantities (``10MiB``, ``25MB``). These parsers accept exactly
that syntax so an operator's values mean the same here.
"""

from __future__ import annotations

import re

# Go's strconv.ParseBool spellings.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# Go's time.ParseDuration units, in seconds.
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-z\u00b5\u03bc]+)")

# Kubernetes resource.Quantity suffixes (binary and decimal) that a byte size can carry.
_QUANTITY_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)([kMGTPE]i?|)")


def parse_go_bool(text: str) -> bool:
    """``true``/``false`` and the other spellings Go's ``strconv.ParseBool`` accepts."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r} (use true or false)")


def parse_go_duration(text: str, *, bare_seconds: bool = True) -> float:
    """Seconds in a Go duration (``1h2m3.5s``, ``50ms``, ``-1s``, ``0``).

    With ``bare_seconds`` a bare number is read as seconds: this picker's own flags took
    seconds before they took Go durations, and deployed manifests still pass them that
    way. Config files follow Go strictly (only ``0`` goes without a unit).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if s == "0":
        return 0.0
    if bare_seconds:
        try:
            return float(s)
        except ValueError:
            pass
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    total, pos = 0.0, 0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None or match.group(2) not in _DURATION_UNITS:
            raise ValueError(f"invalid duration {text!r} (e.g. 30s, 50ms, 1m30s)")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r} (e.g. 30s, 50ms, 1m30s)")
    return sign * total


def parse_byte_size(text: str) -> int:
    """Bytes in a Kubernetes quantity (``10MiB``, ``25MB``, ``4194304``); a trailing ``B``
    is dropped first, as the upstream picker does."""
    s = text.strip()
    if len(s) > 1 and s[-1] in "Bb":
        s = s[:-1]
    match = _QUANTITY.fullmatch(s)
    if match is None:
        raise ValueError(f"invalid size {text!r} (e.g. 10MiB, 25MB, 4194304)")
    value = float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2)]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)
