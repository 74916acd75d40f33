"""Process facts reported each round (memory), so leaks show in summary.json and the soak benchmark."""

from __future__ import annotations

import os
from pathlib import Path


def current_rss_mb() -> float:
    """Resident set size of this process now (not the peak), from /proc; NaN where /proc is absent."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
