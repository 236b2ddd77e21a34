"""How busy the machine is: the one reader of /proc/stat the benchmarks share (no torch import, no side effects)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_busy_s():
    """(seconds all cores spent busy, seconds this process spent on the CPU), or None off Linux."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime
