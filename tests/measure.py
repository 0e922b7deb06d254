"""Figures of running processes, through psutil so that they read the same
on Linux, macOS and Windows."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import psutil


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid`, in MB."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def own_peak_rss_mb() -> float:
    """The most resident memory this process has had, in MB."""
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows
    if peak is None:  # POSIX: psutil has no peak there, the kernel's rusage does
        import resource  # POSIX only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return float(peak) / 2**20


def thread_names(pid: int) -> list[str]:
    """The names of a process's threads, where the system tells (Linux); else none."""
    names = []
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # (a thread that just ended)
            names.append(comm.read_text().strip())
    return sorted(names)


def threads_and_handles(pid: int) -> tuple[int, int]:
    """How many threads and open file descriptors (Windows: handles) a process has."""
    process = psutil.Process(pid)
    if sys.platform == "win32":
        return process.num_threads(), process.num_handles()
    return process.num_threads(), process.num_fds()
