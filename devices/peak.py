"""The attained fp32 peak of this machine's CPU, the yardstick for a measurement's GFLOP/s."""
from __future__ import annotations

import time


def gemm_peak_gflops(threads: int, sizes=(256, 512, 1024), seconds: float = 0.2) -> float:
    """This machine's attained fp32 peak at ``threads`` threads: ``threads`` x the fastest single-thread
    n x n torch GEMM, or the threaded GEMM where that is faster (best of ``seconds`` per size). The
    yardstick for a measurement's attained GFLOP/s; a datasheet peak is often unreachable. The
    single-thread probe is the robust one: on a shared machine a threaded GEMM waits at every barrier
    for a descheduled thread (measured here: 28-41 GFLOP/s at 2 threads against 162 at 1)."""
    import torch

    def best_rate(n_threads: int) -> float:
        torch.set_num_threads(n_threads)
        peak = 0.0
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b  # warm-up: thread pool and caches
            best, t_end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            peak = max(peak, 2 * n ** 3 / best / 1e9)
        return peak

    before = torch.get_num_threads()
    try:
        return max(threads * best_rate(1), best_rate(threads) if threads > 1 else 0.0)
    finally:
        torch.set_num_threads(before)
