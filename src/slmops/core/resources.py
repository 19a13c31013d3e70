"""Process resource facts (peak RSS) measured the way a device would feel them."""

from __future__ import annotations

import resource
import sys


def own_peak_rss_bytes() -> int:
    """Peak RSS of this process image.

    On Linux this is VmHWM, which belongs to the address space and starts afresh at exec.
    ru_maxrss does not: it survives exec, so a child forked from a 350 MB parent reports at
    least 350 MB even if the program it runs never uses a tenth of that.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_bytes(include_children: bool = True) -> int:
    """Peak RSS of this process, or of its largest waited-for child if that was larger.

    Children's figures come from ru_maxrss, which includes what they inherited before exec.
    """
    own = own_peak_rss_bytes()
    if not include_children:
        return own
    scale = 1 if sys.platform == "darwin" else 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, kids)


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
