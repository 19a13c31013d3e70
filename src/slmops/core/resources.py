"""Process resource facts (peak RSS) measured the way a device would feel them."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes(include_children: bool = True) -> int:
    """Peak resident set size of this process (and of waited-for children) in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if not include_children:
        return own
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, kids)


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
