"""GPU workloads shared by the bench scripts (imported as `from workloads import ...`: scripts run from bench/)."""

from __future__ import annotations

import time


def gemm_loop(torch, cuda_index: int, seconds: float, size: int = 8192) -> tuple[int, float]:
    """bf16 GEMMs of ``size``³ on one GPU for about ``seconds``, in batches of 20 launches, synchronised after each
    batch so the loop ends close to its deadline. Returns (GEMMs run, seconds taken)."""
    dev = torch.device("cuda", cuda_index)
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            torch.matmul(a, b, out=c)
        n += 20
        torch.cuda.synchronize(dev)
    return n, time.perf_counter() - t0
