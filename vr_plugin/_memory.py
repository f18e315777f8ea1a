"""Process memory readings for tests and benchmarks (Linux ``/proc``): current and peak resident set size."""

from __future__ import annotations

import os

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def _status(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or :func:`reset_peak_rss`."""
    return _status("VmHWM")


def reset_peak_rss() -> None:
    """Reset the peak to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
    with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
