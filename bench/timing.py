"""Timing and memory helpers shared by the benchmark cases."""
from __future__ import annotations

import os
import resource
import statistics
import time


def median_ms(fn, reps: int = 5, warmup: int = 1, sync=None, cpu: bool = False) -> float:
    """Median wall time (``cpu``: process CPU time) of ``fn()`` in milliseconds after
    ``warmup`` untimed calls. ``sync`` (e.g. torch.cuda.synchronize) runs after each call."""
    return summary_ms(fn, reps, warmup, sync)["cpu_median" if cpu else "median"]


def summary_ms(fn, reps: int = 5, warmup: int = 1, sync=None) -> dict:
    """Wall-clock median/min/max (ms) and the median CPU time of the process (all threads)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times, cpu = [], []
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
            "max": round(max(times), 3), "n": reps, "cpu_median": round(statistics.median(cpu), 3)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return float("nan")


def load_average() -> tuple:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return ()
