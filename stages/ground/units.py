"""The units a spec writes sizes and durations in ("20GB", "10min"): pure parsers the spec checks
values with when it loads, and the stages use when they run."""

from __future__ import annotations

import re

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DURATION = re.compile(r"([0-9]+)(s|min|h)")  # how `checkpoint_every` writes a wall time
SECONDS = {"s": 1, "min": 60, "h": 3600}


def parse_size(text: str) -> int:
    """'20GB', '500 MB', '1.5GiB', '0', '123' (bytes) → bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: write it as e.g. 20GB, 500MB, 1.5GiB or a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def duration_seconds(text: str) -> int:
    """"30s", "10min", "1h" → seconds."""
    match = DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is neither a step count nor a duration: write e.g. 200, \"10min\", \"30s\" or \"1h\"")
    return int(match.group(1)) * SECONDS[match.group(2)]
